"""Planning: the fan-in the budget allows, per-node predictions and inputs, refusal before any work."""

from __future__ import annotations

import json
import re

import pytest

from supermerge.merge_core.config import parse_config
from supermerge.merge_core.errors import DataError
from supermerge.orchestrator.errors import MemoryBudgetError, TreeError
from supermerge.orchestrator.hardware import MemoryInventory
from supermerge.orchestrator.node import NodeTask
from supermerge.orchestrator.plan import plan
from tests.orchestrator.families import FAMILIES, NAMES, config_dict, make_config

PLENTY = MemoryInventory(ram_available_bytes=10**12, ram_total_bytes=10**12, process_bytes=0)
"""A machine with a terabyte free and an empty process, so a budget of B bytes gives nodes B bytes."""


def _config(tiny_base_dir, family_models, tmp_path, names=None, **tree):
    return make_config(tiny_base_dir, family_models, tmp_path / "out" / "merged", names, tree=tree)


def _largest_node(p) -> int:
    return max(n.predicted_peak_bytes for n in p.nodes)


def test_plenty_of_memory_gives_one_flat_merge(tiny_base_dir, family_models, tmp_path):
    p = plan(_config(tiny_base_dir, family_models, tmp_path), inventory=PLENTY)
    assert p.fan_in == len(NAMES) and len(p.nodes) == 1 and p.tree.depth == 1
    assert p.fan_in_reason == "the largest that fits the budget"
    assert p.similarity is None  # a flat merge needs no similarity pass
    root = p.root
    assert [c.name for c in root.children] == NAMES and sorted(root.tasks) == sorted(NAMES)
    assert root.device == "cpu" and root.predicted.peak == root.predicted.total > 0


def test_max_fan_in_two_gives_a_tree_with_each_family_under_its_own_node(tiny_base_dir, family_models, tmp_path):
    p = plan(_config(tiny_base_dir, family_models, tmp_path, max_fan_in=2), inventory=PLENTY)
    assert p.fan_in == 2 and len(p.nodes) == len(NAMES) - 1 and p.tree.depth == 3
    family_nodes = [n for n in p.nodes if len(n.tasks) == 2]
    assert sorted(sorted(n.tasks) for n in family_nodes) == FAMILIES
    by_id = {n.id: n for n in p.nodes}
    for node in p.nodes:
        assert node.id == p.nodes[-1].id or any(node.key == c.key for m in p.nodes for c in m.children)
        # each node trains on exactly its subtree's tasks' validation data
        assert sorted(node.validation) == sorted(node.tasks) == sorted(p.tree.tasks(node.id))
        for child in node.children:
            if child.path is None:  # an intermediate model: read from the store under its node's key
                assert child.key == by_id[child.name].key
            else:
                assert child.path == str(family_models[child.name]["path"])
    assert len({n.key for n in p.nodes}) == len(p.nodes)
    assert len({n.data_digest for n in p.nodes}) == len(p.nodes)


def test_plan_is_deterministic_and_its_nodes_travel_as_json(tiny_base_dir, family_models, tmp_path):
    first = plan(_config(tiny_base_dir, family_models, tmp_path, max_fan_in=3), inventory=PLENTY)
    again = plan(_config(tiny_base_dir, family_models, tmp_path, max_fan_in=3), inventory=PLENTY)
    assert [n.to_dict() for n in first.nodes] == [n.to_dict() for n in again.nodes]
    assert first.render() == again.render()
    for node in first.nodes:
        assert NodeTask.from_dict(json.loads(json.dumps(node.to_dict()))) == node
    json.dumps(first.to_dict())


def test_a_tight_budget_gets_the_largest_fan_in_that_fits(tiny_base_dir, family_models, tmp_path):
    predicted = {
        f: _largest_node(plan(_config(tiny_base_dir, family_models, tmp_path, max_fan_in=f), inventory=PLENTY))
        for f in (2, 3, 4, 8)
    }
    assert predicted[2] < predicted[3] < predicted[8], predicted  # the root holds fan-in task vectors
    budget = predicted[3]  # fan-in 3 fits exactly, 4 and up do not
    assert predicted[4] > budget
    # the tree's fan-in search, with flat-compressed (which would come first, and fits) switched off
    p = plan(_config(tiny_base_dir, family_models, tmp_path, memory_budget=str(budget), flat_compressed=False),
             inventory=PLENTY)
    assert p.fan_in == 3 and p.fan_in_reason == "the largest that fits the budget"
    assert all(n.predicted_peak_bytes <= budget for n in p.nodes)
    assert p.budget.host == budget
    # a cap below what fits is a cap
    capped = plan(_config(tiny_base_dir, family_models, tmp_path, memory_budget=str(budget), max_fan_in=2),
                  inventory=PLENTY)
    assert capped.fan_in == 2


def test_too_small_a_budget_is_refused_before_anything_is_written(tiny_base_dir, family_models, tmp_path):
    smallest = _largest_node(plan(_config(tiny_base_dir, family_models, tmp_path, max_fan_in=2), inventory=PLENTY))
    # flat-compressed off: on this tiny model it is smaller than a fan-in-2 node (tested on its own)
    config = _config(tiny_base_dir, family_models, tmp_path, memory_budget=str(smallest - 1), flat_compressed=False)
    with pytest.raises(MemoryBudgetError) as e:
        plan(config, inventory=PLENTY)
    message = str(e.value)
    assert "at fan-in 2" in message and "even fan-in 2 does not fit" in message
    assert "Nothing was run" in message and "--memory-budget" in message
    assert not (tmp_path / "out").exists()  # neither the output nor the store beside it
    assert list(tmp_path.iterdir()) == []


def test_hand_groups_and_flat_are_taken_as_given_and_refused_if_too_big(tiny_base_dir, family_models, tmp_path):
    groups = [["pa", "pb", "qa"], ["qb", "ra"], ["rb", "sa", "sb"]]
    p = plan(_config(tiny_base_dir, family_models, tmp_path, groups=groups), inventory=PLENTY)
    assert p.tree.nested() == groups and p.fan_in == 3 and p.fan_in_reason == "groups given by hand"
    flat = plan(_config(tiny_base_dir, family_models, tmp_path, flat=True), inventory=PLENTY)
    assert len(flat.nodes) == 1 and flat.fan_in_reason == "flat merge: tree.flat"
    too_small = str(_largest_node(p) - 1)
    with pytest.raises(MemoryBudgetError, match="drop tree.flat / tree.groups"):
        plan(_config(tiny_base_dir, family_models, tmp_path, groups=groups, memory_budget=too_small),
             inventory=PLENTY)


def test_contradicting_tree_options_are_refused(tiny_base_dir, family_models, tmp_path):
    with pytest.raises(TreeError, match="choose one"):
        plan(_config(tiny_base_dir, family_models, tmp_path, flat=True, groups=[NAMES]), inventory=PLENTY)
    with pytest.raises(TreeError, match="tree.max_fan_in is 2"):
        plan(_config(tiny_base_dir, family_models, tmp_path, flat=True, max_fan_in=2), inventory=PLENTY)
    with pytest.raises(TreeError, match=r"unknown model\(s\) \['zz'\]"):
        plan(_config(tiny_base_dir, family_models, tmp_path, groups=[["pa", "zz"]]), inventory=PLENTY)


def test_supermerge_without_validation_data_is_refused_up_front(tiny_base_dir, family_models, tmp_path):
    raw = config_dict(tiny_base_dir, family_models, tmp_path / "out", ["pa", "pb", "qa"])
    del raw["models"][1]["validation"]
    with pytest.raises(DataError, match=r"model\(s\) \['pb'\] have no 'validation:' file"):
        plan(parse_config(raw), inventory=PLENTY)


def test_render_shows_the_tree_the_fan_in_and_each_nodes_memory_and_device(tiny_base_dir, family_models, tmp_path):
    p = plan(_config(tiny_base_dir, family_models, tmp_path, max_fan_in=2), inventory=PLENTY)
    text = p.render()
    assert text.startswith("8 models -> 7 merge(s), fan-in 2 (the largest up to tree.max_fan_in 2 that fits")
    assert "depth 3, method supermerge" in text
    assert ("tree shape: balanced (similarity chose which models share a merge, the fan-in fixed the depth), "
            "depth 3; ceil(log_2 8) = 3") in text.splitlines()
    assert re.search(r"├── merge-\S+  \[2 tasks\] cpu, predicted", text)
    for name in NAMES:
        assert f"── {name}" in text
    rows = [line for line in text.splitlines() if line.startswith("| merge-")]
    assert len(rows) == 7 and all("| cpu |" in r for r in rows)


def test_a_bf16_stack_halves_the_stacked_task_vectors(tiny_base_dir, family_models, tmp_path):
    raw = config_dict(tiny_base_dir, family_models, tmp_path / "out", ["pa", "pb"])
    fp32 = plan(parse_config(raw), inventory=PLENTY).root.predicted
    raw["parameters"] = {**raw["parameters"], "storage_dtype": "bfloat16"}
    bf16 = plan(parse_config(raw), inventory=PLENTY).root.predicted
    assert bf16.stacked_task_vectors * 2 == fp32.stacked_task_vectors
    assert bf16.task_vectors == fp32.task_vectors


def test_fixed_parameters_need_no_validation_data_and_a_grid_does(tiny_base_dir, family_models, tmp_path):
    """TIES with one value per parameter merges without data (streamed); a search (asked for) needs some."""
    raw = config_dict(tiny_base_dir, family_models, tmp_path / "out" / "merged", ["pa", "pb"],
                      method="ties", parameters={"density": 0.2, "lam": 1.0})
    for m in raw["models"]:
        del m["validation"]
    p = plan(parse_config(raw), inventory=PLENTY)
    assert p.root.validation == {} and p.root.predicted.model_weights == 0
    with pytest.raises(DataError, match="have no 'validation:' file"):
        plan(parse_config({**raw, "parameters": {"search": True}}), inventory=PLENTY)
    # a parameter left out takes its default: no search, no data needed (no silent grid search)
    assert plan(parse_config({**raw, "parameters": {"density": 0.2}}), inventory=PLENTY).root.validation == {}


def test_fixed_per_tensor_merges_run_flat_and_the_plan_says_why(tiny_base_dir, family_models, tmp_path):
    """A tree would apply TA's lambda at every level (0.7 at fan-in 2 gives base + 0.49 * sum): the
    formula is the root's, whatever the tree config asks."""
    raw = config_dict(tiny_base_dir, family_models, tmp_path / "out" / "merged", ["pa", "pb", "qa", "qb"],
                      method="task_arithmetic", parameters={"lambda": 0.7})
    raw["tree"] = {"max_fan_in": 2}
    p = plan(parse_config(raw), inventory=PLENTY)
    assert len(p.nodes) == 1 and p.fan_in == 4 and "a tree would apply its formula again" in p.render()
    assert p.root.parameters == {"lam": 0.7}


def test_tree_shape_is_balanced_by_default_and_dendrogram_on_request(tiny_base_dir, family_models, tmp_path):
    """Fan-in 4 over 8 models: balanced is depth ceil(log_4 8) = 2; the opened dendrogram keeps each
    family as its own merge under a root of 4. Both say their shape in the plan."""
    balanced = plan(_config(tiny_base_dir, family_models, tmp_path, max_fan_in=4), inventory=PLENTY)
    assert balanced.shape == "balanced" and balanced.tree.depth == 2 and balanced.to_dict()["shape"] == "balanced"
    assert len(balanced.nodes) == 3 and balanced.fan_in == 4
    dendrogram = plan(_config(tiny_base_dir, family_models, tmp_path, max_fan_in=4, shape="dendrogram"),
                      inventory=PLENTY)
    assert dendrogram.shape == "dendrogram" and "tree shape: dendrogram (tree.shape" in dendrogram.render()
    assert sorted(sorted(n.tasks) for n in dendrogram.nodes if len(n.tasks) == 2) == FAMILIES
    flat = plan(_config(tiny_base_dir, family_models, tmp_path), inventory=PLENTY)
    assert flat.shape == "flat" and "tree shape: flat (one merge of every model), depth 1; ceil(log_8 8) = 1" in flat.render()
    with pytest.raises(TreeError, match="tree.shape \\(dendrogram\\) shapes a clustered tree"):
        plan(_config(tiny_base_dir, family_models, tmp_path, flat=True, shape="dendrogram"), inventory=PLENTY)


def test_flat_compressed_is_chosen_only_when_it_fits_and_dense_flat_does_not(tiny_base_dir, family_models, tmp_path):
    """The planner's order: a dense flat merge, then flat over compressed task vectors, then trees.
    Each budget is set from the predictions themselves, so the test checks the choice, not a size."""
    from supermerge.orchestrator.executor import execute
    from supermerge.merge_core.methods.learned_peak import compressed_loaded_values
    from supermerge.merge_core.peak import FP32
    from supermerge.orchestrator.model_inventory import ModelInventory

    dense = plan(_config(tiny_base_dir, family_models, tmp_path), inventory=PLENTY)
    assert dense.shape == "flat" and "basis" not in dense.root.parameters
    dense_peak = _largest_node(dense)
    between = plan(_config(tiny_base_dir, family_models, tmp_path, memory_budget=str(dense_peak - 1)),
                   inventory=PLENTY)
    assert between.shape == "flat-compressed" and len(between.nodes) == 1 and between.fan_in == len(NAMES)
    assert between.root.parameters["basis"] == "compressed"
    assert between.fan_in_reason.startswith("flat over compressed task vectors")
    assert "tree shape: flat-compressed" in between.render()
    compressed_peak = _largest_node(between)
    assert compressed_peak < dense_peak
    k, shape = len(NAMES), ModelInventory(tiny_base_dir, "classification").shape()
    assert between.root.predicted.task_vectors == FP32 * k * compressed_loaded_values(shape, k)
    assert between.root.predicted.task_vectors < dense.root.predicted.task_vectors / 2
    assert between.root.key != dense.root.key  # another merge: its own store entry
    # just enough for the compressed flat merge: still chosen; one byte less: not chosen. (On this tiny
    # model the 32 MiB runtime margin dominates, so no tree node is smaller and nothing fits: the trees
    # were tried after it, down to fan-in 2.)
    exact = plan(_config(tiny_base_dir, family_models, tmp_path, memory_budget=str(compressed_peak)),
                 inventory=PLENTY)
    assert exact.shape == "flat-compressed"
    with pytest.raises(MemoryBudgetError, match="at fan-in 2"):
        plan(_config(tiny_base_dir, family_models, tmp_path, memory_budget=str(compressed_peak - 1)),
             inventory=PLENTY)
    # switched off: a tree instead, over the raw task vectors
    off = plan(_config(tiny_base_dir, family_models, tmp_path, memory_budget=str(dense_peak - 1),
                       flat_compressed=False), inventory=PLENTY)
    assert off.shape == "balanced" and len(off.nodes) > 1
    assert all("basis" not in n.parameters for n in off.nodes)
    # a cap below k asks for a tree: no flat-compressed
    capped = plan(_config(tiny_base_dir, family_models, tmp_path, memory_budget=str(dense_peak - 1), max_fan_in=4),
                  inventory=PLENTY)
    assert capped.shape == "balanced"
    # and the plan runs: the node merges over compressed task vectors
    execute(between)
    record = json.loads((between.config.output / "supermerge.json").read_text())
    assert record["params"]["basis"] == "compressed" and record["params"]["rank"] is None


def test_basis_compressed_given_in_the_config_is_predicted_compressed(tiny_base_dir, family_models, tmp_path):
    """``basis: compressed`` asked for by the user (not chosen by the planner) is predicted over
    compressed task vectors too, flat and in a tree (each node compresses for its own k)."""
    from supermerge.merge_core.methods.learned_peak import compressed_loaded_values, compressed_stack_values
    from supermerge.merge_core.peak import FP32
    from supermerge.orchestrator.model_inventory import ModelInventory

    k, shape = len(NAMES), ModelInventory(tiny_base_dir, "classification").shape()
    params = {"steps": 3, "lr": 0.05, "basis": "compressed"}

    def config(**tree):
        return parse_config(config_dict(tiny_base_dir, family_models, tmp_path / "out" / "merged",
                                        parameters=params, tree=tree))

    flat = plan(config(flat=True), inventory=PLENTY)
    dense = plan(_config(tiny_base_dir, family_models, tmp_path, flat=True), inventory=PLENTY)
    assert flat.root.predicted.task_vectors == FP32 * k * compressed_loaded_values(shape, k)
    assert flat.root.predicted.stacked_task_vectors == max(
        0, FP32 * (compressed_stack_values(shape, k) - k * compressed_loaded_values(shape, k)))
    assert flat.root.predicted.total < dense.root.predicted.total
    tree = plan(config(max_fan_in=2), inventory=PLENTY)
    for node in tree.nodes:
        assert node.predicted.task_vectors == FP32 * 2 * compressed_loaded_values(shape, 2)


def test_a_balanced_trees_first_level_is_handed_out_at_once(tiny_base_dir, family_models, tmp_path):
    """8 models at fan-in 2: the 4 leaf merges share no input, come first in the submission order and
    the CPU has a slot for each (supermerge.orchestrator.parallel), so they run side by side; a chain had one."""
    from supermerge.orchestrator.parallel import device_slots, submission_order

    p = plan(_config(tiny_base_dir, family_models, tmp_path, max_fan_in=2), inventory=PLENTY)
    order = submission_order(p)
    first = [n for n in order if all(c.path is not None for c in n.children)]
    assert len(first) == 4 and order[:4] == first
    assert device_slots(p, cpu_count=4) == {"cpu": 4}
