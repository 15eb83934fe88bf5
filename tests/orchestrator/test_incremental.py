"""Growing the previous merge tree by new models (hand-made similarities, no weights)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from supermerge.merge_core.config import MergeConfig
from supermerge.orchestrator.errors import StoreError, TreeError
from supermerge.orchestrator.publish import REPORT_FILE
from supermerge.orchestrator.incremental import PreviousTree, grow_tree, path_to_root, read_previous_tree, reusable
from supermerge.orchestrator.similarity import Similarity
from supermerge.orchestrator.tree import MergeTree


def _similarity(names: list[str], pairs: dict[tuple[str, str], float]) -> Similarity:
    """Cosine 0.05 everywhere but the given pairs."""
    k = len(names)
    cosine = np.full((k, k), 0.05)
    np.fill_diagonal(cosine, 1.0)
    for (a, b), value in pairs.items():
        i, j = names.index(a), names.index(b)
        cosine[i, j] = cosine[j, i] = value
    return Similarity(names, cosine, np.ones(k), 1, 1.0)


NAMES = ["a", "b", "c", "d", "e", "f"]


def test_a_new_model_pairs_with_its_nearest_leaf_when_the_leafs_group_is_full() -> None:
    sim = _similarity(NAMES, {("c", "e"): 0.9, ("d", "e"): 0.4})
    grown = grow_tree([["a", "b"], ["c", "d"]], ["e"], sim, max_fan_in=2)
    assert grown == [["a", "b"], [["c", "e"], "d"]]
    tree = MergeTree.from_nested(grown)
    # only the new pair and the nodes above it are new; ["a", "b"] is untouched
    assert [tree.children(n) for n in path_to_root(tree, "e")] == [["c", "e"], [tree.parent("e"), "d"],
                                                                    [tree.parent("a"), tree.parent("d")]]


def test_a_new_model_joins_its_nearest_leafs_group_when_there_is_room() -> None:
    sim = _similarity(NAMES, {("c", "e"): 0.9, ("e", "f"): 0.8})
    grown = grow_tree([["a", "b"], ["c", "d"]], ["e", "f"], sim, max_fan_in=3)
    assert grown == [["a", "b"], ["c", "d", ["e", "f"]]]  # e filled c's group; f, nearest e, pairs with it
    assert grow_tree([["a", "b"], "c"], ["e"], _similarity(NAMES, {("c", "e"): 0.9}), max_fan_in=3) == \
        [["a", "b"], "c", "e"]


def test_growing_does_not_change_the_previous_tree_and_refuses_unknown_models() -> None:
    previous = [["a", "b"], ["c", "d"]]
    grow_tree(previous, ["e"], _similarity(NAMES, {}), max_fan_in=2)
    assert previous == [["a", "b"], ["c", "d"]]
    with pytest.raises(TreeError, match="no row"):
        grow_tree(previous, ["z"], _similarity(NAMES, {}), max_fan_in=2)
    with pytest.raises(TreeError, match="already a leaf"):
        grow_tree(previous, ["a"], _similarity(NAMES, {}), max_fan_in=2)


def _config(names: list[str], **tree: object) -> MergeConfig:
    return MergeConfig.model_validate({
        "base": "base", "output": "out", "models": [{"name": n, "path": n} for n in names], "tree": tree,
    })


def test_the_previous_tree_is_reused_only_with_the_same_tree_settings_and_no_model_dropped() -> None:
    settings = _config(["a", "b"], max_fan_in=2).tree.model_dump(mode="json")
    previous = PreviousTree([["a", "b"], ["c", "d"]], 2, settings)
    assert reusable(_config(["a", "b", "c", "d"], max_fan_in=2), previous) == []
    assert reusable(_config(["a", "b", "c", "d", "e"], max_fan_in=2), previous) == ["e"]
    assert reusable(_config(["a", "b", "c", "e"], max_fan_in=2), previous) is None  # d dropped
    assert reusable(_config(["a", "b", "c", "d", "e"], max_fan_in=3), previous) is None
    assert reusable(_config(["a", "b", "c", "d", "e"], flat=True), previous) is None


def test_the_previous_tree_is_read_from_the_published_report(tmp_path: Path) -> None:
    assert read_previous_tree(tmp_path) is None
    report = {"plan": {"groups": [["a", "b"], "c"], "fan_in": 2}, "config": {"tree": {"max_fan_in": 2}}}
    (tmp_path / REPORT_FILE).write_text(json.dumps(report))
    assert read_previous_tree(tmp_path) == PreviousTree([["a", "b"], "c"], 2, {"max_fan_in": 2})
    (tmp_path / REPORT_FILE).write_text("{}")
    with pytest.raises(StoreError, match="replan"):
        read_previous_tree(tmp_path)
