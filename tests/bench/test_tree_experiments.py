"""The tree experiments' random trees and their table (the runs themselves are a benchmark)."""

from __future__ import annotations

from bench.tree_experiments import balanced_random_groups, experiments
from bench.tree_report import trees_section
from supermerge.merge_core.config import TreeConfig
from supermerge.orchestrator.tree import MergeTree

TASKS = ["a", "b", "c", "d", "e", "f", "g", "h"]


def test_random_groups_are_a_balanced_tree_of_every_task_in_a_seeded_order() -> None:
    groups = balanced_random_groups(TASKS, 2, seed=0)
    tree = MergeTree.from_nested(groups)
    assert sorted(tree.models()) == TASKS and tree.depth == 3 and len(tree.merges()) == 7
    assert all(len(tree.children(n)) == 2 for n in tree.merges())
    assert groups == balanced_random_groups(TASKS, 2, seed=0) != balanced_random_groups(TASKS, 2, seed=1)
    six = MergeTree.from_nested(balanced_random_groups(TASKS[:6], 2, seed=3))
    assert sorted(six.models()) == TASKS[:6] and six.depth == 3


def test_every_experiment_is_a_valid_tree_setting_and_changes_one_thing() -> None:
    found = experiments(TASKS, seed=0)
    assert [e.name for e in found][0] == "control" and len({e.name for e in found}) == len(found)
    for e in found:
        TreeConfig(**e.tree)  # valid settings
    control = found[0]
    for e in found[1:]:
        assert (e.tree != control.tree) + bool(e.overrides) == 1, e.name


def _run(acc: float, depth: int) -> dict:
    return {"seed": 0, "test_accuracy": {"a": acc, "b": acc}, "seconds": 10.0,
            "params": {"depth": depth, "merge_nodes": 3}}


def test_the_table_compares_each_experiment_with_the_control_and_the_flat_merge() -> None:
    trees = {"command": "python -m bench.tree_experiments", "seconds": 60.0, "individual": {"a": 0.8, "b": 0.8},
             "runs": [{"experiment": "control", "question": "q0", "run": _run(0.5, 2)},
                      {"experiment": "fan-in-4", "question": "q1", "run": _run(0.6, 1)},
                      {"experiment": "flat", "question": "q2", "run": _run(0.7, 1)}]}
    table = "\n".join(trees_section(trees))
    assert "| fan-in-4 | q1 | 1 | 3 | 60.0 | 75.0 % | +10.0 | -10.0 | 10 |" in table
    assert "| control | q0 | 2 | 3 | 50.0 | 62.5 % | - | -20.0 | 10 |" in table
    assert trees_section({"runs": []}) == []


def test_without_a_flat_experiment_the_benchmarks_own_flat_run_of_that_seed_is_the_reference() -> None:
    trees = {"command": "c", "seconds": 60.0, "individual": {"a": 0.8, "b": 0.8},
             "runs": [{"experiment": "control", "question": "q0", "run": _run(0.5, 2)}]}
    res = {"runs": [{"variant": "full", "method": "supermerge", "seed": 0, "test_accuracy": {"a": 0.6, "b": 0.6}},
                    {"variant": "full", "method": "supermerge", "seed": 1, "test_accuracy": {"a": 0.9, "b": 0.9}}]}
    table = "\n".join(trees_section(trees, res))
    assert "| control | q0 | 2 | 3 | 50.0 | 62.5 % | - | -10.0 | 10 |" in table
    assert "benchmark's flat SuperMerge of seed 0 (60.0" in table
    assert "Not measured: control" not in "\n".join(trees_section(trees, res))
    assert "Not measured: flat" in "\n".join(trees_section(trees))
