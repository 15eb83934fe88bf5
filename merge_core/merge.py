"""Run one merge: k task vectors + a method (+ validation data) -> merged tensors.

Everything that can be checked without reading weights is checked first (method, parameters, k,
validation data), so a refused merge costs nothing. A parameter left out takes the method's documented
default; values given as a list (or every grid parameter left out, with ``search: true``) are chosen on
the validation data by mean accuracy, as the papers do.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from supermerge.merge_core.checkpoint import open_checkpoint
from supermerge.merge_core.data import TaskData, require_labelled
from supermerge.merge_core.errors import ConfigError
from supermerge.merge_core.evaluate import task_scores
from supermerge.merge_core.methods.learned import LearnedMerge, LearnedMergeConfig, combine, train_merge_weights
from supermerge.merge_core.methods.registry import (
    SEARCH,
    MethodSpec,
    canonical_parameters,
    get_method,
    op_arguments,
    parameter_defaults,
)
from supermerge.merge_core.model import FunctionalModel, TaskKind
from supermerge.merge_core.task_vectors import TaskVector, mergeable_names, stack_deltas

log = logging.getLogger(__name__)


@dataclass
class MergeResult:
    """A merged model in memory: every base tensor (merged where mergeable) in the base's dtype."""

    method: str
    tensors: dict[str, Tensor]
    heads: dict[str, dict[str, Tensor]]
    params: dict[str, Any]
    search: list[dict[str, Any]] = field(default_factory=list)
    learned: LearnedMerge | None = None
    val_accuracy: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0


def output_dtype(name: str | None) -> torch.dtype | None:
    """The torch dtype of a config's ``out_dtype`` / ``dtype`` (``"bfloat16"`` ...); None stays None."""
    if name is None:
        return None
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ConfigError(f"out_dtype {name!r} is not a floating-point torch dtype; use float32, bfloat16 or float16")
    return dtype


def tensor_seed(seed: int, name: str) -> int:
    """A per-tensor seed, so random methods (DARE) do not depend on the order tensors are visited."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _candidates(spec: MethodSpec, params: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The parameter sets a per-tensor merge tries: one, unless the config asks for a search (a list
    value is searched; ``search: true`` searches every grid parameter it leaves out over the method's
    grid). A parameter left out takes the op's documented default, never a grid."""
    params = canonical_parameters(spec, params)
    search = params.pop(SEARCH, False)
    if not isinstance(search, bool):
        raise ConfigError(f"method {spec.name!r}: search must be true or false, got {search!r}")
    fixed = {k: v for k, v in params.items() if k not in spec.grid}
    grid = {}
    for k, values in spec.grid.items():
        if k in params:
            grid[k] = tuple(params[k]) if isinstance(params[k], (list, tuple)) else (params[k],)
        else:
            grid[k] = tuple(values) if search else (parameter_defaults(spec)[k],)
    keys = sorted(grid, key=lambda k: (k == spec.scale, k))  # the scale varies fastest: see _grid_params
    return [{**fixed, **dict(zip(keys, values, strict=True))} for values in itertools.product(*(grid[k] for k in keys))]


def _learned_config(spec: MethodSpec, params: Mapping[str, Any], seed: int) -> LearnedMergeConfig:
    assert spec.learned is not None
    return dataclasses.replace(spec.learned, **{"seed": seed, **canonical_parameters(spec, params)})


def input_compressor(method: str, params: Mapping[str, Any], k: int) -> Callable[[TaskVector], TaskVector] | None:
    """How a node runner should hold each of its k task vectors as it loads it: compressed
    (supermerge.merge_core.compress) when the method learns over compressed task vectors, so only one dense task
    vector is ever in memory, not k; None: as loaded."""
    spec = get_method(method)
    if spec.learned is None:
        return None
    config = _learned_config(spec, params, 0)
    if config.basis != "compressed":
        return None
    from supermerge.merge_core.compress import compress_task_vector

    return functools.partial(compress_task_vector, k=k, rank=config.rank)


def _check_inputs(
    spec: MethodSpec, vectors: Sequence[TaskVector], val: Mapping[str, TaskData] | None, needs_val: bool
) -> list[str]:
    if len(vectors) < 2:
        raise ConfigError(
            f"merging needs at least 2 fine-tuned models, got {len(vectors)}; with one model there "
            "is nothing to merge: use it as it is"
        )
    names = [v.name for v in vectors]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"model names must be unique; repeated: {dupes}")
    tasks = [t for v in vectors for t in v.tasks]
    if needs_val:
        for t in tasks:
            data = (val or {}).get(t)
            require_labelled(t, data)
    return tasks


def merge(
    base_path: str | Path,
    vectors: Sequence[TaskVector],
    method: str,
    *,
    params: Mapping[str, Any] | None = None,
    val: Mapping[str, TaskData] | None = None,
    kind: TaskKind = "classification",
    seed: int = 0,
    device: str = "cpu",
    progress: bool = False,
    model: FunctionalModel | None = None,
    task_vector_device: str | None = None,
    release_task_vectors: bool = False,
) -> MergeResult:
    """Merge ``vectors`` (task vectors against ``base_path``) with ``method``.

    ``params``: method hyperparameters; a list means "search these on the validation data". ``val``:
    task name -> validation data (labelled for SuperMerge and grid searches, inputs for AdaMerging).
    ``task_vector_device``: where a learned merge keeps its stacked task vectors (default: the model's
    device; 'cpu' on a GPU run offloads them to pinned host memory, see ``stack_task_vectors``).
    ``release_task_vectors``: a learned merge empties ``vectors``' deltas as it stacks them (the caller
    no longer needs them), so the task vectors are held once at the peak, not twice.
    """
    started = time.perf_counter()
    spec = get_method(method)
    params = dict(params or {})
    if spec.kind == "learned":
        config = _learned_config(spec, params, seed)
        _check_inputs(spec, vectors, val, needs_val=True)
        if model is None:
            model = FunctionalModel(base_path, kind, device)
        result = _merge_learned(spec, base_path, vectors, config, val or {}, model, progress, task_vector_device,
                                release_task_vectors)
    else:
        candidates = _candidates(spec, params)
        _check_inputs(spec, vectors, val, needs_val=len(candidates) > 1)
        if model is None and (len(candidates) > 1 or val):
            model = FunctionalModel(base_path, kind, device)
        result = _merge_per_tensor(spec, base_path, vectors, candidates, val or {}, model, seed, progress)
    result.seconds = time.perf_counter() - started
    return result


def _heads(vectors: Sequence[TaskVector], kind: TaskKind = "classification") -> dict[str, dict[str, Tensor]]:
    """Each task's head. A causal LM's task predicts tokens with the merged model's own output layer
    (an ``lm`` task): it has no head of its own, so a model that carries none gets the empty one."""
    if kind == "causal_lm":
        return {t: v.heads.get(t, {}) for v in vectors for t in v.tasks}
    return {t: h for v in vectors for t, h in v.heads.items()}


def _val_scores(
    model: FunctionalModel | None,
    params: Mapping[str, Tensor],
    heads: Mapping[str, Mapping[str, Tensor]],
    val: Mapping[str, TaskData],
) -> dict[str, tuple[float, float]]:
    if model is None:
        return {}
    on_device = {n: t.to(model.device) for n, t in params.items()}
    return {
        t: task_scores(model, on_device, {n: x.to(model.device) for n, x in heads[t].items()}, d)
        for t, d in val.items()
        if t in heads
    }


def _per_tensor_params(
    spec: MethodSpec, base, names: Sequence[str], vectors: Sequence[TaskVector],
    candidate: Mapping[str, float], seed: int,
) -> dict[str, Tensor]:
    assert spec.op is not None
    out = {}
    arguments = op_arguments(candidate, [v.name for v in vectors])
    for n in names:
        b = base.get(n)
        out[n] = spec.op(b, stack_deltas(b, vectors, n), seed=tensor_seed(seed, n), **arguments)
    return out


def _grid_params(
    spec: MethodSpec, base, names: Sequence[str], vectors: Sequence[TaskVector],
    candidates: Sequence[Mapping[str, float]], seed: int, bar: Iterable[Mapping[str, float]],
) -> Iterator[tuple[Mapping[str, float], dict[str, Tensor]]]:
    """Each candidate (in ``bar``'s order) with its merged tensors. For a method affine in a
    ``scale`` parameter the rest (the costly part: trims, sign elections, DARE masks) is computed once
    per value of the other parameters, and each scale applied as ``base + scale * direction``: the
    same fp32 operations the method does itself, so the same bits."""
    if spec.scale is None:
        for cand in bar:
            yield cand, _per_tensor_params(spec, base, names, vectors, cand, seed)
        return
    direction: dict[str, Tensor] = {}
    direction_for: dict[str, float] | None = None
    for cand in bar:
        rest = {k: v for k, v in cand.items() if k != spec.scale}
        if rest != direction_for:
            assert spec.op is not None
            direction = {}  # drop the previous direction before building the next
            arguments = op_arguments(rest, [v.name for v in vectors])
            for n in names:
                b = base.get(n)
                zero = torch.zeros(b.shape, dtype=torch.float32)
                deltas = stack_deltas(b, vectors, n)
                direction[n] = spec.op(zero, deltas, seed=tensor_seed(seed, n), **arguments, **{spec.scale: 1.0})
            direction_for = rest
        scale = cand[spec.scale]
        yield cand, {n: base.get(n).to(torch.float32) + scale * direction[n] for n in names}


def _merge_per_tensor(
    spec: MethodSpec,
    base_path: str | Path,
    vectors: Sequence[TaskVector],
    candidates: list[dict[str, float]],
    val: Mapping[str, TaskData],
    model: FunctionalModel | None,
    seed: int,
    progress: bool,
) -> MergeResult:
    heads = _heads(vectors, model.kind if model is not None else "classification")
    search: list[dict[str, Any]] = []
    with open_checkpoint(base_path) as base:
        names = mergeable_names(base)
        best: tuple[float, float] | None = None
        chosen, merged = candidates[0], None
        if len(candidates) > 1:
            bar = tqdm(candidates, desc=f"{spec.name}: grid search", disable=not progress, leave=False)
            for cand, params in _grid_params(spec, base, names, vectors, candidates, seed, bar):
                scores = _val_scores(model, params, heads, val)
                acc = sum(s[0] for s in scores.values()) / len(scores)
                loss = sum(s[1] for s in scores.values()) / len(scores)
                search.append({**cand, "val_accuracy": acc, "val_loss": loss})
                if best is None or (acc, -loss) > best:
                    best, chosen, merged = (acc, -loss), cand, params
        if merged is None:
            merged = _per_tensor_params(spec, base, names, vectors, chosen, seed)
        val_acc = {t: s[0] for t, s in _val_scores(model, merged, heads, val).items()}
        tensors = _full_state(base, merged)
    return MergeResult(spec.name, tensors, heads, dict(chosen), search, None, val_acc)


def _full_state(base, merged: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Every base tensor, merged ones cast back to the base dtype, others (int buffers) copied."""
    return {
        n: merged[n].detach().to("cpu", base.dtype(n)) if n in merged else base.get(n)
        for n in base.keys()
    }


def _merge_learned(
    spec: MethodSpec,
    base_path: str | Path,
    vectors: Sequence[TaskVector],
    config: LearnedMergeConfig,
    val: Mapping[str, TaskData],
    model: FunctionalModel,
    progress: bool,
    task_vector_device: str | None = None,
    release_task_vectors: bool = False,
) -> MergeResult:
    from supermerge.merge_core.methods import basis
    from supermerge.merge_core.methods.learned import stack_task_vectors

    heads = _heads(vectors, model.kind)
    heads_dev = {t: {n: x.to(model.device) for n, x in h.items()} for t, h in heads.items()}
    with open_checkpoint(base_path) as base:
        names = mergeable_names(base)
        base_params = model.base_params(names)
        tasks_per_input = [len(v.tasks) for v in vectors]
        vectors = basis.compress_inputs(vectors, config, release=release_task_vectors)
        stacked = stack_task_vectors(base_params, vectors, config.storage_dtype, model.device, task_vector_device,
                                     release=release_task_vectors)
        data = {t: val[t] for v in vectors for t in v.tasks}
        stacked, start = _learned_start(config, model, base_params, stacked, heads_dev, data)
        learned = train_merge_weights(model, base_params, stacked, heads_dev, data, config, progress=progress,
                                      tasks_per_input=tasks_per_input)
        with torch.no_grad():
            merged = combine(base_params, stacked, learned.coefficients.to(model.device), learned.group_of)
        del stacked
        val_acc = {t: s[0] for t, s in _val_scores(model, merged, heads, data).items()}
        tensors = _full_state(base, merged)
    params = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    return MergeResult(spec.name, tensors, heads, params, start, learned, val_acc)


def _learned_start(config: LearnedMergeConfig, model: FunctionalModel, base_params, stacked, heads, data):
    """The stacks over ``config.basis``, scaled so W's start is the training-free merge chosen on
    ``data`` when ``config.init_from`` asks for it; and that search (for the record)."""
    from supermerge.merge_core.methods import basis

    stacked = basis.to_basis(stacked, config.basis)
    if config.init_from == "constant":
        return stacked, []
    scale, search = basis.search_start_scale(model, base_params, stacked, heads, data,
                                             basis.SCALE_GRIDS[config.basis])
    log.info("learned merge starts at the %s merge with scale %g", config.basis, scale)
    for n in stacked:
        stacked[n] = basis.rescaled(stacked[n], scale / config.init)
    return stacked, search


def result_record(result: MergeResult, *, base_path: str | Path, models: Mapping[str, str]) -> dict[str, Any]:
    """How the model was made, saved as supermerge.json beside it; ``labels``: each task's class names
    (its fine-tune's ``id2label``), which ``supermerge export`` writes into the task's config."""
    from supermerge.merge_core.labels import merged_labels

    record: dict[str, Any] = {
        "method": result.method,
        "paper": get_method(result.method).paper,
        "base": str(base_path),
        "models": dict(models),
        "tasks": sorted(result.heads),
        "params": result.params,
        "grid_search": result.search,
        "val_accuracy": result.val_accuracy,
        "seconds": round(result.seconds, 3),
        "labels": merged_labels(models),
    }
    if result.learned is not None:
        record["merge_weights"] = {
            "file": "merge_weights.safetensors",
            "shape": list(result.learned.weights.shape),
            "rows": list(models),
            "groups": result.learned.groups,
            "loss_first_last": [result.learned.losses[0], result.learned.losses[-1]]
            if result.learned.losses else [],
            "step_seconds": [round(t, 3) for t in result.learned.step_seconds],
        }
    return record


def save_result(
    result: MergeResult,
    out_dir: str | Path,
    *,
    base_path: str | Path,
    models: Mapping[str, str],
    overwrite: bool = False,
    extra_record: Mapping[str, Any] | None = None,
    out_dtype: str | None = None,
) -> Path:
    """Write the merged model as a transformers-loadable dir, its per-task heads under ``heads/``,
    and W (``merge_weights.safetensors``) for learned methods, atomically. ``out_dtype``: the dtype
    the merged (floating-point) tensors are written in; default: the base's."""
    from safetensors.torch import save as to_bytes

    from supermerge.merge_core.checkpoint import config_dir, write_model_dir

    extra = {f"heads/{t}.safetensors": to_bytes({n: x.contiguous() for n, x in h.items()})
             for t, h in result.heads.items()}
    if result.learned is not None:
        extra["merge_weights.safetensors"] = to_bytes(
            {"weights": result.learned.weights, "coefficients": result.learned.coefficients}
        )
    record = {**result_record(result, base_path=base_path, models=models), **(extra_record or {})}
    cast = output_dtype(out_dtype)
    tensors = ((n, t.to(cast) if cast is not None and t.is_floating_point() else t) for n, t in result.tensors.items())
    return write_model_dir(
        out_dir,
        tensors,
        config_from=config_dir(base_path),
        record=record,
        overwrite=overwrite,
        extra_files=extra,
    )
