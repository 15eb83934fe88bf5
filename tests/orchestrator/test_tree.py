"""The merge tree: clustered on task-vector similarity, given by hand, or flat."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from supermerge.orchestrator.errors import TreeError
from supermerge.orchestrator.similarity import task_vector_similarity
from supermerge.orchestrator.tree import MergeTree, balanced_depth, cluster_tree, flat_tree, node_id, tree_from_groups
from tests.orchestrator.families import FAMILIES, NAMES


@pytest.fixture(scope="module")
def family_cosine(tiny_base_dir, family_models) -> np.ndarray:
    sim = task_vector_similarity(tiny_base_dir, {n: family_models[n]["path"] for n in NAMES})
    assert sim.names == NAMES
    return sim.cosine


def _check_shape(tree: MergeTree, names: list[str], max_fan_in: int) -> None:
    """What every tree must be: each model once as a leaf, 2..max_fan_in children per merge, merges
    listed children first, the root last, each named after the tasks beneath it."""
    assert sorted(tree.models()) == sorted(names)
    merges = tree.merges()
    assert merges == [node_id(tree.tasks(n)) for n in merges] and len(set(merges)) == len(merges)
    assert merges[-1] == tree.root and tree.parent(tree.root) is None
    position = {n: i for i, n in enumerate(merges)}
    for node in merges:
        kids = tree.children(node)
        assert 2 <= len(kids) <= max_fan_in, (node, kids)
        assert all(tree.is_model(c) or position[c] < position[node] for c in kids)
        assert all(tree.parent(c) == node for c in kids)
    assert tree.fan_in <= max_fan_in
    assert sorted(tree.tasks(tree.root)) == sorted(names)


@pytest.mark.parametrize("max_fan_in", [2, 3, 4, 5, 7])
def test_dendrogram_tree_puts_each_family_under_its_own_node(family_cosine, max_fan_in):
    tree = cluster_tree(NAMES, family_cosine, max_fan_in, shape="dendrogram")
    _check_shape(tree, NAMES, max_fan_in)
    for family in FAMILIES:
        parents = {tree.parent(m) for m in family}
        assert len(parents) == 1, f"{family} split across {parents}: {tree.nested()}"
        assert sorted(tree.tasks(parents.pop())) == family, tree.nested()


@pytest.mark.parametrize("max_fan_in", [2, 4, 5, 7])
def test_balanced_tree_keeps_each_family_in_one_merge_at_the_fewest_levels(family_cosine, max_fan_in):
    """8 models in 4 pairs: at fan-in 2 each pair is a merge; at 4, 5 and 7 the first level has
    ceil(8/f) = 2 groups, each holding whole families. (At fan-in 3 the 3 groups of <= 3 cannot hold
    4 pairs whole, so one family must be split: left out.)"""
    tree = cluster_tree(NAMES, family_cosine, max_fan_in)
    _check_shape(tree, NAMES, max_fan_in)
    assert tree.depth == balanced_depth(len(NAMES), max_fan_in)
    for family in FAMILIES:
        parents = {tree.parent(m) for m in family}
        assert len(parents) == 1, f"{family} split across {parents}: {tree.nested()}"
    if max_fan_in == 2:
        assert sorted(sorted(tree.tasks(tree.parent(f[0]))) for f in FAMILIES) == FAMILIES


def _random_similarity(rng: np.random.Generator, k: int) -> np.ndarray:
    """Cosines of k random directions, some drawn near each other (clusters of random sizes)."""
    centres = rng.normal(size=(max(1, k // 3), 6))
    x = centres[rng.integers(0, len(centres), size=k)] + rng.uniform(0.1, 1.5) * rng.normal(size=(k, 6))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x @ x.T


def test_balanced_depth_is_ceil_log_f_k():
    assert [balanced_depth(k, 2) for k in (1, 2, 3, 4, 5, 8, 9, 16, 17, 32)] == [0, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    assert [balanced_depth(k, 3) for k in (3, 4, 9, 10, 27, 28)] == [1, 2, 2, 3, 3, 4]
    assert [balanced_depth(k, 5) for k in (5, 6, 25, 26, 40)] == [1, 2, 2, 3, 3]


def test_balanced_trees_never_exceed_ceil_log_f_k_on_random_similarities():
    """A property test over seeded random similarities: every k in 2..40 at every fan-in 2..5, three
    seeds each. The depth is exactly ceil(log_f k), no node has more than f children (nor fewer than
    2), every model is a leaf once, and the same input gives the same tree."""
    for seed in range(3):
        rng = np.random.default_rng(seed)
        for k in range(2, 41):
            sim = _random_similarity(rng, k)
            names = [f"m{i}" for i in range(k)]
            for f in range(2, 6):
                tree = cluster_tree(names, sim, f)
                _check_shape(tree, names, f)
                assert tree.depth == balanced_depth(k, f), (seed, k, f, tree.nested())
                assert len(tree.models()) == k
                assert cluster_tree(names, sim.copy(), f).nested() == tree.nested()


@pytest.mark.parametrize("max_fan_in", [2, 3, 4, 5])
@pytest.mark.parametrize("blocks", [2, 3, 5])
def test_balanced_tree_puts_similar_models_in_one_merge(max_fan_in, blocks):
    """Blocks of max_fan_in models, similar within (cosine ~0.8) and unrelated across (~0), shuffled:
    the first level's ceil(k/f) groups are exactly the blocks, each one merge."""
    rng = np.random.default_rng(max_fan_in * 10 + blocks)
    k = max_fan_in * blocks
    block_of = rng.permutation(np.repeat(np.arange(blocks), max_fan_in))
    sim = np.where(block_of[:, None] == block_of[None, :], 0.8, 0.0) + rng.uniform(-0.05, 0.05, (k, k))
    sim = (sim + sim.T) / 2
    np.fill_diagonal(sim, 1.0)
    names = [f"m{i}" for i in range(k)]
    tree = cluster_tree(names, sim, max_fan_in)
    _check_shape(tree, names, max_fan_in)
    for b in range(blocks):
        members = [names[i] for i in np.flatnonzero(block_of == b)]
        [parent] = {tree.parent(m) for m in members}
        assert sorted(tree.tasks(parent)) == sorted(members), tree.nested()


def test_balanced_pairs_are_the_best_matching_not_the_first_greedy_pair():
    """a-b is the single most similar pair, but taking it leaves c-d (0.0); a-c + b-d (0.8 + 0.8)
    is the better pairing, which a greedy merge of the closest pair first would miss."""
    names = ["a", "b", "c", "d"]
    sim = np.array([[1.0, 0.9, 0.8, 0.0],
                    [0.9, 1.0, 0.0, 0.8],
                    [0.8, 0.0, 1.0, 0.0],
                    [0.0, 0.8, 0.0, 1.0]])
    assert cluster_tree(names, sim, 2).nested() == [["a", "c"], ["b", "d"]]
    assert cluster_tree(names, sim, 2, shape="dendrogram").nested() != [["a", "c"], ["b", "d"]]


def test_binary_tree_has_k_minus_one_merges_and_depth_three(family_cosine):
    tree = cluster_tree(NAMES, family_cosine, 2)
    assert tree.depth == 3 and len(tree.merges()) == len(NAMES) - 1
    assert tree.fan_in == 2


def test_clustered_tree_is_deterministic(family_cosine):
    first = cluster_tree(NAMES, family_cosine, 3)
    again = cluster_tree(NAMES, family_cosine.copy(), 3)
    assert first.nested() == again.nested()
    assert first.render() == again.render()
    assert [first.children(n) for n in first.merges()] == [again.children(n) for n in again.merges()]


@settings(max_examples=60, deadline=None)
@given(
    k=st.integers(2, 12),
    max_fan_in=st.integers(2, 6),
    seed=st.integers(0, 2**16),
)
def test_fan_in_is_never_exceeded_on_random_similarities(k, max_fan_in, seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(k, 5))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    names = [f"m{i}" for i in range(k)]
    for shape in ("balanced", "dendrogram"):
        tree = cluster_tree(names, x @ x.T, max_fan_in, shape)
        _check_shape(tree, names, max_fan_in)
        assert cluster_tree(names, x @ x.T, max_fan_in, shape).nested() == tree.nested()
    assert MergeTree.from_nested(tree.nested(), names).nested() == tree.nested()


@pytest.mark.parametrize("max_fan_in", [2, 3, 4])
def test_models_without_structure_fill_every_node(max_fan_in):
    """Equally unrelated models: no cluster is worth keeping apart, so every node of the opened
    dendrogram takes as many children as it may (the shallowest tree the dendrogram allows)."""
    names = [f"m{i}" for i in range(9)]
    tree = cluster_tree(names, np.eye(9), max_fan_in, shape="dendrogram")
    _check_shape(tree, names, max_fan_in)
    for node in tree.merges():
        assert len(tree.children(node)) == min(max_fan_in, len(tree.tasks(node)))


def test_hand_given_groups_are_used_as_given():
    groups = [["pa", "pb"], ["qa", ["qb", "ra"]], "rb"]
    names = ["pa", "pb", "qa", "qb", "ra", "rb"]
    tree = tree_from_groups(groups, names)
    assert tree.nested() == groups
    assert tree.merges() == ["merge-pa+pb", "merge-qb+ra", "merge-qa+qb+ra", "merge-pa+pb+qa+qb+2 more"]
    assert tree.children("merge-pa+pb") == ["pa", "pb"]
    assert tree.children("merge-qb+ra") == ["qb", "ra"]
    assert tree.children("merge-qa+qb+ra") == ["qa", "merge-qb+ra"]
    assert tree.children("merge-pa+pb+qa+qb+2 more") == ["merge-pa+pb", "merge-qa+qb+ra", "rb"]
    assert tree.tasks("merge-qa+qb+ra") == ["qa", "qb", "ra"]
    assert tree.depth == 3 and tree.fan_in == 3
    # one-item lists collapse: [["a", "b"]] is the merge of a and b
    assert tree_from_groups([["pa", ["pb"]]], ["pa", "pb"]).nested() == ["pa", "pb"]


def test_flat_tree_is_one_merge_of_every_model():
    tree = flat_tree(NAMES)
    [root] = tree.merges()
    assert root == tree.root and tree.children(root) == NAMES
    assert tree.depth == 1 and tree.fan_in == len(NAMES)
    with pytest.raises(TreeError, match="at least 2 models"):
        flat_tree(["pa"])


def test_bad_groups_are_refused_with_every_problem_named():
    names = ["pa", "pb", "qa", "qb"]
    with pytest.raises(TreeError) as e:
        tree_from_groups([["pa", "zz"], ["pa", "qa"], []], names)
    message = str(e.value)
    assert "has 4 problem(s)" in message
    assert "unknown model(s) ['zz']" in message
    assert "model(s) ['pa'] appear more than once" in message
    assert "model(s) ['pb', 'qb'] are in no group" in message
    assert "groups[2] is an empty group" in message


@pytest.mark.parametrize(
    ("groups", "max_fan_in", "expected"),
    [
        ([["pa", "pb"], 3], None, r"groups\[1\] is 3; use model names"),
        ({"a": ["pa"]}, None, "must be a list"),
        ([["pa", "pb", "qa"], "qb"], 2, r"group \['pa', 'pb', 'qa'\] has 3 items, more than max_fan_in=2"),
        ([["pa", "pb", "qa", "qb"]], 1, "max_fan_in must be at least 2"),
    ],
)
def test_malformed_groups_are_refused(groups, max_fan_in, expected):
    with pytest.raises(TreeError, match=expected):
        tree_from_groups(groups, ["pa", "pb", "qa", "qb"], max_fan_in)


def test_single_model_groups_and_clashing_names_are_refused():
    with pytest.raises(TreeError, match="single model"):
        tree_from_groups([["pa"]], ["pa"])
    with pytest.raises(TreeError, match="look like merge node ids"):
        flat_tree(["merge-pa+pb", "pa"])
    with pytest.raises(TreeError, match="repeated"):
        cluster_tree(["pa", "pa"], np.eye(2), 2)
    with pytest.raises(TreeError, match="expected \\(3, 3\\)"):
        cluster_tree(["pa", "pb", "qa"], np.eye(2), 2)
    with pytest.raises(TreeError, match="at least 2"):
        cluster_tree(["pa", "pb"], np.eye(2), 1)
    with pytest.raises(TreeError, match="unknown tree shape 'chain'"):
        cluster_tree(["pa", "pb"], np.eye(2), 2, shape="chain")  # type: ignore[arg-type]
    with pytest.raises(TreeError, match="NaN or Inf"):
        cluster_tree(["pa", "pb"], np.array([[1.0, np.nan], [np.nan, 1.0]]), 2)


def test_render_draws_every_node_with_its_annotation():
    tree = tree_from_groups([["pa", "pb"], ["qa", "qb"]], ["pa", "pb", "qa", "qb"])
    picture = tree.render(lambda n: f"<{len(tree.tasks(n))} tasks>")
    assert picture.splitlines() == [
        "merge-pa+pb+qa+qb  <4 tasks>",
        "├── merge-pa+pb  <2 tasks>",
        "│   ├── pa",
        "│   └── pb",
        "└── merge-qa+qb  <2 tasks>",
        "    ├── qa",
        "    └── qb",
    ]
