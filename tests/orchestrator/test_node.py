"""The node runner under faults: a node that needs more memory than predicted is reported, one that runs
out of memory fails alone with a clear error and leaves the store as it was."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import pytest
import torch

import supermerge.orchestrator.node
from supermerge.orchestrator.errors import NodeOutOfMemoryError, StoreError
from supermerge.orchestrator.hardware import MemoryInventory
from supermerge.orchestrator.sizes import format_bytes
from supermerge.orchestrator.node import NodeTask, cached_record, run_node
from supermerge.orchestrator.plan import plan
from supermerge.orchestrator.store import CheckpointStore
from tests.errors_doc import check_row
from tests.orchestrator.families import FamilyModels, make_config

PLENTY = MemoryInventory(ram_available_bytes=10**12, ram_total_bytes=10**12, process_bytes=0)


def _node(base: Path, models: FamilyModels, folder: Path, names: list[str]) -> NodeTask:
    """The root of a flat merge of ``names`` (its only node)."""
    return plan(make_config(base, models, folder / "out", names, tree={"flat": True}), inventory=PLENTY).root


def test_a_node_within_its_prediction_is_not_flagged(tiny_base_dir, family_models, tmp_path):
    node = _node(tiny_base_dir, family_models, tmp_path, ["pa", "pb"])
    record = run_node(node, CheckpointStore(tmp_path / "store"))
    assert 0 < record.measured_peak_bytes < record.predicted_peak_bytes and not record.over_prediction


def test_a_node_needing_more_than_predicted_is_reported_and_flagged(
    tiny_base_dir, family_models, tmp_path, monkeypatch, caplog
):
    """The merge holds 64 MiB more than the planner counted (a 34 MB prediction): measured, warned
    about, flagged in the record, in the stored record and in a cached reuse of the node."""
    node = _node(tiny_base_dir, family_models, tmp_path, ["pa", "pb"])
    merge = supermerge.orchestrator.node.merge

    def merge_holding_more(*args: Any, **kwargs: Any) -> Any:
        unplanned = torch.ones(16 * 2**20)  # 64 MiB, every page touched
        result = merge(*args, **kwargs)
        del unplanned
        return result

    monkeypatch.setattr(supermerge.orchestrator.node, "merge", merge_holding_more)
    store = CheckpointStore(tmp_path / "store")
    with caplog.at_level(logging.WARNING, logger="supermerge.orchestrator.node"):
        record = run_node(node, store)
    assert record.measured_peak_bytes > 64 * 2**20 > record.predicted_peak_bytes and record.over_prediction
    [warning] = [r.getMessage() for r in caplog.records if "exceeds the predicted" in r.getMessage()]
    assert warning.startswith(f"{node.id}: measured peak {format_bytes(record.measured_peak_bytes)} exceeds")
    assert store.record(node.key)["node"]["over_prediction"] is True
    assert cached_record(node, store).over_prediction
    check_row("over-prediction", "a node whose measured peak exceeds its prediction by more than the planner's "
              "margin", warning, {})


OUT_OF_MEMORY = {
    "MemoryError": MemoryError(),
    "torch.OutOfMemoryError": torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    "cpu-allocator": RuntimeError("[enforce fail at alloc_cpu.cpp:121] data. DefaultCPUAllocator: can't allocate "
                                  "memory: you tried to allocate 4294967296 bytes. Error code 12"),
}


@pytest.mark.parametrize("raised", list(OUT_OF_MEMORY))
def test_out_of_memory_in_a_node_is_one_clear_error_and_nothing_is_stored(
    tiny_base_dir, family_models, tmp_path, monkeypatch, raised
):
    node = _node(tiny_base_dir, family_models, tmp_path, ["pa", "pb", "qa"])

    def allocation_fails(*args: Any, **kwargs: Any) -> Any:
        raise OUT_OF_MEMORY[raised]

    monkeypatch.setattr(supermerge.orchestrator.node, "merge", allocation_fails)
    store = CheckpointStore(tmp_path / "store")
    with pytest.raises(NodeOutOfMemoryError) as failed:
        run_node(node, store)
    message = str(failed.value)
    assert message.startswith(f"node {node.id} (3 inputs, 3 tasks) ran out of memory on cpu")
    assert f"predicted a peak of {format_bytes(node.predicted_peak_bytes)}" in message
    assert "--max-fan-in 2" in message
    assert failed.value.__context__ is None and failed.value.__cause__ is None  # the failed frames are freed
    assert not store.root.exists()  # no entry, no lock file: the failed node left nothing
    with store.lock(node.key):  # released: the next run (or a sibling) can take it at once
        pass
    if raised == "cpu-allocator":
        check_row("node-out-of-memory", "a node that runs out of memory (here: a flat merge of 3 models)",
                  failed.value, {})


def test_an_error_that_is_not_out_of_memory_passes_through_unchanged(
    tiny_base_dir, family_models, tmp_path, monkeypatch
):
    node = _node(tiny_base_dir, family_models, tmp_path, ["pa", "pb"])
    bug = RuntimeError("shape mismatch in the merge")

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise bug

    monkeypatch.setattr(supermerge.orchestrator.node, "merge", broken)
    with pytest.raises(RuntimeError) as failed:
        run_node(node, CheckpointStore(tmp_path / "store"))
    assert failed.value is bug


def test_validation_data_changed_since_planning_fails_the_node_before_it_merges(tiny_base_dir, family_models, tmp_path):
    node = _node(tiny_base_dir, family_models, tmp_path, ["pa", "pb"])
    store = CheckpointStore(tmp_path / "store")
    with pytest.raises(StoreError) as failed:
        run_node(dataclasses.replace(node, data_digest="0" * 64), store)
    assert "changed since the plan was made" in str(failed.value)
    assert not store.path(node.key).exists()
    check_row("data-changed-since-plan", "validation data edited between planning and running a node",
              failed.value, {})
