"""The benchmark end to end at toy size: real MiniLM, two real tasks, an OOD probe, the report."""

from __future__ import annotations

import dataclasses
import json

import pytest

from bench.benchmark import BenchConfig, load_results, run_benchmark, save_results
from supermerge.merge_core.corpora import DataMissing
from bench.report import write_report


def test_benchmark_smoke_runs_and_renders(tmp_path):
    config = BenchConfig(
        tasks=("language", "sentiment"), ood_tasks=("quote_topic",), n_train=32, n_test=24, max_length=24,
        seeds=(0, 1), steps=4, holdout=8, eval_every=1, patience=1, methods=("average", "supermerge"),
        lora_rank=None, ood_train=32, ood_test=24, hierarchical_fan_in=2, curve_task="sentiment", curve_sizes=(16,),
    )
    try:
        results = run_benchmark(config, tmp_path / "work", command="pytest smoke", progress=False)
    except DataMissing as e:
        pytest.skip(str(e))
    runs = {(r.method, r.seed) for r in results.runs}
    assert runs == {("average", 0), ("supermerge", 0), ("supermerge", 1), ("supermerge_hierarchical", 0)}
    for r in results.runs:
        assert set(r.test_accuracy) == {"language", "sentiment"}
        assert all(0.0 <= a <= 1.0 for a in r.test_accuracy.values())
        assert set(r.ood_accuracy) == {"quote_topic"} and r.seconds > 0
    learned = [r for r in results.runs if r.method == "supermerge"]
    assert all(r.steps_used is not None and 0 <= r.steps_used <= 4 for r in learned)
    assert all(r.holdout_losses and r.holdout_losses[0][0] == 0 for r in learned)
    assert [c["n_train"] for c in results.curve] == [16, 32]
    assert set(results.finetunes["full"]) == {"language", "sentiment"}
    refs = results.references["full"]
    assert set(refs) == {"pretrained", "individual", "majority"}
    assert len(results.weights["rows"]) == 2 and len(results.weights["groups"]) == 103

    saved = save_results(results, tmp_path / "out" / "benchmark_results.json")
    doc = write_report(json.loads(saved.read_text()), tmp_path / "out")
    text = doc.read_text()
    assert "| supermerge |" in text and "pytest smoke" in text and "Out-of-domain" in text
    assert "Hierarchical vs flat SuperMerge" in text and "| supermerge_hierarchical |" in text
    assert "## Targets" in text and "Learning curve: sentiment" in text and "steps chosen" in text
    assert "0 of the 4 merges" in text and "the LoRA variant" in text  # every merge asked for ran; LoRA was off

    # a resumed run with one more seed runs only that seed's seeded merges and says so; without the
    # curve (--no-curve) it keeps the curve measured before
    more = dataclasses.replace(config, seeds=(0, 1, 2), curve_task=None)
    resumed = run_benchmark(more, tmp_path / "work", command="pytest smoke", progress=False,
                            resume=load_results(saved))
    added = {(r.method, r.seed) for r in resumed.runs} - runs
    assert added == {("supermerge", 2)} and len(resumed.segments) == 2
    assert resumed.curve == results.curve and resumed.config["curve_task"] == "sentiment"
    assert (tmp_path / "out" / "img" / "supermerge_weights.png").stat().st_size > 10_000
    assert (tmp_path / "out" / "img" / "accuracy.png").stat().st_size > 10_000
