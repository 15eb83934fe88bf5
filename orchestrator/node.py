"""The one node runner: merge one node's children into the checkpoint store.

``run_node`` is a plain function of small, JSON-able inputs (a ``NodeTask`` of paths, ids and dicts,
and the store), with no global state, so the plain executor and a Prefect task call the same code. It
loads only its children's task vectors (a merged child is read back from the store as a fine-tuned
model serving every task of its subtree), trains on only its subtree's validation data, writes the
result atomically under the node's key (then ``store.publish``: an S3 store uploads it, manifest
last), and returns a small record of what it cost.

Faults: the node is computed under the store's exclusive lock on its key (a second run of the same
node waits, then reuses it) and reads its merged inputs under shared locks. A damaged store entry is
reported and merged again. A measured peak above the prediction by more than the planner's margin
is logged and flagged in the record (``over_prediction``); running out of memory fails the node with
a ``NodeOutOfMemoryError`` that names it, its prediction and what to change.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from supermerge.merge_core.checkpoint import open_checkpoint
from supermerge.merge_core.config import ModelEntry
from supermerge.merge_core.data import TaskData
from supermerge.merge_core.job import DataCache, load_task_vectors
from supermerge.merge_core.merge import input_compressor, merge, save_result
from supermerge.merge_core.peak import PeakBytes
from supermerge.merge_core.stream import stream_merge, streamable
from supermerge.merge_core.task_vectors import check_finite_result
from supermerge.orchestrator.errors import NodeOutOfMemoryError, StoreError
from supermerge.orchestrator.measure import STREAM_MMAP_THRESHOLD_BYTES, PeakMeter, PeakReading, return_large_blocks_promptly
from supermerge.orchestrator.budget import exceeds_prediction, prediction_margin
from supermerge.orchestrator.sizes import format_bytes
from supermerge.orchestrator.store import KEY_FIELD, Store, data_digest

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
    ``predicted``: the memory planner's per-term prediction (bytes) for ``device`` (a dict in ``to_dict``).
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
    predicted: PeakBytes | None = None
    task_vector_device: str | None = None
    """Where a learned merge keeps its stacked task vectors: None for ``device``, 'cpu' when the
    planner put the model on a GPU that cannot also hold k task vectors (pinned host memory)."""
    out_dtype: str | None = None
    """The dtype the node writes its merged tensors in (the config's ``out_dtype``, root only); None:
    the base's."""
    label_ids: dict[str, dict[str, int]] = field(default_factory=dict)
    """task -> {class name: class id} from each task's fine-tune (``supermerge.merge_core.labels``), for validation
    data that gives labels by name; tasks whose fine-tune names no classes are left out."""

    @property
    def predicted_peak_bytes(self) -> int:
        """The prediction the measured peak is compared with: the GPU's share on a GPU, else all."""
        return self.predicted.peak if self.predicted is not None else 0

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON data: what a Prefect task receives (``from_dict`` reads it back)."""
        return {**dataclasses.asdict(self), "predicted": self.predicted.to_dict() if self.predicted else {}}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> NodeTask:
        raw = dict(raw)
        raw["predicted"] = PeakBytes.from_dict(raw["predicted"]) if raw.get("predicted") else None
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
    over_prediction: bool = False
    """The measured peak exceeded the prediction by more than the planner's margin
    (``supermerge.orchestrator.budget.exceeds_prediction``)."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def child_path(child: ChildRef, store: Store) -> Path:
    return Path(child.path) if child.path is not None else store.path(child.key)


def load_validation(node: NodeTask, data: DataCache | None = None) -> dict[str, TaskData]:
    """The node's subtree's validation data, checked against the digest it was planned with. ``data``:
    the run's data files (read once per run; a node run on its own reads them here)."""
    if not node.validation:
        return {}
    data = data if data is not None else DataCache()
    val = {t: data.load(p, node.base, node.max_length, node.label_ids.get(t)) for t, p in sorted(node.validation.items())}
    if data_digest(val) != node.data_digest:
        raise StoreError(
            f"node {node.id}: the validation data of {sorted(val)} changed since the plan was made; "
            "plan again (supermerge plan) so the node's key matches its data"
        )
    return val


def cached_record(node: NodeTask, store: Store) -> NodeRecord | None:
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
        over_prediction=bool(ran.get("over_prediction", False)),
    )


OUT_OF_MEMORY_MESSAGES = (
    "DefaultCPUAllocator: can't allocate memory",
    "CUDA out of memory",
    "CUDA error: out of memory",
)
"""How torch words an allocation that failed, when it raises a plain RuntimeError."""


def out_of_memory(e: BaseException) -> bool:
    """``e`` is an allocation that failed: Python's MemoryError, torch's OutOfMemoryError, or a
    RuntimeError in one of OUT_OF_MEMORY_MESSAGES' words."""
    if isinstance(e, (MemoryError, torch.OutOfMemoryError)):
        return True
    return isinstance(e, RuntimeError) and any(m in str(e) for m in OUT_OF_MEMORY_MESSAGES)


def run_node(node: NodeTask, store: Store, *, progress: bool = False, data: DataCache | None = None) -> NodeRecord:
    """Merge ``node``'s children into ``store`` (a finished node is returned from the store as is).
    ``data``: the run's data files, read once per run (the plan's ``MergePlan.data``).

    Raises NodeOutOfMemoryError when the node runs out of memory, StoreError when an input is not
    finished in the store."""
    finished = cached_record(node, store)
    if finished is not None:
        log.info("%s: finished in the store (%s); not recomputed", node.id, finished.path)
        return finished
    with store.lock(node.key):
        finished = cached_record(node, store)
        if finished is not None:
            log.info("%s: finished in the store by another run while this one waited; not recomputed", node.id)
            return finished
        problem = store.problem(node.key)
        if problem is not None:
            log.warning("%s: the store entry %s is not usable (%s); merging the node again",
                        node.id, store.path(node.key), problem)
        failure = None
        try:
            return _merge_node(node, store, progress, data)
        except (MemoryError, RuntimeError) as e:
            if not out_of_memory(e):
                raise
            failure = f"{type(e).__name__}: {str(e).splitlines()[0]}" if str(e) else type(e).__name__
        # raised here, outside the handler, so the new error holds no reference to the failed frames
        # and the tensors they held are freed before the next node runs
        gc.collect()
        if node.device.startswith("cuda"):
            torch.cuda.empty_cache()
        raise NodeOutOfMemoryError(_out_of_memory_message(node, failure))


def _out_of_memory_message(node: NodeTask, failure: str) -> str:
    k = len(node.children)
    advice = (f"run again with a smaller fan-in (--max-fan-in {k - 1}, or tree.max_fan_in), or a smaller "
              "--memory-budget so the planner chooses one" if k > 2 else
              "fan-in 2 is the smallest tree: free memory, use fewer or shorter validation examples per step "
              "(parameters.batch_size, max_length), or run on a machine with more memory")
    return (
        f"node {node.id} ({k} inputs, {len(node.tasks)} tasks) ran out of memory on {node.device} ({failure}); "
        f"the planner predicted a peak of {format_bytes(node.predicted_peak_bytes)}: the node needed more, or "
        f"other work took the memory. Nodes finished before it are kept in the store and reused; {advice}"
    )


def _merge_node(node: NodeTask, store: Store, progress: bool, data: DataCache | None) -> NodeRecord:
    """Load the children (each merged one under a shared lock, checked before it is read), merge,
    and write the result under the node's key (the caller holds its exclusive lock)."""
    with ExitStack() as held:
        for c in node.children:
            if c.path is None:
                held.enter_context(store.lock(c.key, shared=True))
                if not store.is_finished(c.key):
                    why = store.problem(c.key) or "nothing is there"
                    raise StoreError(
                        f"node {node.id}: its input {c.name} is not finished in the store {store.root} ({why}); "
                        "run the nodes in dependency order (children first): a damaged input is merged again "
                        "by the next run"
                    )
        # not validated as a user's entry: a merged child is named after its node (merge-a+b), which
        # a model name may not be
        entries = [ModelEntry.model_construct(name=c.name, path=child_path(c, store)) for c in node.children]
        if streamable(node.method, node.parameters):
            return_large_blocks_promptly(STREAM_MMAP_THRESHOLD_BYTES)
            return _stream_node(node, store, entries, progress)
        return_large_blocks_promptly()
        started = time.perf_counter()
        with PeakMeter(node.device) as meter:
            val = load_validation(node, data)
            with open_checkpoint(node.base) as base:
                vectors = load_task_vectors(base, entries, head_prefixes=node.head_prefixes, progress=progress,
                                            each=input_compressor(node.method, node.parameters, len(entries)))
            result = merge(
                node.base, vectors, node.method, params=node.parameters, val=val, kind=node.kind,  # type: ignore[arg-type]
                seed=node.seed, device=node.device, progress=progress, task_vector_device=node.task_vector_device,
                release_task_vectors=True,
            )
            del vectors
    check_finite_result(result.tensors.items(), f"node {node.id}")
    for task, head in result.heads.items():
        check_finite_result(head.items(), f"node {node.id} (head of {task})")
    reading = meter.reading
    assert reading is not None
    record = _node_record(node, store, time.perf_counter() - started, reading, dict(result.val_accuracy))
    save_result(
        result, store.path(node.key), base_path=node.base,
        models={e.name: str(e.path) for e in entries}, overwrite=store.occupied(node.key),
        extra_record={KEY_FIELD: node.key, "node": record.to_dict(), "predicted": node.to_dict()["predicted"]},
        out_dtype=node.out_dtype,
    )
    store.publish(node.key)
    log.info("%s: merged %d inputs in %.1f s, peak %.0f MB (predicted %.0f MB)", node.id, len(entries),
             record.seconds, record.measured_peak_bytes / 2**20, node.predicted_peak_bytes / 2**20)
    return record


def _stream_node(node: NodeTask, store: Store, entries: list[ModelEntry], progress: bool) -> NodeRecord:
    """A per-tensor method with fixed parameters, merged disk to disk (supermerge.merge_core.stream): writing is
    the merge, so the peak is read once every tensor is written, just before the record is."""
    started = time.perf_counter()
    records: list[NodeRecord] = []
    with PeakMeter(node.device) as meter:

        def measured() -> dict[str, Any]:
            records.append(_node_record(node, store, time.perf_counter() - started, meter.current(), {}))
            return {KEY_FIELD: node.key, "node": records[-1].to_dict(), "predicted": node.to_dict()["predicted"], "streamed": True}

        stream_merge(
            node.base, [(e.name, e.path) for e in entries], node.method, node.parameters, store.path(node.key),
            seed=node.seed, head_prefixes=node.head_prefixes, overwrite=store.occupied(node.key),
            extra_record=measured, progress=progress, label=f"node {node.id}", out_dtype=node.out_dtype,
        )
    store.publish(node.key)
    record = records[-1]
    log.info("%s: streamed %d inputs in %.1f s, peak %.0f MB (predicted %.0f MB)", node.id, len(entries),
             record.seconds, record.measured_peak_bytes / 2**20, node.predicted_peak_bytes / 2**20)
    return record


def _node_record(
    node: NodeTask, store: Store, seconds: float, reading: PeakReading, val_accuracy: dict[str, float]
) -> NodeRecord:
    """The node's record, its measured peak checked against the prediction (a warning when it is over
    by more than the planner's margin)."""
    measured = reading.device_bytes if reading.device_bytes is not None else reading.host_bytes
    over = exceeds_prediction(measured, node.predicted_peak_bytes, node.device)
    if over:
        log.warning("%s: measured peak %s exceeds the predicted %s by more than the planner's margin (%.0f %%) "
                    "on %s; the memory planner underestimates this node: leave more room (a smaller "
                    "--memory-budget or --max-fan-in) if other work shares the machine", node.id,
                    format_bytes(measured), format_bytes(node.predicted_peak_bytes),
                    100 * prediction_margin(node.device), node.device)
    return NodeRecord(
        id=node.id,
        key=node.key,
        path=str(store.path(node.key)),
        device=node.device,
        seconds=round(seconds, 3),
        predicted_peak_bytes=node.predicted_peak_bytes,
        measured_peak_bytes=measured,
        measured_host_peak_bytes=reading.host_bytes,
        peak_method="cuda_max_allocated" if reading.device_bytes is not None else reading.method,
        val_accuracy=val_accuracy,
        over_prediction=over,
    )
