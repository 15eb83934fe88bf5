"""The validation-size experiment's data split, its report section, and the benchmark's saved command."""

from __future__ import annotations

import pytest

from bench.benchmark import recorded_command
from bench.report import valsize_section
from bench.val_size import validation_indices
from supermerge.merge_core.corpora import split_indices


def test_larger_validation_sets_start_with_the_benchmarks_and_never_touch_train_or_test():
    labels = [i % 3 for i in range(200)]
    train, val, test = split_indices(labels, n_train=100, n_val=10, n_test=40, seed=0)
    bigger = validation_indices(labels, n_train=100, n_val=10, n_test=40, seed=0, n=30)
    assert bigger[:10] == val and len(bigger) == len(set(bigger)) == 30
    assert not set(bigger) & (set(train) | set(test))
    capped = validation_indices(labels, n_train=100, n_val=10, n_test=40, seed=0, n=500)
    assert set(capped) == set(range(200)) - set(train) - set(test) and capped[:30] == bigger  # all 60 left
    assert len(validation_indices(labels, n_train=150, n_val=10, n_test=40, seed=0, n=30)) == 10  # nothing left


def _run(n: int, seed: int, acc: float, got: int | None = None) -> dict:
    return {"n_val": n, "seed": seed, "val_examples": {"a": n, "b": got or n}, "test_accuracy": {"a": acc, "b": acc},
            "val_accuracy": {}, "steps_used": 10, "seconds": 2.0, "params": {}}


def test_valsize_section_reports_each_size_the_caps_and_the_target():
    vs = {"method": "supermerge", "command": "python -m bench.val_size", "seconds": 60.0,
          "config": {"steps": 150, "batch_size": 8, "learned_lr": 0.05, "holdout": 8, "n_val": 32},
          "individual": {"a": 0.8, "b": 0.8},
          "runs": [_run(32, 0, 0.6), _run(32, 1, 0.64), _run(128, 0, 0.76, got=32)]}
    res = {"runs": [{"variant": "full", "method": "supermerge", "seed": 0, "test_accuracy": {"a": 0.6, "b": 0.6}}]}
    text = "\n".join(valsize_section(vs, res))
    assert "| 32 | 2 | 62.0 ± 2.8 | 60.0, 64.0 | 77.5 ± 3.5 | 10, 10 | 2.0 |" in text
    assert "| 128 | 1 | 76.0 | 76.0 | 95.0 | 10 | 2.0 |" in text
    assert "b (32)" in text and "**met** (best 95.0 %)" in text
    assert "1 of 1 seed(s) give exactly the benchmark's" in text
    vs["runs"] = vs["runs"][2:]  # no 32-example run of its own: the benchmark's is that row
    text = "\n".join(valsize_section(vs, {"runs": [{**res["runs"][0], "steps_used": 30, "seconds": 5.0}]}))
    assert "| 32 (the benchmark's runs above) | 1 | 60.0 | 60.0 | 75.0 | 30 | 5.0 |" in text and "| 128 | 1 |" in text


def test_the_saved_command_drops_both_resume_flags():
    argv = ["--workdir", "w", "--resume-from", "docs/benchmark_results.json", "--threads", "1", "--resume"]
    assert recorded_command(argv) == "python -m bench.benchmark --workdir w --threads 1"
    assert recorded_command(["--resume-from=x.json"]) == "python -m bench.benchmark"


@pytest.mark.slow  # fine-tunes two toy models: 7 min on the 2 shared cores
def test_val_size_runs_end_to_end_at_toy_size(tmp_path):
    import dataclasses

    from bench.benchmark import BenchConfig
    from bench.val_size import load, run_val_size
    from supermerge.merge_core.corpora import DataMissing

    config = BenchConfig(tasks=("language", "sentiment"), n_train=32, n_test=24, max_length=24, steps=4, holdout=8,
                         eval_every=1, patience=1, lora_rank=None, curve_task=None)
    out = tmp_path / "valsize.json"
    try:
        results = run_val_size(config, tmp_path / "work", method="supermerge_iso_cts_init", sizes=(16, 40), seeds=(0,),
                               command="pytest", out=out)
    except DataMissing as e:
        pytest.skip(str(e))
    assert [(r.n_val, r.seed) for r in results.runs] == [(16, 0), (40, 0)]
    assert [r.val_examples for r in results.runs] == [{"language": 16, "sentiment": 16},
                                                      {"language": 40, "sentiment": 40}]
    assert all(r.steps_used is not None and set(r.test_accuracy) == {"language", "sentiment"} for r in results.runs)
    assert set(results.individual) == {"language", "sentiment"}
    again = run_val_size(config, tmp_path / "work", method="supermerge_iso_cts_init", sizes=(16, 40), seeds=(0,),
                         command="pytest", out=out, resume=load(out))
    assert dataclasses.asdict(again)["runs"] == dataclasses.asdict(results)["runs"]  # nothing re-run
