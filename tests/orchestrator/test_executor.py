"""The executor: a fan-in-2 tree on the family models, its report, and kill-and-resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from supermerge.merge_core.errors import CheckpointError
from supermerge.orchestrator.executor import execute
from supermerge.orchestrator.publish import REPORT_FILE, ExecutionReport
from supermerge.orchestrator.hardware import MemoryInventory
from supermerge.orchestrator.node import NodeRecord, NodeTask, load_validation, run_node
from supermerge.orchestrator.plan import MergePlan, plan
from supermerge.orchestrator.store import KEY_FIELD, CheckpointStore
from tests.orchestrator.families import NAMES, make_config, one_thread

PLENTY = MemoryInventory(ram_available_bytes=10**12, ram_total_bytes=10**12, process_bytes=0)


def _plan(tiny_base_dir, family_models, output: Path) -> MergePlan:
    return plan(make_config(tiny_base_dir, family_models, output, tree={"max_fan_in": 2}), inventory=PLENTY)


class Run:
    """One uninterrupted run (the reference), with what each node was given."""

    def __init__(self, merge_plan: MergePlan, report: ExecutionReport, data: dict[str, list[str]]) -> None:
        self.plan, self.report, self.data = merge_plan, report, data


@pytest.fixture(scope="module")
def reference(tiny_base_dir, family_models, tmp_path_factory) -> Run:
    output = tmp_path_factory.mktemp("reference") / "merged"
    merge_plan = _plan(tiny_base_dir, family_models, output)
    data: dict[str, list[str]] = {}

    def spy(node: NodeTask, store: CheckpointStore) -> NodeRecord:
        data[node.id] = sorted(load_validation(node))  # what run_node loads for this node
        return run_node(node, store)

    with one_thread():  # as the function-scoped tests run: GEMM results depend on the thread count
        return Run(merge_plan, execute(merge_plan, runner=spy), data)


def test_fan_in_two_tree_runs_bottom_up_and_publishes_the_root(reference):
    p, report = reference.plan, reference.report
    assert [r.id for r in report.nodes] == [n.id for n in p.nodes] and len(report.nodes) == 7
    assert not any(r.cached for r in report.nodes)
    output = p.config.output
    assert (output / "model.safetensors").is_file() and (output / "config.json").is_file()
    assert sorted(f.stem for f in (output / "heads").glob("*.safetensors")) == sorted(NAMES)
    record = json.loads((output / "supermerge.json").read_text())
    assert record[KEY_FIELD] == p.root.key and record["config"]["tree"]["max_fan_in"] == 2
    assert record["tree"] == p.tree.nested() and sorted(record["tasks"]) == sorted(NAMES)
    store = CheckpointStore(report.store)
    assert report.store == output.parent / ".supermerge-store"
    assert all(store.is_finished(n.key) for n in p.nodes)
    assert sorted(report.val_accuracy) == sorted(NAMES)


def test_report_has_predicted_and_measured_memory_and_time_per_node(reference):
    report = json.loads((reference.plan.config.output / REPORT_FILE).read_text())
    assert [n["id"] for n in report["nodes"]] == [n.id for n in reference.plan.nodes]
    for node in report["nodes"]:
        assert node["predicted_peak_bytes"] > 0 and node["measured_peak_bytes"] > 0
        assert node["measured_over_predicted"] == round(node["measured_peak_bytes"] / node["predicted_peak_bytes"], 3)
        assert node["peak_method"] in ("vmhwm", "sampled") and node["device"] == "cpu"
        assert node["seconds"] > 0 and not node["cached"]
    planned = {n["id"]: n for n in report["plan"]["nodes"]}
    assert all(planned[n["id"]]["predicted"]["peak"] == n["predicted_peak_bytes"] for n in report["nodes"])
    assert report["plan"]["fan_in"] == 2 and report["config"]["method"] == "supermerge"


def test_each_node_trains_on_only_its_subtrees_validation_data(reference):
    p = reference.plan
    second_level = [n for n in p.nodes if len(n.tasks) == 4]
    assert len(second_level) == 2
    for node in p.nodes:
        subtree = sorted(p.tree.tasks(node.id))
        assert reference.data[node.id] == subtree
        stored = CheckpointStore(reference.report.store).record(node.key)
        assert sorted(stored["val_accuracy"]) == subtree and sorted(stored["tasks"]) == subtree
    for node in second_level:  # its inputs are the two family merges, read back as fine-tuned models
        assert all(c.path is None for c in node.children)


class Killed(BaseException):
    """What a kill looks like to the executor: the run stops between two nodes."""


def test_a_killed_run_resumes_without_redoing_finished_nodes_and_gives_the_same_bytes(
    reference, tiny_base_dir, family_models, tmp_path
):
    output = tmp_path / "merged"
    p = _plan(tiny_base_dir, family_models, output)
    assert [n.key for n in p.nodes] == [n.key for n in reference.plan.nodes]  # same inputs, same keys
    first = p.nodes[0]

    def killed_after_first(node: NodeTask, store: CheckpointStore) -> NodeRecord:
        if node.id != first.id:
            raise Killed
        return run_node(node, store)

    with pytest.raises(Killed):
        execute(p, runner=killed_after_first)
    store = CheckpointStore(output.parent / ".supermerge-store")
    assert store.is_finished(first.key) and not output.exists()
    assert [n.id for n in p.nodes if store.is_finished(n.key)] == [first.id]
    # a node killed while its files were half there: its dir exists but is not finished
    second = p.nodes[1]
    store.path(second.key).mkdir(parents=True)
    (store.path(second.key) / "model.safetensors").write_bytes(b"\x08\x00")

    called: list[str] = []

    def recording(node: NodeTask, s: CheckpointStore) -> NodeRecord:
        called.append(node.id)
        return run_node(node, s)

    report = execute(p, runner=recording)
    assert first.id not in called
    assert called == [n.id for n in p.nodes[1:]]
    assert [r.cached for r in report.nodes] == [True] + [False] * (len(p.nodes) - 1)
    reference_dir = reference.plan.config.output
    for name in ("model.safetensors", "merge_weights.safetensors", *(f"heads/{t}.safetensors" for t in NAMES)):
        assert (output / name).read_bytes() == (reference_dir / name).read_bytes(), name

    # a third run recomputes nothing at all
    again: list[str] = []
    execute(p, runner=lambda node, s: again.append(node.id) or run_node(node, s), overwrite=True)
    assert again == []


def test_an_existing_output_is_refused_before_any_node_runs(tiny_base_dir, family_models, tmp_path):
    output = tmp_path / "merged"
    output.mkdir()
    p = _plan(tiny_base_dir, family_models, output)

    def never(node: NodeTask, store: CheckpointStore) -> NodeRecord:
        raise AssertionError("no node may run")

    with pytest.raises(CheckpointError, match="already exists"):
        execute(p, runner=never)
    assert not (tmp_path / ".supermerge-store").exists()


def test_a_per_tensor_method_with_fixed_parameters_streams_each_node(tiny_base_dir, family_models, tmp_path):
    """TIES with one value per parameter needs no model run: every node is merged disk to disk
    (supermerge.merge_core.stream), planned as such (no model weights, k times the largest tensor), and gives
    the bytes the load-everything merge() gives."""
    from supermerge.merge_core.checkpoint import open_checkpoint
    from supermerge.merge_core.job import load_task_vectors
    from supermerge.merge_core.merge import merge
    from supermerge.merge_core.methods.registry import METHODS
    from supermerge.merge_core.task_vectors import DEFAULT_HEAD_PREFIXES

    config = make_config(tiny_base_dir, family_models, tmp_path / "merged", tree={"flat": True},
                         method="ties", parameters={"density": 0.3, "lam": 1.2})
    p = plan(config, inventory=PLENTY)
    root = p.root
    with open_checkpoint(tiny_base_dir) as base:
        largest = max(base.shape(n)[0] * (base.shape(n)[1] if len(base.shape(n)) > 1 else 1)
                      for n in base.keys() if base.dtype(n).is_floating_point)
        vectors = load_task_vectors(base, config.models, head_prefixes=DEFAULT_HEAD_PREFIXES)
    assert root.device == "cpu" and root.predicted.model_weights == root.predicted.activations == 0
    assert root.predicted.stacked_task_vectors == 4 * len(NAMES) * largest
    assert root.predicted.op_temporaries == 4 * METHODS["ties"].temporaries.values(len(NAMES), largest)
    assert root.predicted.io_tensors == 4 * largest  # fp32 base: its read copy, no widening or cast

    report = execute(p)
    [record] = report.nodes
    assert record.val_accuracy == {} and record.measured_peak_bytes > 0
    stored = json.loads((config.output / "supermerge.json").read_text())
    assert stored["streamed"] is True and stored["node"]["id"] == root.id

    expected = merge(tiny_base_dir, vectors, "ties", params={"density": 0.3, "lam": 1.2})
    with open_checkpoint(config.output) as merged:
        for name, tensor in expected.tensors.items():
            assert torch.equal(merged.get(name), tensor), name


def test_a_store_entry_changed_after_writing_is_reported_and_merged_again_to_the_same_bytes(
    reference, tiny_base_dir, family_models, tmp_path, caplog
):
    """One byte of a tensor flipped in a finished node's weights and in the root's (headers and sizes
    untouched, so only the checksums can tell): the next run says which files, merges exactly those
    two nodes again, gets the bytes back, and publishes the reference's model."""
    import logging
    import shutil
    import time

    from supermerge.merge_core.checkpoint import read_record, verify_checksums
    from tests.errors_doc import check_row

    store = CheckpointStore(tmp_path / "store")
    shutil.copytree(reference.report.store, store.root)  # copies: the reference keeps its own files
    p = _plan(tiny_base_dir, family_models, tmp_path / "merged")
    damaged = [p.nodes[1], p.root]
    time.sleep(0.02)  # file times tick in jiffies; digests are remembered per (inode, size, times)
    for node in damaged:
        weights = store.path(node.key) / "model.safetensors"
        blob = bytearray(weights.read_bytes())
        blob[-5] ^= 0x10
        weights.write_bytes(bytes(blob))
        assert not store.is_finished(node.key)

    called: list[str] = []
    with caplog.at_level(logging.WARNING, logger="supermerge.orchestrator.node"):
        execute(p, store_dir=store.root, runner=lambda node, s: called.append(node.id) or run_node(node, s))
    assert called == [n.id for n in damaged]
    warnings = [r.getMessage() for r in caplog.records if "is not usable" in r.getMessage()]
    assert len(warnings) == 2
    for node, warning in zip(damaged, warnings, strict=True):
        assert f"{store.path(node.key) / 'model.safetensors'} does not have the sha256 recorded" in warning
        assert (store.path(node.key) / "model.safetensors").read_bytes() == \
            (reference.report.store / node.key / "model.safetensors").read_bytes()
    for name in ("model.safetensors", "merge_weights.safetensors", *(f"heads/{t}.safetensors" for t in NAMES)):
        assert (tmp_path / "merged" / name).read_bytes() == (reference.plan.config.output / name).read_bytes(), name
    published = read_record(tmp_path / "merged")  # the published model carries the checksums too
    assert "model.safetensors" in published["checksums"] and verify_checksums(tmp_path / "merged", published) is None
    check_row("damaged-store-entry", "a finished node's file changed after it was written (one flipped byte)",
              warnings[0], {"<store>": store.root, "<key>": damaged[0].key})
