"""Re-merging when task models arrive: grow the previous merge tree instead of clustering anew.

Clustering k+1 task vectors can reshape the whole tree, and a reshaped tree shares few nodes with the
old one, so nearly every node would be merged again. Instead each new model becomes a leaf beside its
most similar existing leaf (task-vector cosine): it joins that leaf's merge node when the node has
room under the fan-in, else the two become a new merge of their own in the leaf's place. Every subtree
off that path keeps its children, tasks and data, so its store key (supermerge.orchestrator.store.node_key) and
its finished checkpoint; only the nodes from the new leaf up to the root are merged.

The previous tree is read from the ``merge_report.json`` that publishing writes beside the output.
It is reused as it is (no new model) or grown (new models) only when the config's ``tree:`` settings
are those it was planned with and no model was dropped; anything else plans from scratch.

``plan()`` takes the grown tree as hand-given groups (``tree.groups``), which keeps plan.py as it is.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from supermerge.merge_core.config import MergeConfig
from supermerge.orchestrator.errors import MemoryBudgetError, StoreError, TreeError
from supermerge.orchestrator.publish import REPORT_FILE
from supermerge.orchestrator.plan import MergePlan, plan
from supermerge.orchestrator.similarity import Similarity, task_vector_similarity
from supermerge.orchestrator.tree import MergeTree, Nested

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PreviousTree:
    """The tree of the merge published at ``output``: nested groups, its fan-in, and the ``tree:``
    settings (resolved) it was planned with."""

    groups: Nested
    fan_in: int
    tree_settings: dict[str, Any]
    shape: str = ""
    """The plan's shape (MergePlan.shape); "" in reports older than it."""

    def models(self) -> list[str]:
        return MergeTree.from_nested(self.groups).models()


def read_previous_tree(output: Path) -> PreviousTree | None:
    """The previous run's tree from ``output/merge_report.json``; None when nothing was published."""
    f = Path(output) / REPORT_FILE
    if not f.is_file():
        return None
    try:
        report = json.loads(f.read_text())
        groups = report["plan"]["groups"]
        fan_in = int(report["plan"]["fan_in"])
        settings = dict(report["config"]["tree"])
        shape = str(report["plan"].get("shape", ""))
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise StoreError(f"{f} has no readable plan/config ({e}); delete it or re-plan from scratch "
                         "(replan=True)") from None
    return PreviousTree(groups if isinstance(groups, list) else [groups], fan_in, settings, shape)


def _holder(nested: list[Any], leaf: str) -> list[Any] | None:
    """The list (merge group) that holds ``leaf`` directly."""
    if leaf in nested:
        return nested
    for item in nested:
        if isinstance(item, list):
            found = _holder(item, leaf)
            if found is not None:
                return found
    return None


def grow_tree(groups: Nested, new: Sequence[str], similarity: Similarity, max_fan_in: int) -> Nested:
    """``groups`` with each ``new`` model placed beside its most similar leaf (in ``new``'s order, so
    a later new model may sit beside an earlier one): in that leaf's group when it has fewer than
    ``max_fan_in`` items, else paired with the leaf as a new group in the leaf's place."""
    if max_fan_in < 2:
        raise TreeError(f"max_fan_in must be at least 2, got {max_fan_in}")
    tree = copy.deepcopy(groups)
    leaves = MergeTree.from_nested(tree).models()
    index = {n: i for i, n in enumerate(similarity.names)}
    unknown = [n for n in [*leaves, *new] if n not in index]
    if unknown:
        raise TreeError(f"the similarity given has no row for model(s) {unknown}; it covers {similarity.names}")
    for name in new:
        if name in leaves:
            raise TreeError(f"model {name!r} is already a leaf of the previous tree")
        row = similarity.cosine[index[name]]
        nearest = leaves[int(np.argmax([row[index[leaf]] for leaf in leaves]))]
        group = _holder(tree, nearest)
        assert group is not None
        if len(group) < max_fan_in:
            group.append(name)
        else:
            group[group.index(nearest)] = [nearest, name]
        leaves.append(name)
    return tree


def path_to_root(tree: MergeTree, model: str) -> list[str]:
    """The merge nodes above ``model``, its parent first and the root last."""
    out = []
    node = tree.parent(model)
    while node is not None:
        out.append(node)
        node = tree.parent(node)
    return out


def reusable(config: MergeConfig, previous: PreviousTree) -> list[str] | None:
    """The config's models that are new to ``previous`` ([] when none), or None when the previous
    tree cannot be reused: other ``tree:`` settings, a model dropped, or a flat merge (one node, which
    is merged again whatever the tree)."""
    names = [m.name for m in config.models]
    old = previous.models()
    if config.tree.flat:
        return None
    if previous.shape == "flat-compressed":
        log.info("the previous merge was flat over compressed task vectors; planning from scratch")
        return None
    if previous.tree_settings != config.tree.model_dump(mode="json"):
        log.info("tree settings changed since the previous merge (%s -> %s); planning from scratch",
                 previous.tree_settings, config.tree.model_dump(mode="json"))
        return None
    dropped = [n for n in old if n not in names]
    if dropped:
        log.info("model(s) %s left the config since the previous merge; planning from scratch", dropped)
        return None
    return [n for n in names if n not in old]


def incremental_plan(
    config: MergeConfig,
    previous: PreviousTree,
    *,
    similarity: Similarity | None = None,
    progress: bool = False,
    **plan_options: Any,
) -> MergePlan | None:
    """Plan ``config`` on the previous tree, grown by the config's new models; None when the previous
    tree cannot be reused (see ``reusable``) and the caller should ``plan(config)`` from scratch.

    The fan-in cap for new leaves is ``tree.max_fan_in``, else the previous plan's fan-in (which the
    memory planner chose). A grown tree whose nodes do not fit the budget is refused, naming the way
    out, rather than silently re-clustered.
    """
    new = reusable(config, previous)
    if new is None:
        return None
    groups = previous.groups
    if new:
        if similarity is None:
            similarity = task_vector_similarity(
                config.base, {m.name: m.path for m in config.models}, head_prefixes=config.head_prefixes,
                progress=progress,
            )
        groups = grow_tree(groups, new, similarity, config.tree.max_fan_in or previous.fan_in)
    # the previous tree's shape is in its groups now; tree.shape shapes only a clustered tree
    grown = config.model_copy(update={"tree": config.tree.model_copy(
        update={"groups": groups, "flat": False, "shape": "balanced"})})
    try:
        result = plan(grown, similarity=similarity, progress=progress, **plan_options)
    except MemoryBudgetError as e:
        raise MemoryBudgetError(
            f"the previous merge tree grown by {new} does not fit: {e}. Re-plan from scratch (replan=True, "
            "or remove the previous output's merge_report.json) so the planner may choose the fan-in"
        ) from None
    reason = (f"the previous tree, grown by {', '.join(new)} beside the most similar leaves" if new
              else "the previous tree (same models, same tree settings)")
    return dataclasses.replace(result, config=config, fan_in_reason=reason)


def plan_with_previous(config: MergeConfig, *, replan: bool = False, progress: bool = False,
                       published: Path | None = None) -> MergePlan:
    """The plan a re-run should follow: the tree published at ``published`` (default
    ``config.output``; a versioned output's current version) grown by any new models, when it can be
    reused, else ``plan(config)`` from scratch (always with ``replan``)."""
    previous = None if replan else read_previous_tree(published if published is not None else config.output)
    grown = incremental_plan(config, previous, progress=progress) if previous is not None else None
    return grown if grown is not None else plan(config, progress=progress)
