"""The multi-task merging benchmark: real pretrained model, real tasks, every method, several seeds.

    python -m bench.benchmark                 # full run -> docs/benchmarks.md + docs/img/*.png
    python -m bench.benchmark --quick         # 2 tasks, few steps: the smoke test's size

Steps: fine-tune the packaged all-MiniLM-L6-v2 once per task (full, and LoRA), cached in the workdir;
score the pretrained model and every individual fine-tune; merge with every method on the same task
vectors and the same 32-example validation sets (hyperparameters chosen on validation only), each
seeded method over several seeds; score each merge on held-out test data, and on out-of-domain tasks
that are never merged (a linear probe on the merged encoder's features); record wall time and peak
RSS per merge. The report (bench/report.py) is rendered from the JSON this writes: no number in the
doc is typed by hand.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import logging
import os
import platform
import shutil
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import torch
from tqdm.auto import tqdm

from supermerge.merge_core.corpora import load_corpus, split
from bench.measure import measure
from bench.methods import ALL_METHODS, LEARNED, LORA_METHODS, SEEDED
from supermerge.merge_core.workload import (
    TaskModel, WorkloadConfig, finetune_seconds, minilm_dir, prepare_task, prepare_workload, write_merge_config,
)
from supermerge.merge_core.checkpoint import open_checkpoint
from supermerge.merge_core.config import MergeConfig, TreeConfig, load_config
from supermerge.merge_core.data import TaskData, load_task_data, tokenize
from supermerge.merge_core.evaluate import evaluate
from supermerge.merge_core.job import load_split, load_task_vectors, model_params, score_models, score_result
from supermerge.merge_core.merge import MergeResult, merge
from supermerge.merge_core.model import FunctionalModel
from supermerge.merge_core.task_vectors import load_task_vector, mergeable_names

log = logging.getLogger(__name__)

RUN_FIRST = ("supermerge", "supermerge_tsv_init", "supermerge_iso_cts_init", "tsv", "iso_c", "iso_cts", "wudi",
             "task_arithmetic", "ties", "supermerge_no_tanh", "adamerging")
"""Run order (seed by seed): the merges the targets compare first, so a run cut short keeps them."""


def run_order(method: str) -> int:
    return RUN_FIRST.index(method) if method in RUN_FIRST else len(RUN_FIRST)


def registered(methods: Sequence[str]) -> tuple[str, ...]:
    """``methods`` that the registry holds (the 2025 training-free merges may be absent)."""
    from supermerge.merge_core.methods.registry import METHODS

    return tuple(m for m in methods if m in METHODS)


@dataclass(frozen=True)
class BenchConfig:
    """Everything that determines the benchmark's numbers (saved with them)."""

    tasks: tuple[str, ...] = ("language", "sentiment", "quote_topic", "news_outlet", "verb_sense", "subjectivity",
                              "package_section", "man_section")
    ood_tasks: tuple[str, ...] = ("health_source", "noun_sense")
    """Never merged: scored by a linear probe on each merged encoder's features (the paper's table 2)."""
    n_train: int = 2000
    n_val: int = 32
    n_test: int = 300
    max_length: int = 48
    epochs: float = 2.0
    lr: float = 1e-4
    lora_lr: float = 1e-3
    lora_epochs: float = 1.0
    """LoRA adapters get one epoch: they feed one table of their own, and the cache must build in an hour."""
    seeds: tuple[int, ...] = (0, 1, 2)
    steps: int = 150
    """The most training steps a learned merge (SuperMerge, its ablation, AdaMerging) may take."""
    holdout: int = 8
    """Early stopping, the same rule for every learned merge: this many of each task's validation
    examples are held out, W trains on the rest, and the step with the lowest held-out loss (checked
    every ``eval_every`` steps, stopping after ``patience`` checks without a new best) is kept."""
    eval_every: int = 10
    patience: int = 3
    batch_size: int = 8
    """Validation examples per task per step of the learned merges."""
    learned_lr: float = 5e-2
    methods: tuple[str, ...] = field(default_factory=lambda: registered(ALL_METHODS))
    lora_rank: int | None = 8
    """Also fine-tune LoRA adapters of this rank and merge them with ``lora_methods`` (None: skip)."""
    lora_methods: tuple[str, ...] = field(default_factory=lambda: registered(LORA_METHODS))
    ood_train: int = 300
    ood_test: int = 200
    curve_task: str | None = "verb_sense"
    """One task fine-tuned on more and fewer examples: is the individual model near what more data gives?"""
    curve_sizes: tuple[int, ...] = (500, 1000, 3000)
    """Training-set sizes of the learning curve, besides ``n_train``."""
    hierarchical_fan_in: int | None = None
    """Also run hierarchical SuperMerge (the orchestrator's clustered tree, this fan-in) on the full
    fine-tunes, with the learned merges' budget at every node (None: skip)."""
    hierarchical_seeds: tuple[int, ...] = (0,)
    """Fewer seeds than the flat methods: a fan-in-2 tree over 6 tasks trains on 2.7x the task-steps."""

    def workload(self, lora_rank: int | None, n_train: int | None = None) -> WorkloadConfig:
        full = lora_rank is None
        return WorkloadConfig(tasks=self.tasks, n_train=n_train or self.n_train, n_val=self.n_val,
                              n_test=self.n_test, max_length=self.max_length,
                              epochs=self.epochs if full else self.lora_epochs, lr=self.lr if full else self.lora_lr,
                              lora_rank=lora_rank)


QUICK = BenchConfig(
    tasks=("language", "sentiment"), ood_tasks=("quote_topic",), n_train=48, n_test=32, max_length=32,
    seeds=(0,), steps=4, eval_every=2, patience=1, holdout=4, lora_rank=4, ood_train=40, ood_test=32,
    curve_task="language", curve_sizes=(24,),
)


@dataclass
class Run:
    """One merge: which, how it went, how well it does."""

    variant: str
    method: str
    seed: int
    test_accuracy: dict[str, float]
    ood_accuracy: dict[str, float]
    val_accuracy: dict[str, float]
    params: dict[str, Any]
    seconds: float
    peak_increase_bytes: int
    steps_used: int | None = None
    """The learned merges' step chosen by early stopping."""
    holdout_losses: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class BenchResults:
    config: dict[str, Any]
    machine: dict[str, Any]
    command: str
    started: str
    seconds: float = 0.0
    references: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    """variant -> row (pretrained / individual / majority) -> task -> accuracy."""
    ood_references: dict[str, dict[str, float]] = field(default_factory=dict)
    runs: list[Run] = field(default_factory=list)
    weights: dict[str, Any] = field(default_factory=dict)
    """SuperMerge's learned coefficients tanh(W) (seed 0, full fine-tunes): rows = tasks, cols = tensors."""
    finetunes: dict[str, dict[str, Any]] = field(default_factory=dict)
    """variant -> task -> {n_train, seconds (None when made before times were recorded), path}."""
    curve: list[dict[str, Any]] = field(default_factory=list)
    """The learning curve: {n_train, test_accuracy, seconds} per fine-tune of ``curve_task``."""
    segments: list[dict[str, Any]] = field(default_factory=list)
    """One entry per invocation that added runs ({started, seconds, runs}): a resumed benchmark's time is their sum."""


def machine_info() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "processor": platform.processor() or platform.machine(),
        "load_average": ", ".join(f"{x:.1f}" for x in os.getloadavg()),
    }


def method_params(method: str, config: BenchConfig) -> dict[str, Any]:
    """Learned merges get the same step budget and batch; grid methods search their default grids.

    AdaMerging's paper uses lr 1e-3 for 500 steps; at this benchmark's budget that barely moves its
    coefficients off 0.3, so it gets SuperMerge's lr (documented in the report)."""
    if method in LEARNED:
        return {"steps": config.steps, "batch_size": config.batch_size, "lr": config.learned_lr,
                "holdout": config.holdout, "eval_every": config.eval_every, "patience": config.patience}
    return {"search": True}  # a grid runs only when asked (issue 20)


@torch.no_grad()
def encoder_features(model: FunctionalModel, params: Mapping[str, torch.Tensor], data: TaskData) -> torch.Tensor:
    """The pooled [CLS] features the task heads read: an identity 'head' returns them unchanged."""
    hidden = model.module.config.hidden_size
    head = {"classifier.weight": torch.eye(hidden, device=model.device),
            "classifier.bias": torch.zeros(hidden, device=model.device)}
    return torch.cat([model.logits(params, head, b.to(model.device).inputs).cpu() for b in data.batches(64)])


def probe_accuracy(model: FunctionalModel, params: Mapping[str, torch.Tensor], train: TaskData, test: TaskData) -> float:
    """Accuracy of a logistic-regression probe on the (frozen) encoder's features: how well the merged
    encoder serves a task it was never merged for."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    probe.fit(encoder_features(model, params, train).numpy(), train.labels.numpy())
    return float(probe.score(encoder_features(model, params, test).numpy(), test.labels.numpy()))


def ood_data(config: BenchConfig, tokenizer) -> dict[str, tuple[TaskData, TaskData]]:
    out = {}
    for task in config.ood_tasks:
        parts = split(load_corpus(task), n_train=config.ood_train, n_val=0, n_test=config.ood_test, seed=0)
        out[task] = (tokenize(parts.train.texts, parts.train.labels, tokenizer, config.max_length),
                     tokenize(parts.test.texts, parts.test.labels, tokenizer, config.max_length))
    return out


def _floating(result: MergeResult, device: torch.device) -> dict[str, torch.Tensor]:
    return {n: t.to(device, torch.float32) for n, t in result.tensors.items() if t.is_floating_point()}


def _base_params(base_dir: Path) -> dict[str, torch.Tensor]:
    with open_checkpoint(base_dir) as base:
        return {n: base.get(n).float() for n in base.keys() if base.dtype(n).is_floating_point}


def run_variant(
    variant: str, tasks: Sequence[TaskModel], methods: Sequence[str], config: BenchConfig, workdir: Path,
    model: FunctionalModel, ood: Mapping[str, tuple[TaskData, TaskData]], results: BenchResults, *, progress: bool,
    checkpoint: Callable[[], None] | None = None,
) -> None:
    """Every method (x seeds) on one set of task models; appends Runs and reference rows to ``results``."""
    merge_config = load_config(write_merge_config(workdir / f"bench-{variant}.yaml", list(tasks), method="average",
                                                  output=f"merged/{variant}", max_length=config.max_length))
    scores = score_models(merge_config, {"pretrained": None, "individual": None}, progress=progress)
    val = load_split(merge_config.models, "validation", _tokenizer(), config.max_length)
    test = load_split(merge_config.models, "test", _tokenizer(), config.max_length)
    majority = {t: float(torch.bincount(d.labels).max()) / len(d) for t, d in test.items()}
    results.references[variant] = {**scores, "majority": majority}
    with open_checkpoint(merge_config.base) as base:
        vectors = load_task_vectors(base, merge_config.models, head_prefixes=merge_config.head_prefixes)
    done = {(r.method, r.seed) for r in results.runs if r.variant == variant}
    jobs = [(m, s) for s in config.seeds for m in sorted(methods, key=run_order)
            if (m in SEEDED or s == config.seeds[0]) and (m, s) not in done]
    for method, seed in tqdm(jobs, desc=f"merging ({variant})", disable=not progress, unit="merge"):
        with measure() as cost:
            result = merge(merge_config.base, vectors, method, params=method_params(method, config), val=val,
                           seed=seed, model=model, progress=progress)
        params = _floating(result, model.device)
        run = Run(
            variant=variant, method=method, seed=seed,
            test_accuracy=score_result(model, result, test),
            ood_accuracy={t: probe_accuracy(model, params, tr, te) for t, (tr, te) in ood.items()},
            val_accuracy=result.val_accuracy, params=_jsonable(result.params), seconds=cost.seconds,
            peak_increase_bytes=cost.peak_increase_bytes,
            steps_used=None if result.learned is None else result.learned.steps_used,
            holdout_losses=[] if result.learned is None else list(result.learned.holdout_losses),
        )
        results.runs.append(run)
        if checkpoint is not None:
            checkpoint()
        if method == "supermerge" and seed == config.seeds[0] and variant == "full" and result.learned is not None:
            results.weights = {"rows": [v.name for v in vectors], "groups": result.learned.groups,
                               "coefficients": result.learned.coefficients.tolist()}
        del result, params
    if variant == "full" and config.hierarchical_fan_in is not None:
        for seed in tqdm(config.hierarchical_seeds, desc="hierarchical supermerge", disable=not progress,
                         unit="tree"):
            if ("supermerge_hierarchical", seed) not in done:
                results.runs.append(run_hierarchical(merge_config, config, workdir, seed, model, test, ood))


def run_hierarchical(
    merge_config: MergeConfig, config: BenchConfig, workdir: Path, seed: int, model: FunctionalModel,
    test: Mapping[str, TaskData], ood: Mapping[str, tuple[TaskData, TaskData]], *,
    tree: TreeConfig | None = None, overrides: Mapping[str, Any] | None = None, name: str = "hierarchical",
) -> Run:
    """Hierarchical SuperMerge through the orchestrator (plan, then the executor, bottom-up through a
    fresh checkpoint store), scored from the model it publishes, like any saved merge. ``tree``: the
    tree settings (default: fan-in ``config.hierarchical_fan_in``); ``overrides``: SuperMerge parameters
    over the benchmark's (bench/tree_experiments.py varies both); ``name``: its output folder's."""
    from supermerge.orchestrator.executor import execute
    from supermerge.orchestrator.plan import plan

    params = {**method_params("supermerge", config), **(overrides or {})}
    tree_config = merge_config.model_copy(update={
        "method": "supermerge", "parameters": params, "seed": seed, "device": "cpu",
        "output": workdir / "merged" / f"{name}-seed{seed}",
        "tree": tree if tree is not None else TreeConfig(max_fan_in=config.hierarchical_fan_in),
    })
    store = workdir / "merged" / f"{name}-seed{seed}.store"
    if store.exists():
        shutil.rmtree(store)  # measure the whole tree, not a resumed one
    with measure() as cost:
        the_plan = plan(tree_config)
        execute(the_plan, store_dir=store, overwrite=True)
    with open_checkpoint(tree_config.base) as base:
        names = mergeable_names(base)
        merged = load_task_vector(base, tree_config.output, name="hierarchical",
                                  head_prefixes=tree_config.head_prefixes)
        tensors = {n: t.to(model.device) for n, t in model_params(base, merged, names).items()}
    heads = {t: {n: x.to(model.device) for n, x in h.items()} for t, h in merged.heads.items()}
    return Run(
        variant="full", method="supermerge_hierarchical", seed=seed, steps_used=None,
        test_accuracy=evaluate(model, tensors, heads, {t: d for t, d in test.items() if t in heads}),
        ood_accuracy={t: probe_accuracy(model, tensors, tr, te) for t, (tr, te) in ood.items()},
        val_accuracy=execute_root_val(tree_config.output),
        params={**_jsonable(params), "transform": "tanh", "fan_in": the_plan.fan_in,
                "tree": json.dumps(the_plan.tree.nested()), "merge_nodes": len(the_plan.nodes),
                "depth": the_plan.tree.depth, "shape": the_plan.shape},
        seconds=cost.seconds, peak_increase_bytes=cost.peak_increase_bytes,
    )


def execute_root_val(output: Path) -> dict[str, float]:
    """The root node's validation accuracy, from the report the executor publishes with the model."""
    report = json.loads((output / "merge_report.json").read_text())
    return dict(report["nodes"][-1]["val_accuracy"])


_TOKENIZER = None


def _tokenizer():
    global _TOKENIZER
    if _TOKENIZER is None:
        from transformers import AutoTokenizer

        _TOKENIZER = AutoTokenizer.from_pretrained(minilm_dir())
    return _TOKENIZER


def _jsonable(params: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v if isinstance(v, (int, float, str, bool, type(None))) else str(v) for k, v in params.items()}


def prepare_finetunes(
    config: BenchConfig, workdir: Path, cache: Path | None, *, progress: bool,
) -> tuple[dict[str, list[TaskModel]], list[TaskModel]]:
    """Every fine-tune the benchmark merges (per variant) and the learning curve's (built when not in
    ``cache``, default ``workdir/models``): run alone first, this builds the cache."""
    variants = {"full": prepare_workload(workdir, config.workload(None), progress=progress, cache=cache)}
    if config.lora_rank is not None:
        variants[f"lora{config.lora_rank}"] = prepare_workload(workdir, config.workload(config.lora_rank),
                                                               progress=progress, cache=cache)
    curve = []
    if config.curve_task is not None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
        for n in sorted({*config.curve_sizes, config.n_train}):
            workload = dataclasses.replace(config.workload(None, n), tasks=(config.curve_task,))
            curve.append(prepare_task(workdir / "curve", config.curve_task, workload, tokenizer, progress=progress,
                                      cache=cache))
    return variants, curve


def finetune_records(tasks: Sequence[TaskModel]) -> dict[str, dict[str, Any]]:
    return {t.name: {"n_train": t.n_train, "seconds": finetune_seconds(t), "path": t.path.name} for t in tasks}


def score_curve(curve: Sequence[TaskModel], model: FunctionalModel, max_length: int) -> list[dict[str, Any]]:
    """Test accuracy of each learning-curve fine-tune on its task's test split (the same for all)."""
    out = []
    with open_checkpoint(minilm_dir()) as base:
        names = mergeable_names(base)
        for t in curve:
            test = load_task_data(t.test, _tokenizer(), max_length)
            vector = load_task_vector(base, t.path, name=t.name)
            tensors = {n: x.to(model.device) for n, x in model_params(base, vector, names).items()}
            acc = evaluate(model, tensors, vector.heads, {t.name: test})[t.name]
            out.append({"n_train": t.n_train, "test_accuracy": acc, "seconds": finetune_seconds(t)})
    return out


RESUMABLE = frozenset({"methods", "lora_methods", "seeds", "lora_rank", "curve_task", "curve_sizes",
                       "hierarchical_fan_in", "hierarchical_seeds"})
"""Settings a resumed run may change: each only adds merges (methods registered since, more seeds, the
LoRA variant, the learning curve, the hierarchical run) to what was measured, which the resumed run keeps."""


def run_benchmark(
    config: BenchConfig, workdir: Path, *, command: str, progress: bool = True, partial: Path | None = None,
    cache: Path | None = None, resume: BenchResults | None = None,
) -> BenchResults:
    """Run everything; with ``partial``, the results so far are saved there after each merge, so a
    crash late in the run keeps what was measured, and ``resume`` (those results, same config) skips
    the merges they hold: the total time is then the sum of the segments."""
    started = time.perf_counter()
    now = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    if resume is not None:
        ours = json.loads(json.dumps(dataclasses.asdict(config)))  # tuples as the saved results' lists
        theirs = dict(resume.config)
        differ = sorted(k for k in ours if k not in RESUMABLE and ours[k] != theirs.get(k))
        if differ:
            raise ValueError(f"--resume: the partial results were made with other settings ({', '.join(differ)}); "
                             "run without --resume")
        if config.curve_task is None and resume.curve:  # --no-curve skips building the curve, not what was measured
            ours.update(curve_task=theirs["curve_task"], curve_sizes=theirs["curve_sizes"])
        results = dataclasses.replace(resume, config=ours)
    else:
        results = BenchResults(config=dataclasses.asdict(config), machine=machine_info(), command=command,
                               started=now)
    before = len(results.runs)
    segment = {"started": now, "seconds": 0.0, "runs": 0, "command": command}
    results.segments.append(segment)

    def checkpoint() -> None:
        """Bring this invocation's time and run count up to date; save the partial results."""
        segment.update(seconds=time.perf_counter() - started, runs=len(results.runs) - before)
        results.seconds = sum(seg["seconds"] for seg in results.segments)
        if partial is not None:
            save_results(results, partial)

    workdir.mkdir(parents=True, exist_ok=True)
    variants, curve = prepare_finetunes(config, workdir, cache, progress=progress)
    results.finetunes = {v: finetune_records(ts) for v, ts in variants.items()}
    model = FunctionalModel(minilm_dir())
    if curve:
        results.curve = score_curve(curve, model, config.max_length)
    ood = ood_data(config, _tokenizer())
    base = {n: p.to(model.device) for n, p in _base_params(minilm_dir()).items()}
    results.ood_references = {"pretrained": {t: probe_accuracy(model, base, tr, te) for t, (tr, te) in ood.items()}}
    for variant, tasks in variants.items():
        methods = config.methods if variant == "full" else config.lora_methods
        run_variant(variant, tasks, methods, config, workdir, model, ood, results, progress=progress,
                    checkpoint=checkpoint)
    checkpoint()
    return results


def load_results(path: Path) -> BenchResults:
    """Results saved by ``save_results``, as the dataclasses they were."""
    raw = json.loads(path.read_text())
    raw["runs"] = [Run(**r) for r in raw["runs"]]
    return BenchResults(**raw)


def save_results(results: Any, path: Path) -> Path:
    """A results dataclass as JSON, replaced whole (a killed run leaves the previous file); the
    benchmark's, bench/val_size.py's and bench/tree_experiments.py's."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(dataclasses.asdict(results), indent=1, sort_keys=True))
    tmp.replace(path)
    return path


def recorded_command(argv: Sequence[str]) -> str:
    """The command saved with a segment, without ``--resume`` / ``--resume-from PATH``: the report adds
    ``--resume`` to every later segment, which continues from the results so far whichever file held them."""
    kept, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--resume-from":
            skip = True
        elif a != "--resume" and not a.startswith("--resume-from="):
            kept.append(a)
    return " ".join(["python -m bench.benchmark", *kept])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.benchmark", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 tasks, few steps (the smoke test's size)")
    parser.add_argument("--workdir", type=Path, default=Path("bench-work"),
                        help="fine-tuned models and data are cached here (default ./bench-work)")
    parser.add_argument("--out", type=Path, default=Path("docs"),
                        help="where benchmarks.md, benchmark_results.json and img/ go (default ./docs)")
    parser.add_argument("--seeds", type=int, nargs="+", help="override the seeds (default 0 1 2)")
    parser.add_argument("--cache", type=Path, default=None,
                        help="fine-tuned models are kept and reused here (default WORKDIR/models)")
    parser.add_argument("--finetune-only", action="store_true",
                        help="build the fine-tunes (fill the cache) and stop")
    parser.add_argument("--resume", action="store_true",
                        help="keep the merges of WORKDIR/benchmark_results.partial.json and run only the rest")
    parser.add_argument("--resume-from", type=Path, default=None, metavar="RESULTS",
                        help="like --resume, but keep the merges of this results file (e.g. "
                             "docs/benchmark_results.json, when the workdir's partial file is gone)")
    parser.add_argument("--no-lora", action="store_true", help="skip the LoRA variant (a later --resume can add it)")
    parser.add_argument("--no-curve", action="store_true",
                        help="skip the learning curve (a later --resume can add it; a resumed run keeps one "
                             "measured before)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default torch's: one per core); 1 is faster on a machine other "
                             "jobs share")
    parser.add_argument("--hierarchical-fan-in", type=int, default=None, metavar="F",
                        help="also run hierarchical SuperMerge, the planner's balanced tree of this fan-in")
    parser.add_argument("--methods", nargs="+", default=None,
                        help="only these methods (default: every registered one the benchmark knows)")
    parser.add_argument("--lora-methods", nargs="+", default=None,
                        help="only these methods on the LoRA adapters (default: every registered one of "
                             "bench/methods.py's LORA_METHODS)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    config = QUICK if args.quick else BenchConfig()
    if args.seeds:
        config = dataclasses.replace(config, seeds=tuple(args.seeds))
    if args.no_lora:
        config = dataclasses.replace(config, lora_rank=None)
    if args.no_curve:
        config = dataclasses.replace(config, curve_task=None)
    if args.hierarchical_fan_in:
        config = dataclasses.replace(config, hierarchical_fan_in=args.hierarchical_fan_in)
    if args.methods:
        unknown = sorted(set(args.methods) - set(ALL_METHODS))
        if unknown:
            parser.error(f"unknown method(s) {unknown}; the benchmark knows {list(ALL_METHODS)}")
        config = dataclasses.replace(config, methods=tuple(m for m in ALL_METHODS if m in args.methods))
    if args.lora_methods:
        unknown = sorted(set(args.lora_methods) - set(LORA_METHODS))
        if unknown:
            parser.error(f"--lora-methods: {unknown} not run on LoRA adapters; the benchmark's are {list(LORA_METHODS)}")
        config = dataclasses.replace(config, lora_methods=tuple(m for m in LORA_METHODS if m in args.lora_methods))
    if args.finetune_only:
        start = time.perf_counter()
        prepare_finetunes(config, args.workdir, args.cache, progress=True)
        print(f"fine-tunes ready in {(time.perf_counter() - start) / 60:.1f} min")
        return 0
    if args.resume_from is not None and not args.resume_from.is_file():
        parser.error(f"--resume-from {args.resume_from}: no such results file (benchmark_results.json of an earlier run)")
    command = recorded_command(argv if argv is not None else sys.argv[1:])
    partial = args.workdir / "benchmark_results.partial.json"
    if args.resume_from is not None:
        resume = load_results(args.resume_from)
    else:
        resume = load_results(partial) if args.resume and partial.exists() else None
    results = run_benchmark(config, args.workdir, command=command, partial=partial, cache=args.cache,
                            resume=resume)
    from bench.report import write_report

    save_results(results, args.out / "benchmark_results.json")
    doc = write_report(results, args.out)
    print(f"benchmark done in {results.seconds / 60:.1f} min -> {doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
