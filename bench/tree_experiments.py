"""Why does the tree lose? Hierarchical SuperMerge on the benchmark, one factor changed at a time.

    python -m bench.tree_experiments --workdir /work/bench-work --threads 1   # -> docs/benchmark_trees.json

Every experiment merges the benchmark's cached full fine-tunes (the 8 tasks) through the orchestrator
(plan, then the plain executor, a fresh checkpoint store each) with the benchmark's SuperMerge
settings at every node, and changes one thing against the control (the planner's balanced tree of
fan-in 2, paired by task-vector similarity):

- ``dendrogram``: the similarity dendrogram opened top-down (``tree.shape: dendrogram``), the chains
  the planner used to build;
- ``random-pairs``: a balanced tree of fan-in 2 whose pairs are drawn at random (seeded), not by
  similarity;
- ``fan-in-4``: the balanced tree of fan-in 4 (depth 2 over 8 tasks);
- ``steps-x2``: twice the step budget at every node;
- ``init-same``: a merged input's coefficients start like a model's (``init_merged: same``) instead of
  by the number of tasks it carries;
- ``flat``: one merge of all eight through the same orchestrator path (the reference).

``bench/tree_report.py`` renders the JSON into docs/benchmarks.md. Runs are saved after each one;
``--resume`` keeps those already in ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bench.benchmark import BenchConfig, Run, _tokenizer, machine_info, run_hierarchical, save_results
from supermerge.merge_core.config import TreeConfig, load_config
from supermerge.merge_core.job import load_split, score_models
from supermerge.merge_core.model import FunctionalModel
from supermerge.merge_core.workload import minilm_dir, prepare_workload, write_merge_config


@dataclass(frozen=True)
class Experiment:
    """One factor changed against the control: the tree settings and SuperMerge parameters it uses."""

    name: str
    question: str
    tree: dict[str, Any]
    overrides: dict[str, Any] = field(default_factory=dict)


def balanced_random_groups(tasks: Sequence[str], fan_in: int, seed: int) -> Any:
    """A balanced nesting of ``tasks`` (groups of ``fan_in``, then groups of those) in a seeded random
    order: the shape of the control's tree without the similarity choosing the pairs."""
    level: list[Any] = list(tasks)
    random.Random(seed).shuffle(level)
    while len(level) > fan_in:
        level = [level[i:i + fan_in] if len(level[i:i + fan_in]) > 1 else level[i] for i in range(0, len(level), fan_in)]
    return level


def experiments(tasks: Sequence[str], seed: int) -> list[Experiment]:
    """The control first, then one experiment per factor (the module docstring says each)."""
    return [
        Experiment("control", "the planner's tree: balanced, fan-in 2, paired by similarity", {"max_fan_in": 2}),
        Experiment("dendrogram", "chain vs balanced (same fan-in)", {"max_fan_in": 2, "shape": "dendrogram"}),
        Experiment("random-pairs", "similarity-chosen vs random pairs (same shape)",
                   {"groups": balanced_random_groups(tasks, 2, seed)}),
        Experiment("fan-in-4", "fan-in 4 vs 2", {"max_fan_in": 4}),
        Experiment("init-same", "how a merged input's coefficients start", {"max_fan_in": 2}, {"init_merged": "same"}),
        Experiment("steps-x2", "per-node step budget", {"max_fan_in": 2}, {"steps": 2 * BenchConfig.steps}),
        Experiment("flat", "the flat merge through the same orchestrator path", {"flat": True}),
    ]


@dataclass
class TreeResults:
    command: str
    config: dict[str, Any]
    machine: dict[str, Any]
    individual: dict[str, float] = field(default_factory=dict)
    """Each task's own fine-tune on its test split (what "normalised" divides by)."""
    runs: list[dict[str, Any]] = field(default_factory=list)
    """{experiment, question, tree settings, overrides, run (bench.benchmark.Run as a dict)}."""
    seconds: float = 0.0


def run_experiments(config: BenchConfig, workdir: Path, *, names: Sequence[str] | None, seed: int, command: str,
                    out: Path, cache: Path | None = None, resume: TreeResults | None = None) -> TreeResults:
    """Each chosen experiment not in ``resume``; the results are saved to ``out`` after each one."""
    started = time.perf_counter()
    tasks = prepare_workload(workdir, config.workload(None), cache=cache)
    merge_config = load_config(write_merge_config(workdir / "trees-full.yaml", tasks, method="average",
                                                  output="merged/trees", max_length=config.max_length))
    results = resume or TreeResults(command=command, config=dataclasses.asdict(config), machine=machine_info())
    if resume is not None:
        results.command += f"\n{command} --resume"  # every invocation that added runs, in order
    before = results.seconds
    if not results.individual:
        results.individual = score_models(merge_config, {"individual": None})["individual"]
    model = FunctionalModel(minilm_dir())
    test = load_split(merge_config.models, "test", _tokenizer(), config.max_length)
    done = {(r["experiment"], r["run"]["seed"]) for r in results.runs}
    for exp in experiments([t.name for t in tasks], seed):
        if (names is not None and exp.name not in names) or (exp.name, seed) in done:
            continue
        run: Run = run_hierarchical(merge_config, config, workdir, seed, model, test, {},
                                    tree=TreeConfig(**exp.tree), overrides=exp.overrides, name=f"tree-{exp.name}")
        results.runs.append({"experiment": exp.name, "question": exp.question, "tree_settings": exp.tree,
                             "overrides": exp.overrides, "run": dataclasses.asdict(run)})
        results.seconds = before + time.perf_counter() - started
        save_results(results, out)
    return results


def load(path: Path) -> TreeResults:
    return TreeResults(**json.loads(path.read_text()))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.tree_experiments", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("bench-work"),
                        help="the benchmark's workdir: its cached full fine-tunes are reused (default ./bench-work)")
    parser.add_argument("--cache", type=Path, default=None, help="fine-tune cache (default WORKDIR/models)")
    parser.add_argument("--out", type=Path, default=Path("docs/benchmark_trees.json"))
    parser.add_argument("--only", nargs="+", default=None, help="only these experiments (default: all, in order)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resume", action="store_true", help="keep the runs already in --out, run the rest")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (1 on a shared machine)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    known = [e.name for e in experiments(BenchConfig().tasks, args.seed)]
    unknown = sorted(set(args.only or []) - set(known))
    if unknown:
        parser.error(f"--only {unknown}: the experiments are {known}")
    resume = load(args.out) if args.resume and args.out.exists() else None
    kept = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--resume"]
    results = run_experiments(BenchConfig(), args.workdir, names=args.only, seed=args.seed,
                              command=" ".join(["python -m bench.tree_experiments", *kept]), out=args.out,
                              cache=args.cache, resume=resume)
    print(f"{len(results.runs)} runs in {results.seconds / 60:.1f} min -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
