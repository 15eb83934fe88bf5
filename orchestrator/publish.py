"""Publishing: the finished root of a merge tree put at the output, with ``merge_report.json``.

The last step of every run, whichever way its nodes ran (the plain executor or the Prefect flow, in
this process or on work pools), so every run's output looks the same and the next run can grow its
tree (supermerge.orchestrator.incremental reads the report). Hard links where the filesystem allows,
else copies; atomic: a temporary sibling renamed into place.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from supermerge.merge_core.checkpoint import RECORD_FILE, move_into_place, refuse_existing
from supermerge.merge_core.task_vectors import check_finite_model
from supermerge.orchestrator.errors import StoreError
from supermerge.orchestrator.node import NodeRecord
from supermerge.orchestrator.plan import MergePlan
from supermerge.orchestrator.store import Store

log = logging.getLogger(__name__)

REPORT_FILE = "merge_report.json"


@dataclass(frozen=True)
class ExecutionReport:
    """What a run produced: the output dir, the store it used, one record per merge node, and the
    final model's chosen parameters and accuracies (validation: the root's; test: scored at the end)."""

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


def publish(
    plan: MergePlan,
    store: Store,
    records: Sequence[NodeRecord],
    seconds: float,
    *,
    overwrite: bool,
    test_accuracy: Mapping[str, float] | None = None,
) -> ExecutionReport:
    """Put the finished root at the config's output with ``merge_report.json`` (the plan, and per node
    predicted vs measured peak, device, seconds, validation accuracy) and a ``supermerge.json`` that
    holds the resolved config; ``test_accuracy``: the root's, when it was scored."""
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
    _put_in_place(Path(store.path(plan.root.key)), config.output, {**report.to_dict(), "config": config.resolved()},
                  record=record, overwrite=overwrite)
    return report


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _put_in_place(root_dir: Path, output: Path, report: dict[str, Any], *, record: dict[str, Any],
                  overwrite: bool) -> None:
    """The root's files at ``output`` with the report, atomically; ``record`` replaces the stored
    ``supermerge.json``. Store files are never changed in place (a node is rewritten only by renaming a
    new dir over it), so hard links are safe; the files written here are new files, not links.

    The output was checked before any work (run.check_output); it is checked again here because a
    rename replaces an existing dir, and another process may have published there meanwhile."""
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
