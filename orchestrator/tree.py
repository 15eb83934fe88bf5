"""The merge tree: leaves are task models, internal nodes are merges, the root is the final model.

A ``MergeTree`` wraps a networkx DiGraph with edges parent -> child. Three ways to build one, all
through the same nested-list form (a list is a merge of its items; a string is a model):

- ``cluster_tree``, shape ``balanced`` (the default): the depth is fixed by k and the fan-in f,
  exactly ``ceil(log_f k)`` levels, and the task vectors' cosine similarity only decides which models
  share a merge. Level by level, the n current items are split into ``ceil(n/f)`` groups of at most f
  items with the most within-group similarity (the sum over pairs in a group): for f = 2 a
  maximum-weight matching of the most pairs (exact); for larger f the items are put in average-linkage
  dendrogram order (optimal leaf ordering, so similar items sit side by side) and cut into contiguous
  groups by dynamic programming (exact over such cuts). A group of one item is that item, passed up a
  level unmerged. The next level's items are the groups, their similarity the mean over the models'
  pairs beneath them. Every model goes through at most ``ceil(log_f k)`` merges, each trained without
  knowing what comes after it, so errors compound over as few greedy merges as the fan-in allows, and
  the nodes of one level are independent (they run side by side, supermerge.orchestrator.parallel).
- ``cluster_tree``, shape ``dendrogram``: agglomerative clustering (average linkage on ``1 - cosine``)
  of the task vectors, then the binary dendrogram is opened top-down: a node's children start as its two dendrogram
  branches, and the branch that joined at the largest distance (the least coherent one) is replaced by
  its own two branches until the node has ``max_fan_in`` children or every branch left joined at
  less than ``OPEN_RATIO`` of the node's own distance. Tight clusters therefore stay together as their
  own merge (similar models merge first: the point of the tree), and where the models have no such
  structure every node gets as many children as it may. Where models do cluster this gives chains
  (4 tasks at depth 3, 6 at depth 4): kept for comparison, ``tree.shape: dendrogram``.
- ``tree_from_groups``: the user's nested lists (YAML), checked all at once.
- ``flat_tree``: one merge of everything.

Children are ordered by where their first model appears in the input. A merge node is named after
the task models beneath it (``node_id``: ``merge-pa+pb``, ``merge-pa+pb+qa+qb+3 more``), so a subtree
keeps its name from run to run and in a tree grown by new models, whatever else changed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

import networkx as nx
import numpy as np

from supermerge.orchestrator.errors import TreeError

MERGE_PREFIX = "merge-"
SHOWN_TASKS = 4
"""Task names spelled out in a node id; a bigger subtree says how many more."""

OPEN_RATIO = 0.5
"""A dendrogram branch is folded into the node above it only if it joined at no less than this share
of that node's distance; a much tighter branch (a cluster of similar models) stays a merge of its own,
even when that leaves the node fewer than ``max_fan_in`` children."""

TreeShape = Literal["balanced", "dendrogram"]
"""How ``cluster_tree`` shapes the tree (module docstring)."""

Nested = list[Any]
"""A tree as nested lists: ``[["a", "b"], ["c", "d", "e"], "f"]``; each list is one merge."""


class MergeTree:
    """A rooted tree of merges over named task models (see the module docstring)."""

    def __init__(self, graph: nx.DiGraph, root: str) -> None:
        self.graph = graph
        self.root = root

    @classmethod
    def from_nested(cls, nested: Nested, order: Sequence[str] | None = None) -> MergeTree:
        """Build from nested lists (already checked). ``order`` ranks models for ordering children."""
        rank = {name: i for i, name in enumerate(order or _names_in(nested))}
        graph = nx.DiGraph()

        def first(item: Any) -> int:
            return rank[item] if isinstance(item, str) else min(first(x) for x in item)

        def build(item: Any) -> tuple[str, list[str]]:
            if isinstance(item, str):
                graph.add_node(item, kind="model")
                return item, [item]
            built = [build(x) for x in sorted(item, key=first)]
            children = [c for c, _ in built]
            tasks = [t for _, ts in built for t in ts]
            node = node_id(tasks)
            graph.add_node(node, kind="merge", children=children)
            for c in children:
                graph.add_edge(node, c)
            return node, tasks

        root, _ = build(_collapse(nested))
        return cls(graph, root)

    def is_model(self, node: str) -> bool:
        return self.graph.nodes[node]["kind"] == "model"

    def children(self, node: str) -> list[str]:
        return list(self.graph.nodes[node].get("children", []))

    def merges(self) -> list[str]:
        """Merge nodes bottom-up: every node comes after all of its children (post-order)."""
        out: list[str] = []

        def walk(n: str) -> None:
            for c in self.children(n):
                walk(c)
            if not self.is_model(n):
                out.append(n)

        walk(self.root)
        return out

    def models(self) -> list[str]:
        """Task models (leaves), in tree order (left to right)."""
        out: list[str] = []

        def walk(n: str) -> None:
            if self.is_model(n):
                out.append(n)
            for c in self.children(n):
                walk(c)

        walk(self.root)
        return out

    def tasks(self, node: str) -> list[str]:
        """The task models under ``node`` (itself for a model), in tree order."""
        if self.is_model(node):
            return [node]
        return [m for c in self.children(node) for m in self.tasks(c)]

    def parent(self, node: str) -> str | None:
        preds = list(self.graph.predecessors(node))
        return preds[0] if preds else None

    @property
    def fan_in(self) -> int:
        """The most children any merge node has."""
        return max(len(self.children(n)) for n in self.merges())

    @property
    def depth(self) -> int:
        """Merge levels from the deepest model to the root (1 for a flat merge)."""
        return int(nx.dag_longest_path_length(self.graph))

    def nested(self) -> Nested:
        """The tree as nested lists (the ``groups`` form; ``from_nested(t.nested())`` rebuilds it)."""

        def item(n: str) -> Any:
            return n if self.is_model(n) else [item(c) for c in self.children(n)]

        return item(self.root)

    def render(self, annotate: Callable[[str], str] | None = None) -> str:
        """A text picture, root first; ``annotate(node)`` adds text after merge nodes' names."""
        lines: list[str] = []

        def label(n: str) -> str:
            if self.is_model(n) or annotate is None:
                return n
            extra = annotate(n)
            return f"{n}  {extra}" if extra else n

        def walk(n: str, prefix: str, last: bool, top: bool) -> None:
            lines.append(label(n) if top else f"{prefix}{'└── ' if last else '├── '}{label(n)}")
            kids = self.children(n)
            for i, c in enumerate(kids):
                walk(c, "" if top else prefix + ("    " if last else "│   "), i == len(kids) - 1, False)

        walk(self.root, "", True, True)
        return "\n".join(lines)


def node_id(tasks: Sequence[str]) -> str:
    """A merge node's name from the task models beneath it, in tree order. Unique in a tree: two
    nodes that share their first task are nested, so they differ in how many tasks they hold."""
    shown = "+".join(tasks[:SHOWN_TASKS])
    more = f"+{len(tasks) - SHOWN_TASKS} more" if len(tasks) > SHOWN_TASKS else ""
    return f"{MERGE_PREFIX}{shown}{more}"


def _names_in(nested: Any) -> list[str]:
    if isinstance(nested, str):
        return [nested]
    return [n for x in nested for n in _names_in(x)]


def _collapse(item: Any) -> Any:
    """A one-item list is its item: ``[["a", "b"]]`` is the merge of a and b."""
    if isinstance(item, str):
        return item
    items = [_collapse(x) for x in item]
    return items[0] if len(items) == 1 else items


def _check_names(names: Sequence[str]) -> None:
    clash = sorted(n for n in names if n.startswith(MERGE_PREFIX) and "+" in n)
    if clash:
        raise TreeError(f"model name(s) {clash} look like merge node ids ({MERGE_PREFIX}a+b); rename them")
    dupes = sorted({n for n in names if list(names).count(n) > 1})
    if dupes:
        raise TreeError(f"model names must be unique; repeated: {dupes}")


def _check_fan_in(max_fan_in: int) -> None:
    if max_fan_in < 2:
        raise TreeError(f"max_fan_in must be at least 2 (a merge needs two models), got {max_fan_in}")


def flat_tree(names: Sequence[str]) -> MergeTree:
    """One merge of every model."""
    _check_names(names)
    if len(names) < 2:
        raise TreeError(f"a merge needs at least 2 models, got {len(names)}")
    return MergeTree.from_nested(list(names), names)


def tree_from_groups(groups: Nested, names: Sequence[str], max_fan_in: int | None = None) -> MergeTree:
    """The user's tree: nested lists naming every model exactly once; all problems in one error."""
    _check_names(names)
    if not isinstance(groups, list):
        raise TreeError(f"tree.groups must be a list of model names and lists, got {type(groups).__name__}")
    problems: list[str] = []
    seen: list[str] = []

    def walk(item: Any, where: str) -> None:
        if isinstance(item, str):
            seen.append(item)
        elif isinstance(item, list):
            if not item:
                problems.append(f"{where} is an empty group")
            for i, x in enumerate(item):
                walk(x, f"{where}[{i}]")
        else:
            problems.append(f"{where} is {item!r}; use model names (strings) and lists")

    walk(groups, "groups")
    unknown = sorted(set(seen) - set(names))
    if unknown:
        problems.append(f"unknown model(s) {unknown}; the config's models are {list(names)}")
    repeated = sorted({n for n in seen if seen.count(n) > 1})
    if repeated:
        problems.append(f"model(s) {repeated} appear more than once")
    missing = [n for n in names if n not in seen]
    if missing:
        problems.append(f"model(s) {missing} are in no group; every model must appear once")
    if not problems:
        collapsed = _collapse(groups)
        if isinstance(collapsed, str):
            problems.append("the groups hold a single model; a merge needs at least 2")
        elif max_fan_in is not None:
            _check_fan_in(max_fan_in)
            wide = _wide_groups(collapsed, max_fan_in)
            problems += [f"group {g} has {len(g)} items, more than max_fan_in={max_fan_in}" for g in wide]
    if problems:
        raise TreeError(f"tree.groups has {len(problems)} problem(s):\n" + "\n".join(f"  - {p}" for p in problems))
    return MergeTree.from_nested(groups, names)


def _wide_groups(item: Any, max_fan_in: int) -> list[Any]:
    if isinstance(item, str):
        return []
    own = [item] if len(item) > max_fan_in else []
    return own + [g for x in item for g in _wide_groups(x, max_fan_in)]


def balanced_depth(k: int, max_fan_in: int) -> int:
    """``ceil(log_f k)``: the fewest merge levels that join k models at fan-in at most f (integer
    arithmetic, no float log: 1 for k <= f)."""
    depth, reach = 0, 1
    while reach < k:
        depth, reach = depth + 1, reach * max_fan_in
    return depth


def cluster_tree(
    names: Sequence[str], similarity: np.ndarray, max_fan_in: int, shape: TreeShape = "balanced"
) -> MergeTree:
    """A tree of fan-in at most ``max_fan_in`` over the models, grouped by ``similarity`` (k x k
    cosine); ``shape`` says how (see the module docstring)."""
    _check_names(names)
    _check_fan_in(max_fan_in)
    k = len(names)
    sim = np.asarray(similarity, dtype=np.float64)
    if sim.shape != (k, k):
        raise TreeError(f"similarity has shape {sim.shape}, expected ({k}, {k}) for {k} models")
    if k < 2:
        raise TreeError(f"a merge needs at least 2 models, got {k}")
    if not np.isfinite(sim).all():
        raise TreeError("similarity holds NaN or Inf; recompute it (supermerge.orchestrator.similarity) from finite task vectors")
    sim = (sim + sim.T) / 2.0
    if shape == "balanced":
        return MergeTree.from_nested(_balanced(names, sim, max_fan_in), names)
    if shape == "dendrogram":
        return MergeTree.from_nested(_dendrogram(names, sim, max_fan_in), names)
    raise TreeError(f"unknown tree shape {shape!r}; choose 'balanced' or 'dendrogram'")


def _balanced(names: Sequence[str], sim: np.ndarray, max_fan_in: int) -> Any:
    """Level by level, ``ceil(n/f)`` groups of the n items (module docstring); nested lists."""
    items: list[Any] = list(names)
    leaves: list[list[int]] = [[i] for i in range(len(names))]
    while len(items) > 1:
        n = len(items)
        between = np.array([[sim[np.ix_(a, b)].mean() for b in leaves] for a in leaves])
        groups = _group(between, max_fan_in, math.ceil(n / max_fan_in))
        items = [items[g[0]] if len(g) == 1 else [items[i] for i in g] for g in groups]
        leaves = [[m for i in g for m in leaves[i]] for g in groups]
    return items[0]


def _group(sim: np.ndarray, max_size: int, n_groups: int) -> list[list[int]]:
    """Split items 0..n-1 into ``n_groups`` groups of at most ``max_size`` with the largest sum of
    within-group pairwise ``sim``; each group's items ascending, groups by their first item."""
    n = len(sim)
    if n_groups == 1:
        return [list(range(n))]
    if max_size == 2:
        graph = nx.Graph()
        graph.add_nodes_from(range(n))
        # +3 keeps every weight positive (cosines are >= -1); with maxcardinality every matching has the
        # same number of pairs, so the shift changes no choice
        graph.add_weighted_edges_from((i, j, float(sim[i, j]) + 3.0) for i in range(n) for j in range(i + 1, n))
        pairs = nx.max_weight_matching(graph, maxcardinality=True)
        paired = {i for p in pairs for i in p}
        groups = [sorted(p) for p in pairs] + [[i] for i in range(n) if i not in paired]
        return sorted(groups)
    order = _leaf_order(sim)
    cuts = _best_cuts(sim[np.ix_(order, order)], max_size, n_groups)
    return sorted(sorted(order[a:b]) for a, b in cuts)


def _leaf_order(sim: np.ndarray) -> list[int]:
    """The items in average-linkage dendrogram order, leaves optimally ordered (similar ones adjacent)."""
    from scipy.cluster.hierarchy import leaves_list, linkage, optimal_leaf_ordering
    from scipy.spatial.distance import squareform

    distance = np.clip(1.0 - sim, 0.0, 2.0)
    np.fill_diagonal(distance, 0.0)
    condensed = squareform(distance, checks=False)
    tree = linkage(condensed, method="average")
    return [int(i) for i in leaves_list(optimal_leaf_ordering(tree, condensed))]


def _best_cuts(sim: np.ndarray, max_size: int, n_groups: int) -> list[tuple[int, int]]:
    """Cut 0..n-1 into ``n_groups`` contiguous runs of 1..max_size items maximising the sum of
    within-run pairwise ``sim`` (dynamic programming, O(n * n_groups * max_size)); [(start, end)]."""
    n = len(sim)
    upper = np.triu(sim, 1)

    def pair_sum(a: int, b: int) -> float:
        return float(upper[a:b, a:b].sum())

    best = np.full((n_groups + 1, n + 1), -np.inf)
    choice = np.zeros((n_groups + 1, n + 1), dtype=int)
    best[0, 0] = 0.0
    for g in range(1, n_groups + 1):
        for end in range(g, min(n, g * max_size) + 1):
            for size in range(1, min(max_size, end) + 1):
                score = best[g - 1, end - size] + pair_sum(end - size, end)
                if score > best[g, end] + 1e-12:
                    best[g, end], choice[g, end] = score, size
    cuts, end = [], n
    for g in range(n_groups, 0, -1):
        size = int(choice[g, end])
        cuts.append((end - size, end))
        end -= size
    return cuts[::-1]


def _dendrogram(names: Sequence[str], sim: np.ndarray, max_fan_in: int) -> Any:
    """The average-linkage dendrogram opened top-down (module docstring); nested lists."""
    from sklearn.cluster import AgglomerativeClustering

    k = len(names)
    distance = np.clip(1.0 - sim, 0.0, 2.0)
    np.fill_diagonal(distance, 0.0)
    clustering = AgglomerativeClustering(
        n_clusters=None, distance_threshold=0.0, metric="precomputed", linkage="average",
        compute_full_tree=True, compute_distances=True,
    ).fit(distance)
    branches = {k + t: (int(a), int(b)) for t, (a, b) in enumerate(clustering.children_)}
    height = {k + t: float(h) for t, h in enumerate(clustering.distances_)}

    def open_node(node: int) -> list[int]:
        frontier = list(branches[node])
        while len(frontier) < max_fan_in:
            inner = [n for n in frontier if n in branches and height[n] >= OPEN_RATIO * height[node]]
            if not inner:
                break
            widest = max(inner, key=lambda n: (height[n], -n))
            i = frontier.index(widest)
            frontier[i : i + 1] = branches[widest]
        return frontier

    def nest(node: int) -> Any:
        return names[node] if node < k else [nest(c) for c in open_node(node)]

    return nest(2 * k - 2)
