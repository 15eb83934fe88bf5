"""The plain executor: run a plan's merge nodes bottom-up through the checkpoint store.

Nodes run one after another in the plan's order (every node after its children), each through the
same ``run_node`` a Prefect task calls. A node already finished in the store is loaded, not recomputed,
so a killed run started again resumes where it stopped and gives the same bytes. At the end the root's
model is published to the config's ``output`` (hard links where the filesystem allows, else copies;
atomic: a temporary sibling renamed into place) with ``merge_report.json``: the plan, and predicted vs
measured peak, device, seconds and validation accuracy per node. The final model is scored on the
config's test data, and its ``supermerge.json`` gets the resolved config.

Siblings are not run in parallel: one node at a time keeps each node's measured peak its own (the
memory planner's budget is per node).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from supermerge.merge_core.checkpoint import RECORD_FILE, move_into_place, open_checkpoint, refuse_existing
from supermerge.merge_core.config import MergeConfig
from supermerge.merge_core.errors import DataError
from supermerge.merge_core.evaluate import evaluate
from supermerge.merge_core.job import DataCache
from supermerge.merge_core.model import FunctionalModel
from supermerge.merge_core.task_vectors import check_finite_model, load_stored_heads, mergeable_names
from supermerge.orchestrator.errors import StoreError
from supermerge.orchestrator.node import NodeRecord, NodeTask, cached_record, run_node
from supermerge.orchestrator.plan import MergePlan
from supermerge.orchestrator.store import Store
from supermerge.orchestrator.stores import open_store

log = logging.getLogger(__name__)

REPORT_FILE = "merge_report.json"
STORE_DIR = ".supermerge-store"

NodeRunner = Callable[[NodeTask, Store], NodeRecord]
"""What runs one node: ``run_node`` (the default), or a wrapper around it."""


@dataclass(frozen=True)
class ExecutionReport:
    """What a run produced: the output dir, the store it used, one record per merge node, and the
    final model's chosen parameters and accuracies (validation: the root's; test: scored here)."""

    output: Path
    store: Path
    nodes: list[NodeRecord]
    seconds: float
    plan: dict[str, Any]
    params: dict[str, Any] = field(default_factory=dict)
    val_accuracy: dict[str, float] = field(default_factory=dict)
    test_accuracy: dict[str, float] = field(default_factory=dict)
    store_location: str | None = None
    """The store as a worker opens it (an ``s3://`` URL, whose local cache ``store`` is); None: ``store``."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "output": str(self.output),
            "store": self.store_location or str(self.store),
            "seconds": round(self.seconds, 3),
            "params": self.params,
            "val_accuracy": self.val_accuracy,
            "test_accuracy": self.test_accuracy,
            "nodes": [
                {**r.to_dict(), "measured_over_predicted": round(r.measured_peak_bytes / r.predicted_peak_bytes, 3)
                 if r.predicted_peak_bytes else None}
                for r in self.nodes
            ],
            "plan": self.plan,
        }


def default_store_dir(output: Path) -> Path:
    """The store beside the output, shared by every output in that folder (keys are by content)."""
    return output.parent / STORE_DIR


def store_location(config: MergeConfig, store: str | Path | None = None) -> str | Path:
    """Where a run's store is: ``store`` (a folder or ``s3://`` URL), else the config's ``store``, else
    the folder beside the output. One answer for merge, plan and prune."""
    chosen = store if store is not None else config.store
    return chosen if chosen is not None else default_store_dir(config.output)


def config_store(config: MergeConfig, store: str | Path | None = None) -> Store:
    """The store a run uses (``store_location``), opened."""
    return open_store(store_location(config, store))


def execute(
    plan: MergePlan,
    *,
    store_dir: str | Path | None = None,
    overwrite: bool = False,
    runner: NodeRunner | None = None,
    progress: bool = False,
) -> ExecutionReport:
    """Run ``plan`` bottom-up; publish the root to the config's output with ``merge_report.json``.

    ``runner`` runs one node that is not finished in the store (default ``run_node``); finished nodes
    are never handed to it. Test data in the config is scored on the final model.
    """
    output = plan.config.output
    refuse_existing(output, overwrite=overwrite)
    store = config_store(plan.config, store_dir)
    run = runner if runner is not None else (lambda node, s: run_node(node, s, progress=progress, data=plan.data))
    started = time.perf_counter()
    records: list[NodeRecord] = []
    for node in tqdm(plan.nodes, desc="merge tree", disable=not progress, unit="node"):
        done = cached_record(node, store)
        if done is not None:
            log.info("%s: already in the store; loading it", node.id)
        records.append(done if done is not None else run(node, store))
    root_dir = store.path(plan.root.key)
    stored = store.record(plan.root.key)
    if stored is None:
        raise StoreError(f"the root {plan.root.id} is not finished in {store.root} after running every node; "
                         "the node runner did not write it")
    test_accuracy = score_model(plan.config, root_dir, plan.root.device, progress=progress, data=plan.data)
    return finish(plan, store, records, time.perf_counter() - started, overwrite=overwrite,
                  test_accuracy=test_accuracy)


def finish(
    plan: MergePlan,
    store: Store,
    records: Sequence[NodeRecord],
    seconds: float,
    *,
    overwrite: bool,
    test_accuracy: Mapping[str, float] | None = None,
) -> ExecutionReport:
    """Publish the finished root to the config's output with ``merge_report.json``: the last step of every
    run, whichever way its nodes ran (``execute`` here, or the Prefect flow); ``test_accuracy``: the
    root's, when it was scored."""
    config = plan.config
    stored = store.record(plan.root.key)
    if stored is None:
        raise StoreError(f"the root {plan.root.id} is not finished in {store.root}; run every node first")
    test = dict(test_accuracy or {})
    report = ExecutionReport(config.output, store.root, list(records), seconds, plan.to_dict(),
                             dict(stored.get("params", {})), dict(stored.get("val_accuracy", {})), test,
                             store_location=store.location)
    record: dict[str, Any] = {**stored, "config": config.resolved(), "test_accuracy": test,
                              "tree": plan.tree.nested(), "report": REPORT_FILE}
    publish(Path(store.path(plan.root.key)), config.output, {**report.to_dict(), "config": config.resolved()},
            record=record, overwrite=overwrite)
    return report


def score_model(config: MergeConfig, model_dir: Path, device: str, *, progress: bool = False,
                data: DataCache | None = None) -> dict[str, float]:
    """Test accuracy of a merged model dir on every config task with test data (each with its head
    from ``heads/``); empty when no model has test data. ``data``: the run's data files (the plan's,
    which read the test data already)."""
    test = (data if data is not None else DataCache()).split(config.models, "test", config.base, config.max_length)
    if not test:
        return {}
    heads = load_stored_heads(model_dir)
    missing = sorted(set(test) - set(heads))
    if missing:
        raise DataError(f"{model_dir} has no head for task(s) {missing} under heads/, so their test data "
                        "cannot be scored; was it merged from these models?")
    model = FunctionalModel(config.base, config.kind, device)
    with open_checkpoint(config.base) as base, open_checkpoint(model_dir) as merged:
        params = {n: merged.get(n).to(model.device, torch.float32) for n in mergeable_names(base)}
    on_device = {t: {n: x.to(model.device) for n, x in heads[t].items()} for t in test}
    return evaluate(model, params, on_device, test)


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def publish(
    root_dir: Path, output: Path, report: dict[str, Any], *, record: dict[str, Any], overwrite: bool
) -> Path:
    """Put the root's model at ``output`` with the report, atomically; ``record`` replaces the stored
    ``supermerge.json``. Store files are never changed in place (a node is rewritten only by renaming a
    new dir over it), so hard links are safe; the files written here are new files, not links."""
    refuse_existing(output, overwrite=overwrite)
    check_finite_model(root_dir, f"the merged model {root_dir}")  # a store entry written before the checks
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".partial", dir=output.parent))
    try:
        for src in sorted(root_dir.rglob("*")):
            dst = tmp / src.relative_to(root_dir)
            if dst == tmp / RECORD_FILE:
                continue
            if src.is_dir():
                dst.mkdir(parents=True, exist_ok=True)
            else:
                dst.parent.mkdir(parents=True, exist_ok=True)
                _link_or_copy(src, dst)
        (tmp / RECORD_FILE).write_text(json.dumps(record, indent=2, sort_keys=True, default=str))
        (tmp / REPORT_FILE).write_text(json.dumps(report, indent=2, sort_keys=True, default=str))
        move_into_place(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("published %s -> %s", root_dir, output)
    return output
