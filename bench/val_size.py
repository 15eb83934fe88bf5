"""How much labelled validation data does SuperMerge need? The benchmark's merge, fed more of it.

    python -m bench.val_size --workdir /work/bench-work --threads 1    # -> docs/benchmark_valsize.json

The benchmark tunes W on 32 validation examples per task (the paper's setting). This runs one
SuperMerge variant on the benchmark's cached full fine-tunes with 32 / 128 / 512 per task, everything
else as there (same task vectors, test sets, step budget and early-stopping rule: ``holdout`` examples
of each task held out, so the extra examples train W), and scores each merge on the same test data.
The extra examples are the corpus's next ones after the fine-tune's training split, so they are never
in it or in the test split; a corpus with fewer left over (subjectivity has none) gives what it has,
and the JSON records each task's count. ``bench/report.py`` renders the JSON into docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bench.benchmark import BenchConfig, _tokenizer, machine_info, method_params, save_results
from bench.measure import measure
from bench.methods import LEARNED
from supermerge.merge_core.checkpoint import open_checkpoint
from supermerge.merge_core.config import load_config
from supermerge.merge_core.corpora import load_corpus, split_indices
from supermerge.merge_core.job import load_split, load_task_vectors, score_models, score_result
from supermerge.merge_core.merge import merge
from supermerge.merge_core.model import FunctionalModel
from supermerge.merge_core.workload import TaskModel, minilm_dir, prepare_workload, train_size, write_merge_config

SIZES = (32, 128, 512)
METHOD = "supermerge_iso_cts_init"
"""The SuperMerge variant with the best average test accuracy in docs/benchmark_results.json (full)."""


@dataclass
class ValSizeRun:
    n_val: int
    """Validation examples per task asked for."""
    seed: int
    val_examples: dict[str, int]
    """What each task got (a corpus with few examples left over gives fewer than ``n_val``)."""
    test_accuracy: dict[str, float]
    val_accuracy: dict[str, float]
    steps_used: int | None
    seconds: float
    params: dict[str, Any]


@dataclass
class ValSizeResults:
    method: str
    command: str
    config: dict[str, Any]
    machine: dict[str, Any]
    individual: dict[str, float] = field(default_factory=dict)
    """Each task's own fine-tune on its test split (what "normalised" divides by)."""
    runs: list[ValSizeRun] = field(default_factory=list)
    seconds: float = 0.0


def validation_indices(labels: Sequence[int], n_train: int, n_val: int, n_test: int, seed: int, n: int) -> list[int]:
    """Up to ``n`` validation indices: the split's own ``n_val``, then the examples after its ``n_train``
    training ones, in the split's (stratified) order. Never a training or test index of that split."""
    rest, val, _ = split_indices(labels, n_train=len(labels) - n_test - n_val, n_val=n_val, n_test=n_test, seed=seed)
    return (val + rest[n_train:])[:n]


def with_validation(task: TaskModel, config: BenchConfig, n: int, folder: Path) -> tuple[TaskModel, int]:
    """``task`` with a validation file of up to ``n`` examples (see :func:`validation_indices`), and its size."""
    workload = config.workload(None)
    corpus = load_corpus(task.name)
    index = validation_indices(corpus.labels, train_size(len(corpus), workload), workload.n_val, workload.n_test,
                               workload.seed, n)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{task.name}.val{n}.jsonl"
    path.write_text("".join(json.dumps({"text": corpus.texts[i], "label": corpus.labels[i]}) + "\n" for i in index))
    return dataclasses.replace(task, validation=path), len(index)


def run_val_size(
    config: BenchConfig, workdir: Path, *, method: str, sizes: Sequence[int], seeds: Sequence[int], command: str,
    out: Path, cache: Path | None = None, resume: ValSizeResults | None = None,
) -> ValSizeResults:
    """Every (seed, size) merge not in ``resume``; the results are saved to ``out`` after each one."""
    started = time.perf_counter()
    tasks = prepare_workload(workdir, config.workload(None), cache=cache)
    base_config = load_config(write_merge_config(workdir / "valsize-full.yaml", tasks, method="average",
                                                 output="merged/valsize", max_length=config.max_length))
    results = resume or ValSizeResults(method=method, command=command, config=dataclasses.asdict(config),
                                       machine=machine_info())
    before = results.seconds
    if not results.individual:
        results.individual = score_models(base_config, {"individual": None})["individual"]
    model = FunctionalModel(minilm_dir())
    test = load_split(base_config.models, "test", _tokenizer(), config.max_length)
    with open_checkpoint(base_config.base) as base:
        vectors = load_task_vectors(base, base_config.models, head_prefixes=base_config.head_prefixes)
    done = {(r.n_val, r.seed) for r in results.runs}
    for seed in seeds:
        for n in sizes:
            if (n, seed) in done:
                continue
            sized = [with_validation(t, config, n, workdir / "data" / "valsize") for t in tasks]
            entries = load_config(write_merge_config(workdir / f"valsize-{n}.yaml", [t for t, _ in sized],
                                                     method="average", output="merged/valsize",
                                                     max_length=config.max_length)).models
            val = load_split(entries, "validation", _tokenizer(), config.max_length)
            with measure() as cost:
                result = merge(base_config.base, vectors, method, params=method_params(method, config), val=val,
                               seed=seed, model=model)
            results.runs.append(ValSizeRun(
                n_val=n, seed=seed, val_examples={t.name: k for t, k in sized},
                test_accuracy=score_result(model, result, test), val_accuracy=result.val_accuracy,
                steps_used=None if result.learned is None else result.learned.steps_used, seconds=cost.seconds,
                params={k: v if isinstance(v, (int, float, str, bool, type(None))) else str(v)
                        for k, v in result.params.items()},
            ))
            results.seconds = before + time.perf_counter() - started
            save_results(results, out)
    return results


def load(path: Path) -> ValSizeResults:
    raw = json.loads(path.read_text())
    raw["runs"] = [ValSizeRun(**r) for r in raw["runs"]]
    return ValSizeResults(**raw)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.val_size", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("bench-work"),
                        help="the benchmark's workdir: its cached full fine-tunes are reused (default ./bench-work)")
    parser.add_argument("--cache", type=Path, default=None, help="fine-tune cache (default WORKDIR/models)")
    parser.add_argument("--out", type=Path, default=Path("docs/benchmark_valsize.json"))
    parser.add_argument("--method", default=METHOD, choices=[m for m in LEARNED if m.startswith("supermerge")])
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES), help="validation examples per task")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--resume", action="store_true", help="keep the runs already in --out, run the rest")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (1 on a shared machine)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    too_small = [n for n in args.sizes if n <= BenchConfig.holdout]
    if too_small:
        parser.error(f"--sizes {too_small}: each must exceed the {BenchConfig.holdout} examples held out for early stopping")
    resume = load(args.out) if args.resume and args.out.exists() else None
    if resume is not None and resume.method != args.method:
        parser.error(f"--resume: {args.out} holds {resume.method} runs, not {args.method}; pick another --out")
    kept = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--resume"]
    results = run_val_size(BenchConfig(), args.workdir, method=args.method, sizes=args.sizes, seeds=args.seeds,
                           command=" ".join(["python -m bench.val_size", *kept]), out=args.out, cache=args.cache,
                           resume=resume)
    print(f"{len(results.runs)} runs in {results.seconds / 60:.1f} min -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
