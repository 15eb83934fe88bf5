"""From a merge config to a plan: the merge tree, each node's predicted peak and device, the fan-in.

``plan`` does everything that can be decided before a weight is merged, and refuses there: it reads
headers, every model's values once (NaN/Inf), validation and test data and (when clustering) the
task vectors' similarity, and writes nothing. The fan-in is the largest whose every node fits the
memory budget, up to ``tree.max_fan_in`` when given, trying a flat merge first (it needs no
similarity); a flat merge (``tree.flat``) or hand-given groups are taken as they are, and refused if
a node does not fit.
``supermerge plan`` prints ``MergePlan.render()``; the executor runs ``MergePlan.nodes`` bottom-up.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from supermerge.merge_core.config import MergeConfig
from supermerge.merge_core.data import TaskData
from supermerge.merge_core.devices import resolve_device
from supermerge.merge_core.errors import ConfigError, DataError
from supermerge.merge_core.job import DataCache
from supermerge.merge_core.methods.learned import STORAGE_DTYPES, LearnedMergeConfig, weight_groups
from supermerge.merge_core.methods.learned_peak import (LearnedWorkload, compressed_factored_product_values,
                                                        compressed_loaded_values, compressed_stack_values)
from supermerge.merge_core.methods.per_tensor_peak import PerTensorWorkload
from supermerge.merge_core.methods.registry import MethodSpec, Temporaries, get_method
from supermerge.merge_core.peak import ModelShape, Workload
from supermerge.merge_core.preflight import check_base, check_model_config, check_task_data, task_heads
from supermerge.merge_core.stream import streamable
from supermerge.merge_core.stream_peak import StreamedWorkload, streamed_io_bytes, streamed_mapped_bytes
from supermerge.orchestrator.budget import Budget, make_budget
from supermerge.orchestrator.errors import MemoryBudgetError, TreeError
from supermerge.orchestrator.hardware import MemoryInventory, read_inventory
from supermerge.orchestrator.model_inventory import ModelInventory
from supermerge.orchestrator.node import ChildRef, NodeTask
from supermerge.orchestrator.placement import Placement, describe, place_node
from supermerge.orchestrator.similarity import Similarity, task_vector_similarity
from supermerge.orchestrator.sizes import format_bytes
from supermerge.orchestrator.store import data_digest, model_key, node_key
from supermerge.orchestrator.tree import MergeTree, balanced_depth, cluster_tree, flat_tree, tree_from_groups

log = logging.getLogger(__name__)


@dataclass
class MergePlan:
    """What will run: ``nodes`` bottom-up (the last is the root), each with its device and prediction.

    ``fan_in``: the most inputs any node merges; ``fan_in_reason``: why that fan-in; ``shape``: how the
    tree was shaped (``flat``, ``groups`` by hand, or a clustered ``tree.shape``: ``balanced`` /
    ``dendrogram``).
    """

    config: MergeConfig
    tree: MergeTree
    fan_in: int
    fan_in_reason: str
    nodes: list[NodeTask]
    budget: Budget
    inventory: MemoryInventory
    similarity: Similarity | None = None
    shape: str = "flat"
    data: DataCache = dataclasses.field(default_factory=lambda: DataCache())
    """The run's validation and test data, read and tokenised once (planning read them already)."""

    @property
    def root(self) -> NodeTask:
        return self.nodes[-1]

    def node(self, node_id: str) -> NodeTask:
        for n in self.nodes:
            if n.id == node_id:
                return n
        raise KeyError(node_id)

    def render(self) -> str:
        """The text ``supermerge plan`` prints: summary, tree picture, per-node memory table."""
        k = len(self.tree.models())
        gpus = ", ".join(f"cuda:{g.index} {g.name} {format_bytes(g.free_bytes)} free"
                         for g in self.inventory.gpus) or f"none ({self.inventory.gpu_note})"
        lines = [
            f"{k} models -> {len(self.nodes)} merge(s), fan-in {self.fan_in} ({self.fan_in_reason}), "
            f"depth {self.tree.depth}, method {self.config.method}",
            self._shape_line(k),
            f"budget per node: {format_bytes(self.budget.host)} RAM ({self.budget.source}); GPUs: {gpus}",
            f"{self.config.max_length_resolved.describe()}: tokens per example for merge training and scoring",
            "",
            self.tree.render(lambda n: self._annotation(n)),
            "",
            "| node | inputs | tasks | device | predicted peak | eq. 6 part | task vectors (loaded + stacked) "
            "| activations |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for n in self.nodes:
            p = n.predicted
            lines.append(
                f"| {n.id} | {len(n.children)} | {len(n.tasks)} | {n.device} | {format_bytes(p.peak)} "
                f"| {format_bytes(p.eq6)} | {format_bytes(p.task_vectors + p.stacked_task_vectors)} "
                f"| {format_bytes(p.activations)} |"
            )
        return "\n".join(lines)

    def _shape_line(self, k: int) -> str:
        """Which shape, and its depth against ceil(log_f k), the fewest levels the fan-in allows."""
        fewest = balanced_depth(k, self.fan_in)
        why = {
            "flat": "one merge of every model",
            "flat-compressed": "one merge of every model over compressed task vectors, supermerge.merge_core.compress",
            "groups": "tree.groups, as given",
            "balanced": "similarity chose which models share a merge, the fan-in fixed the depth",
            "dendrogram": "tree.shape: dendrogram, the similarity dendrogram opened top-down",
        }.get(self.shape, self.shape)
        return (f"tree shape: {self.shape} ({why}), depth {self.tree.depth}; "
                f"ceil(log_{self.fan_in} {k}) = {fewest}")

    def _annotation(self, node_id: str) -> str:
        n = self.node(node_id)
        where = f"{n.device} (task vectors in host memory)" if n.task_vector_device else n.device
        return f"[{len(n.tasks)} tasks] {where}, predicted {format_bytes(n.predicted.peak)}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "groups": self.tree.nested(),
            "fan_in": self.fan_in,
            "fan_in_reason": self.fan_in_reason,
            "shape": self.shape,
            "depth": self.tree.depth,
            "nodes": [n.to_dict() for n in self.nodes],
            "budget": self.budget.to_dict(),
            "inventory": self.inventory.to_dict(),
            "similarity": self.similarity.to_dict() if self.similarity is not None else None,
        }


# --- planning ---------------------------------------------------------------------------------------


def _learned_config(spec: MethodSpec, params: Mapping[str, Any]) -> LearnedMergeConfig | None:
    """The learned method's settings with the config's parameters (for W's size and the batch size)."""
    if spec.learned is None:
        return None
    fields = {f.name for f in dataclasses.fields(LearnedMergeConfig)}
    unknown = sorted(set(params) - fields)
    if unknown:
        raise ConfigError(f"method {spec.name!r} has no parameter(s) {unknown}; it takes {sorted(fields)}")
    return dataclasses.replace(spec.learned, **dict(params))


def _candidate_count(spec: MethodSpec, params: Mapping[str, Any]) -> int:
    """How many grid-search candidates a per-tensor method tries (a list value or search: true)."""
    from supermerge.merge_core.merge import _candidates

    return len(_candidates(spec, params)) if spec.kind == "per_tensor" else 1


def _check_tree_config(config: MergeConfig, k: int) -> None:
    tree = config.tree
    problems = []
    if tree.flat and tree.groups is not None:
        problems.append("tree.flat and tree.groups both given; choose one")
    if tree.flat and tree.max_fan_in is not None and tree.max_fan_in < k:
        problems.append(f"tree.flat merges all {k} models in one node, but tree.max_fan_in is {tree.max_fan_in}")
    if tree.shape != "balanced" and (tree.flat or tree.groups is not None):  # the default is harmless
        problems.append(f"tree.shape ({tree.shape}) shapes a clustered tree, but tree.flat or tree.groups is given; "
                        "drop tree.shape or let the planner cluster")
    if problems:
        raise TreeError("tree config: " + "; ".join(problems))


@dataclass(frozen=True)
class _Inputs:
    """What planning reads once, whatever the tree."""

    config: MergeConfig
    shape: ModelShape
    val: dict[str, TaskData]
    learned: LearnedMergeConfig | None
    candidates: int
    scaled_search: bool
    n_groups: int
    loaded: dict[str, int]
    keys: dict[str, str]
    base_key: str
    streamed: bool = False
    """A per-tensor method with fixed parameters: every node merges disk to disk (supermerge.merge_core.stream)."""
    temporaries: Temporaries = dataclasses.field(default_factory=Temporaries)
    file_bytes: dict[str, int] = dataclasses.field(default_factory=dict)
    """Weight-file bytes of each model and of the base (key ``""``): what a streamed node reads."""
    largest_stored_bytes: int = 0
    labels: dict[str, dict[str, int] | None] = dataclasses.field(default_factory=dict)
    """Each task's label name -> class id (its fine-tune's ``id2label``), None where it names none."""


def _seq_len(data: TaskData) -> int:
    ids = data.inputs.get("input_ids", next(iter(data.inputs.values())))
    return int(ids.shape[1]) if ids.dim() > 1 else 1


def _workload(inputs: _Inputs, tree: MergeTree, node: str, compressed: bool = False) -> Workload:
    """What ``node`` holds, as its engine's formula needs it: streamed, in memory per tensor, or learned
    (``compressed``: over compressed task vectors, see ``_learned_workload``)."""
    if inputs.streamed:
        return _streamed_workload(inputs, tree, node)
    if inputs.learned is None:
        return PerTensorWorkload(
            k=len(tree.children(node)), loaded_values=sum(_loaded_per_child(inputs, tree, node)),
            batches=_batches(inputs, tree, node, None), candidates=inputs.candidates,
            scaled_search=inputs.scaled_search, temporaries=inputs.temporaries,
        )
    return _learned_workload(inputs, inputs.learned, tree, node, compressed)


def _loaded_per_child(inputs: _Inputs, tree: MergeTree, node: str) -> list[int]:
    """fp32 values each child's loaded task vector holds (a merged child is a full model)."""
    return [inputs.loaded[c] if tree.is_model(c) else inputs.shape.n_params for c in tree.children(node)]


def _batches(inputs: _Inputs, tree: MergeTree, node: str, batch_size: int | None) -> tuple[tuple[int, int], ...]:
    """One (examples, sequence length) per task of the subtree with validation data, at most
    ``batch_size`` examples (a learned merge's step)."""
    out = []
    for t in tree.tasks(node):
        if t in inputs.val:
            rows = len(inputs.val[t]) if batch_size is None else min(len(inputs.val[t]), batch_size)
            out.append((rows, _seq_len(inputs.val[t])))
    return tuple(out)


def _streamed_workload(inputs: _Inputs, tree: MergeTree, node: str) -> StreamedWorkload:
    children = tree.children(node)
    n = inputs.shape.n_params
    read = inputs.file_bytes[""] + sum(inputs.file_bytes[c] if tree.is_model(c) else inputs.file_bytes[""]
                                       for c in children)
    return StreamedWorkload(
        k=len(children),
        loaded_values=sum(inputs.loaded[c] for c in children if tree.is_model(c) and inputs.loaded[c] != n),
        temporaries=inputs.temporaries,
        mapped_bytes=streamed_mapped_bytes(inputs.largest_stored_bytes, len(children), read),
        io_bytes=streamed_io_bytes(inputs.largest_stored_bytes, inputs.shape.largest_tensor),
    )


def _learned_workload(inputs: _Inputs, learned: LearnedMergeConfig, tree: MergeTree, node: str,
                      compressed: bool) -> LearnedWorkload:
    """``compressed``: over compressed task vectors (a full fine-tune's task vector then holds
    ``compressed_loaded_values``; adapters stay as loaded), which the planner chose (flat-compressed)
    or the config asks for (``basis: compressed``, ``supermerge_compressed``)."""
    k = len(tree.children(node))
    per_child = _loaded_per_child(inputs, tree, node)
    loaded, stack_values, products = sum(per_child), None, 0
    if compressed or learned.basis == "compressed":
        full = compressed_loaded_values(inputs.shape, k, learned.rank)
        loaded = sum(full if v == inputs.shape.n_params else v for v in per_child)
        stack_values = compressed_stack_values(inputs.shape, k, learned.rank)
        products = compressed_factored_product_values(inputs.shape, k, learned.rank)
    return LearnedWorkload(
        k=k, loaded_values=loaded, n_groups=inputs.n_groups, batches=_batches(inputs, tree, node, learned.batch_size),
        per_task_backward=learned.backward == "per_task",
        stack_bytes_per_value=STORAGE_DTYPES[learned.storage_dtype].itemsize,
        stack_values=stack_values, factored_product_values=products,
    )


def _node_tasks(inputs: _Inputs, tree: MergeTree, placements: Mapping[str, Placement],
                extra_params: Mapping[str, Any] | None = None) -> list[NodeTask]:
    """The plan's nodes; ``extra_params`` join every node's method parameters (``basis: compressed``
    for a flat merge over compressed task vectors)."""
    config = inputs.config
    method_params = {**config.method_parameters(), **(extra_params or {})}
    entries = {m.name: m for m in config.models}
    keys = dict(inputs.keys)
    nodes = []
    for node in tree.merges():
        tasks = tree.tasks(node)
        val = {t: inputs.val[t] for t in tasks if t in inputs.val}
        digest = data_digest(val)
        children = tree.children(node)
        out_dtype = config.write_dtype if node == tree.root else None  # inner nodes keep the base's precision
        keys[node] = node_key(
            [keys[c] for c in children], base=inputs.base_key, method=config.method,
            params={**method_params, **({"out_dtype": out_dtype} if out_dtype else {})},
            seed=config.seed, kind=config.kind,
            head_prefixes=config.head_prefixes, data=digest,
        )
        placement = placements[node]
        assert placement.device is not None
        nodes.append(NodeTask(
            id=node,
            key=keys[node],
            children=tuple(
                ChildRef(c, keys[c], str(entries[c].path)) if tree.is_model(c) else ChildRef(c, keys[c])
                for c in children
            ),
            tasks=tuple(tasks),
            validation={t: str(entries[t].validation) for t in tasks if t in val},
            base=str(config.base),
            method=config.method,
            parameters=dict(method_params),
            kind=config.kind,
            seed=config.seed,
            max_length=config.max_length,
            head_prefixes=tuple(config.head_prefixes),
            data_digest=digest,
            device=placement.device,
            predicted=placement.predicted,
            task_vector_device=placement.task_vector_device,
            out_dtype=out_dtype,
            label_ids={t: ids for t in tasks if t in val and (ids := inputs.labels.get(t)) is not None},
        ))
    return nodes


def _check_models(config: MergeConfig, models: ModelInventory, *, needs_heads: bool,
                  progress: bool) -> dict[str, dict[str, Any]]:
    """Every model against the base, and, where data is scored, that it carries a task head: seen now,
    not after hours of merging. A full fine-tune's header must fit the base (one error per model listing
    its problems), its config.json the base's architecture, and its values be finite (every tensor is
    read once, one at a time: about the time to read the models from disk); an adapter must be of a
    supported kind, fit the base, and be finite. Returns each task's head (tensor -> shape)."""
    from supermerge.merge_core.adapters import is_adapter_dir

    headless, heads = [], {}
    base_config = models.config(config.base)
    with models.checkpoint(config.base) as base:
        for m in tqdm(config.models, desc="checking models", disable=not progress, leave=False, unit="model"):
            tuned = None if is_adapter_dir(m.path) else models.checkpoint(m.path)
            found = task_heads(base, Path(m.path), m.name, config.head_prefixes, tuned)
            check_model_config(base_config, Path(m.path), models.config(m.path))
            heads.update(found)
            if not found:
                headless.append(m.name)
    # a causal LM's tasks are scored by the merged model's own output layer: no head of their own
    if headless and needs_heads:
        raise DataError(
            f"model(s) {headless} carry no task head ({', '.join(config.head_prefixes)}*), so they cannot be "
            "scored on their data; give fine-tuned *ForSequenceClassification models or adapters with "
            "modules_to_save=['classifier']"
        )
    return heads


def _check_data(config: MergeConfig, base_config: Mapping[str, Any] | None, heads: Mapping[str, Mapping[str, Any]],
                splits: Mapping[str, Mapping[str, TaskData]]) -> None:
    """Each task's validation and test data against its head and the model (supermerge.merge_core.preflight)."""
    for m in config.models:
        for split, data in splits.items():
            if m.name in data:
                check_task_data(m.name, data[m.name], heads.get(m.name), str(getattr(m, split)), base_config)


def _read_inputs(config: MergeConfig, spec: MethodSpec, models: ModelInventory, data: DataCache,
                 progress: bool) -> _Inputs:
    learned = _learned_config(spec, config.method_parameters())
    base_config = models.config(config.base)
    check_base(models.checkpoint(config.base), base_config, max_length=config.max_length)
    labels = {m.name: models.label_ids(m.path, m.name) for m in config.models}
    val = data.split(config.models, "validation", config.base, config.max_length, labels)
    if spec.kind == "learned" or _candidate_count(spec, config.method_parameters()) > 1:
        missing = [m.name for m in config.models if m.name not in val]
        if missing:
            raise DataError(
                f"method {spec.name!r} trains or searches on validation data, but model(s) {missing} have no "
                "'validation:' file; add one per model (the paper uses 32 examples a task)"
            )
    # read now, so bad test data is refused before any work; the run scores the root on it at the end
    test = data.split(config.models, "test", config.base, config.max_length, labels)
    heads = _check_models(config, models, needs_heads=config.kind == "classification" and (bool(val) or bool(test)), progress=progress)
    _check_data(config, base_config, heads, {"validation": val, "test": test})
    shape = models.shape()
    n_groups = len(weight_groups(list(shape.tensor_names), learned.granularity)[0]) if learned else 0
    keys = {m.name: model_key(m.path) for m in config.models}
    loaded = {m.name: models.loaded_values(m.path) for m in config.models}
    candidates = _candidate_count(spec, config.method_parameters())
    streamed = streamable(config.method, config.method_parameters())
    files = {m.name: models.weight_file_bytes(m.path) for m in config.models} if streamed else {}
    if streamed:
        files[""] = models.weight_file_bytes(config.base)
    return _Inputs(config, shape, val, learned, candidates, candidates > 1 and spec.scale is not None, n_groups,
                   loaded, keys, model_key(config.base), streamed, spec.temporaries, files,
                   models.largest_tensor_bytes(config.base) if streamed else 0, labels)


COMPRESSED_REASON = ("flat over compressed task vectors: a dense flat merge does not fit the budget, this one "
                     "does (expected between a dense flat merge and a tree in quality)")


def _compressible(config: MergeConfig, spec: MethodSpec, inputs: _Inputs) -> bool:
    """Whether the planner may merge flat over compressed task vectors (supermerge.merge_core.compress): a
    learned merge over the raw task vectors (another basis is the user's choice), unless
    ``tree.flat_compressed`` is false."""
    return (config.tree.flat_compressed and spec.kind == "learned" and inputs.learned is not None
            and inputs.learned.basis == "task_vectors" and not inputs.streamed)


def _runs_flat(config: MergeConfig, spec: MethodSpec, inputs: _Inputs) -> str | None:
    """Why a per-tensor merge runs as one flat node whatever the tree config says, or None. A tree
    would apply its formula again at every level (lambda compounds: TA with lambda 0.7 at fan-in 2
    would give base + 0.49 * sum of task vectors) and a merged input has no per-model weight."""
    if inputs.streamed:
        return ("flat: a per-tensor merge with fixed parameters streams tensor by tensor (k copies of the "
                "largest tensor, not k models), and a tree would apply its formula again at every level")
    per_model = [w for w in ("weight", "density") if isinstance(config.method_parameters().get(w), dict)]
    if spec.kind == "per_tensor" and per_model:
        return f"flat: per-model {'/'.join(per_model)} apply to the models themselves, not to merged inputs"
    return None


def plan(
    config: MergeConfig,
    *,
    inventory: MemoryInventory | None = None,
    similarity: Similarity | None = None,
    progress: bool = False,
    data: DataCache | None = None,
) -> MergePlan:
    """Plan a (hierarchical) merge of the config's models; refuse before any work if none fits.

    ``inventory``: what is free (read now when None); ``similarity``: the task vectors' similarity
    (computed, streaming, only if a clustered tree is needed); ``data``: the run's data files, read
    once (new when None; the plan keeps it, so the nodes and the final scoring read no file again).
    Each input's header and config.json are read once (``ModelInventory``).
    """
    names = [m.name for m in config.models]
    k = len(names)
    _check_tree_config(config, k)
    spec = get_method(config.method)
    requested = resolve_device(config.device)
    models = ModelInventory(config.base, config.kind)
    data = data if data is not None else DataCache()
    inputs = _read_inputs(config, spec, models, data, progress)
    models.close()  # before the free memory is read: no model's pages stay mapped
    if not inputs.streamed and (spec.kind == "learned" or inputs.val or inputs.candidates > 1):
        models.load_model_code()
    inventory = inventory if inventory is not None else read_inventory()
    budget = make_budget(config.tree.memory_budget, inventory)
    cached: list[Similarity] = [similarity] if similarity is not None else []

    def similar() -> Similarity:
        if not cached:
            cached.append(task_vector_similarity(
                config.base, {m.name: m.path for m in config.models}, head_prefixes=config.head_prefixes,
                progress=progress, open_model=models.checkpoint,
            ))
        if cached[0].names != names:
            raise TreeError(f"the similarity given covers {cached[0].names}, the config's models are {names}")
        return cached[0]

    def clustered(fan_in: int) -> MergeTree:
        if fan_in >= k:
            return flat_tree(names)
        return cluster_tree(names, similar().cosine, fan_in, config.tree.shape)

    tree_config = config.tree
    choices: list[tuple[str, Callable[[], MergeTree]]]
    flat_why = _runs_flat(config, spec, inputs)
    if flat_why:
        if tree_config.groups is not None or (tree_config.max_fan_in or k) < k:
            log.warning("tree.groups / max_fan_in not used: %s", flat_why)
        choices = [(flat_why, lambda: flat_tree(names))]
    elif tree_config.flat:
        choices = [("flat merge: tree.flat", lambda: flat_tree(names))]
    elif tree_config.groups is not None:
        choices = [("groups given by hand", lambda: tree_from_groups(tree_config.groups, names,
                                                                      tree_config.max_fan_in))]
    elif tree_config.max_fan_in is not None:
        cap = min(tree_config.max_fan_in, k)
        choices = [(f"the largest up to tree.max_fan_in {tree_config.max_fan_in} that fits the budget",
                    lambda f=f: clustered(f)) for f in range(cap, 1, -1)]
    else:
        choices = [("the largest that fits the budget", lambda f=f: clustered(f)) for f in range(k, 1, -1)]
    # (reason, tree, over compressed task vectors): flat-compressed right after a dense flat merge, before
    # any tree, where the planner may choose the fan-in and a flat merge was its first choice
    plans = [(reason, build, False) for reason, build in choices]
    if _compressible(config, spec, inputs) and not (tree_config.flat or tree_config.groups is not None) \
            and (tree_config.max_fan_in or k) >= k:
        plans.insert(1, (COMPRESSED_REASON, lambda: flat_tree(names), True))
    failure, dense_flat_needs = "", 0
    for reason, build, compressed in plans:
        tree = build()
        placements = {
            n: place_node(inputs.shape, _workload(inputs, tree, n, compressed), budget,
                          "cpu" if inputs.streamed else requested)
            for n in tree.merges()
        }
        misfits = [(n, p) for n, p in placements.items() if p.device is None]
        if not misfits:
            extra = {"basis": "compressed"} if compressed else None
            nodes = _node_tasks(inputs, tree, placements, extra)
            used = similarity if similarity is not None else (cached[0] if cached else None)
            shape = ("flat-compressed" if compressed else "flat" if len(tree.merges()) == 1
                     else "groups" if tree_config.groups is not None else tree_config.shape)
            if compressed:
                reason = f"{reason} (dense flat needs {format_bytes(dense_flat_needs)})"
            return MergePlan(config, tree, tree.fan_in, reason, nodes, budget, inventory, used, shape, data)
        if len(tree.merges()) == 1 and not compressed:
            dense_flat_needs = max(p.predicted.total for _, p in misfits)
        node, p = max(misfits, key=lambda m: m[1].predicted.total)
        given = tree_config.flat or tree_config.groups is not None
        failure = (
            f"at fan-in {tree.fan_in}{f' ({reason})' if given else ''}, {len(misfits)} of {len(placements)} "
            "merge node(s) do not fit; "
            f"{node} ({len(tree.children(node))} inputs, {len(tree.tasks(node))} tasks) {p.reason}; "
            f"its largest terms: {describe(p.predicted)}"
        )
    if tree_config.flat or tree_config.groups is not None:
        advice = ("raise the memory budget (tree.memory_budget / --memory-budget), or drop tree.flat / "
                  "tree.groups so the planner may choose a smaller fan-in")
    else:
        advice = ("even fan-in 2 does not fit: raise the memory budget (tree.memory_budget / --memory-budget), "
                  "use fewer or shorter validation examples per step (parameters.batch_size, max_length), "
                  "or a machine with more memory")
    raise MemoryBudgetError(f"no merge plan fits ({budget.source}): {failure}. Nothing was run; {advice}")
