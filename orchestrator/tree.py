"""The merge tree: leaves are task models, internal nodes are merges, the root is the final model.

A ``MergeTree`` wraps a networkx DiGraph with edges parent -> child. Three ways to build one, all
through the same nested-list form (a list is a merge of its items; a string is a model):

- ``cluster_tree``: agglomerative clustering (average linkage on ``1 - cosine``) of the task vectors,
  then the binary dendrogram is opened top-down: a node's children start as its two dendrogram
  branches, and the branch that joined at the largest distance (the least coherent one) is replaced by
  its own two branches until the node has ``max_fan_in`` children or every branch left joined at
  less than ``OPEN_RATIO`` of the node's own distance. Tight clusters therefore stay together as their
  own merge (similar models merge first: the point of the tree), and where the models have no such
  structure every node gets as many children as it may, so the tree is as shallow as the fan-in allows.
- ``tree_from_groups``: the user's nested lists (YAML), checked all at once.
- ``flat_tree``: one merge of everything.

Children are ordered by where their first model appears in the input. A merge node is named after
the task models beneath it (``node_id``: ``merge-pa+pb``, ``merge-pa+pb+qa+qb+3 more``), so a subtree
keeps its name from run to run and in a tree grown by new models, whatever else changed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import networkx as nx
import numpy as np

from orchestrator.errors import TreeError

MERGE_PREFIX = "merge-"
SHOWN_TASKS = 4
"""Task names spelled out in a node id; a bigger subtree says how many more."""

OPEN_RATIO = 0.5
"""A dendrogram branch is folded into the node above it only if it joined at no less than this share
of that node's distance; a much tighter branch (a cluster of similar models) stays a merge of its own,
even when that leaves the node fewer than ``max_fan_in`` children."""

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


def cluster_tree(names: Sequence[str], similarity: np.ndarray, max_fan_in: int) -> MergeTree:
    """Agglomerative clustering of ``1 - similarity`` (k x k), opened into a tree of fan-in at most
    ``max_fan_in`` (see the module docstring)."""
    from sklearn.cluster import AgglomerativeClustering

    _check_names(names)
    _check_fan_in(max_fan_in)
    k = len(names)
    sim = np.asarray(similarity, dtype=np.float64)
    if sim.shape != (k, k):
        raise TreeError(f"similarity has shape {sim.shape}, expected ({k}, {k}) for {k} models")
    if k < 2:
        raise TreeError(f"a merge needs at least 2 models, got {k}")
    distance = np.clip(1.0 - (sim + sim.T) / 2.0, 0.0, 2.0)
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

    return MergeTree.from_nested(nest(2 * k - 2), names)
