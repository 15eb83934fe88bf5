"""The one node runner: merge one node's children into the checkpoint store.

``run_node`` is a plain function of small, JSON-able inputs (a ``NodeTask`` of paths, ids and dicts,
and the store), with no global state, so the plain executor and a Prefect task call the same code. It
loads only its children's task vectors (a merged child is read back from the store as a fine-tuned
model serving every task of its subtree), trains on only its subtree's validation data, writes the
result atomically under the node's key, and returns a small record of what it cost.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor

from merge_core.checkpoint import open_checkpoint
from merge_core.config import ModelEntry
from merge_core.data import TaskData, load_task_data
from merge_core.job import load_task_vectors, load_tokenizer
from merge_core.merge import merge, save_result
from orchestrator.errors import StoreError
from orchestrator.measure import PeakMeter, return_large_blocks_promptly
from orchestrator.store import KEY_FIELD, CheckpointStore, data_digest

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ChildRef:
    """One input of a merge node: a task model (``path`` set) or a merge node in the store (``path``
    None: it is read from ``store.path(key)``)."""

    name: str
    key: str
    path: str | None = None


@dataclass(frozen=True)
class NodeTask:
    """Everything one merge node needs, as plain data (what a Prefect task receives).

    ``tasks``: the task models of the node's subtree; ``validation``: task -> validation data file,
    for those tasks; ``data_digest``: the digest of that data when planned (checked again when run);
    ``predicted``: the memory planner's per-term prediction (bytes) for ``device``.
    """

    id: str
    key: str
    children: tuple[ChildRef, ...]
    tasks: tuple[str, ...]
    validation: dict[str, str]
    base: str
    method: str
    parameters: dict[str, Any]
    kind: str
    seed: int
    max_length: int
    head_prefixes: tuple[str, ...]
    data_digest: str
    device: str
    predicted: dict[str, int] = field(default_factory=dict)

    @property
    def predicted_peak_bytes(self) -> int:
        """The prediction the measured peak is compared with: the GPU's share on a GPU, else all."""
        return int(self.predicted.get("peak", 0))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> NodeTask:
        raw = dict(raw)
        raw["children"] = tuple(ChildRef(**c) for c in raw["children"])
        raw["tasks"] = tuple(raw["tasks"])
        raw["head_prefixes"] = tuple(raw["head_prefixes"])
        return cls(**raw)


@dataclass(frozen=True)
class NodeRecord:
    """What running a node cost and gave. Bytes and seconds; ``measured_peak_bytes`` is the node's
    peak on its device (host RSS growth on CPU, CUDA's peak allocation on a GPU), over loading its
    inputs and merging (writing the result, which holds less, is not in the window). ``cached``: the
    node was already finished in the store and was not recomputed (the numbers are from its run)."""

    id: str
    key: str
    path: str
    device: str
    seconds: float
    predicted_peak_bytes: int
    measured_peak_bytes: int
    measured_host_peak_bytes: int
    peak_method: str
    val_accuracy: dict[str, float]
    cached: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def child_path(child: ChildRef, store: CheckpointStore) -> Path:
    return Path(child.path) if child.path is not None else store.path(child.key)


def load_validation(node: NodeTask) -> dict[str, TaskData]:
    """The node's subtree's validation data, checked against the digest it was planned with."""
    if not node.validation:
        return {}
    tokenizer = load_tokenizer(node.base)
    val = {t: load_task_data(p, tokenizer, node.max_length) for t, p in sorted(node.validation.items())}
    if data_digest(val) != node.data_digest:
        raise StoreError(
            f"node {node.id}: the validation data of {sorted(val)} changed since the plan was made; "
            "plan again (supermerge plan) so the node's key matches its data"
        )
    return val


def _unpinned(heads: dict[str, dict[str, Tensor]]) -> dict[str, dict[str, Tensor]]:
    """Copies of the heads: as read, they are views into their checkpoint's memory map, and a view
    keeps the whole file mapped, so each loaded model would hold its file's pages (a model's size of
    RSS) until the merge ends."""
    return {t: {n: x.clone() for n, x in h.items()} for t, h in heads.items()}


def cached_record(node: NodeTask, store: CheckpointStore) -> NodeRecord | None:
    """The record of a node already finished in the store, or None."""
    record = store.record(node.key)
    if record is None:
        return None
    ran = record.get("node", {})
    return NodeRecord(
        id=node.id,
        key=node.key,
        path=str(store.path(node.key)),
        device=str(ran.get("device", node.device)),
        seconds=float(ran.get("seconds", 0.0)),
        predicted_peak_bytes=node.predicted_peak_bytes,
        measured_peak_bytes=int(ran.get("measured_peak_bytes", 0)),
        measured_host_peak_bytes=int(ran.get("measured_host_peak_bytes", 0)),
        peak_method=str(ran.get("peak_method", "")),
        val_accuracy=dict(record.get("val_accuracy", {})),
        cached=True,
    )


def run_node(node: NodeTask, store: CheckpointStore, *, progress: bool = False) -> NodeRecord:
    """Merge ``node``'s children into ``store`` (a finished node is returned from the store as is)."""
    finished = cached_record(node, store)
    if finished is not None:
        log.info("%s: finished in the store (%s); not recomputed", node.id, finished.path)
        return finished
    for c in node.children:
        if c.path is None and not store.is_finished(c.key):
            raise StoreError(
                f"node {node.id}: its input {c.name} is not finished in the store {store.root}; "
                "run the nodes in dependency order (children first)"
            )
    entries = [ModelEntry(name=c.name, path=child_path(c, store)) for c in node.children]
    return_large_blocks_promptly()
    started = time.perf_counter()
    with PeakMeter(node.device) as meter:
        val = load_validation(node)
        with open_checkpoint(node.base) as base:
            vectors = load_task_vectors(base, entries, head_prefixes=node.head_prefixes, progress=progress)
        for v in vectors:
            v.heads = _unpinned(v.heads)
        result = merge(
            node.base, vectors, node.method, params=node.parameters, val=val, kind=node.kind,  # type: ignore[arg-type]
            seed=node.seed, device=node.device, progress=progress,
        )
        del vectors
    seconds = time.perf_counter() - started
    reading = meter.reading
    assert reading is not None
    record = NodeRecord(
        id=node.id,
        key=node.key,
        path=str(store.path(node.key)),
        device=node.device,
        seconds=round(seconds, 3),
        predicted_peak_bytes=node.predicted_peak_bytes,
        measured_peak_bytes=reading.device_bytes if reading.device_bytes is not None else reading.host_bytes,
        measured_host_peak_bytes=reading.host_bytes,
        peak_method="cuda_max_allocated" if reading.device_bytes is not None else reading.method,
        val_accuracy=dict(result.val_accuracy),
    )
    save_result(
        result, store.path(node.key), base_path=node.base,
        models={e.name: str(e.path) for e in entries}, overwrite=store.occupied(node.key),
        extra_record={KEY_FIELD: node.key, "node": record.to_dict(), "predicted": node.predicted},
    )
    log.info("%s: merged %d inputs in %.1f s, peak %.0f MB (predicted %.0f MB)", node.id, len(entries),
             seconds, record.measured_peak_bytes / 2**20, node.predicted_peak_bytes / 2**20)
    return record
