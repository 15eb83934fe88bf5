"""Streaming merges: disk to disk one tensor at a time, for the per-tensor methods at model sizes.

``merge()`` loads every task vector (k fp32 models) before it merges; that is what a grid search or a
learned merge needs, since they run the merged model many times. A per-tensor method with fixed
parameters needs none of it: for each tensor we read the base's and every fine-tuned model's copy
(memory-mapped), merge them with the method's operator, write the result into the output shard and
let go of all of it. Peak memory is a few times k times the largest tensor (the k stacked fp32 deltas
and the operator's temporaries; TIES' trim and sign election hold about 4k), never k times the model.

The output is the one ``merge()`` + ``save_result`` writes, bit for bit: the same fp32 deltas, the
same operator with the same per-tensor seeds (``tensor_seed``), the same cast back to the base's
dtype, the same heads and ``supermerge.json`` (its ``seconds`` include the writing here).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from supermerge.merge_core.adapters import is_adapter_dir
from supermerge.merge_core.checkpoint import (
    DEFAULT_SHARD_BYTES,
    Checkpoint,
    TensorMeta,
    atomic_model_dir,
    config_dir,
    finish_model_dir,
    open_checkpoint,
    write_shards_streaming,
)
from supermerge.merge_core.deltas import dense_delta
from supermerge.merge_core.errors import ConfigError, TaskVectorError
from supermerge.merge_core.merge import (
    MergeResult,
    _candidates,
    _check_inputs,
    _heads,
    output_dtype,
    result_record,
    tensor_seed,
)
from supermerge.merge_core.methods.registry import MethodSpec, get_method, op_arguments
from supermerge.merge_core.task_vectors import (
    DEFAULT_HEAD_PREFIXES,
    NameMap,
    TaskVector,
    check_finite_result,
    load_stored_heads,
    load_task_vector,
    match_names,
    mergeable_names,
    read_head,
)

log = logging.getLogger(__name__)

UNMAP_BYTES = 256 * 2**20
"""Bytes read through memory maps after which the input files are unmapped (see _merged_tensors)."""


@dataclass
class _Source:
    """One fine-tuned model as the stream reads it: a full checkpoint read tensor by tensor
    (``checkpoint`` + ``names``), or an adapter whose compact deltas are held (``vector.deltas``)."""

    vector: TaskVector
    checkpoint: Checkpoint | None = None
    names: NameMap | None = None


def streamable(method: str, params: Mapping[str, Any] | None = None) -> bool:
    """Whether ``stream_merge`` can run ``method`` with ``params``: a per-tensor method whose every
    parameter has one value (a list of several, or ``search: true``, needs ``merge()``'s search)."""
    spec = get_method(method)
    return spec.kind == "per_tensor" and len(_candidates(spec, dict(params or {}))) == 1


def _fixed_params(spec: MethodSpec, params: Mapping[str, Any]) -> dict[str, float]:
    if spec.kind != "per_tensor":
        raise ConfigError(
            f"method {spec.name!r} trains merge weights through the model, so it cannot stream tensor "
            "by tensor; run it with merge()"
        )
    candidates = _candidates(spec, params)
    if len(candidates) > 1:
        varied = sorted(k for k in spec.grid if len({c[k] for c in candidates}) > 1)
        raise ConfigError(
            f"method {spec.name!r}: parameter(s) {varied} have several values (given as a list, or searched "
            "with search: true), which needs a grid search on validation data; give one value each "
            "(e.g. lambda: 0.5) to stream, or run merge()"
        )
    return candidates[0]


def _open_sources(
    base: Checkpoint, models: Sequence[tuple[str, Path]], head_prefixes: Sequence[str], files: ExitStack
) -> list[_Source]:
    """Check every full checkpoint's headers against the base (all before any tensor is read), then
    read the heads and the adapters' compact deltas, as ``supermerge.merge_core.job.load_task_vectors`` does.
    The checkpoints opened stay open until ``files`` closes."""
    opened: dict[str, tuple[Checkpoint, NameMap]] = {}
    for name, path in models:
        if not is_adapter_dir(path):
            ck = files.enter_context(open_checkpoint(path))
            opened[name] = (ck, match_names(base, ck, head_prefixes))
    sources = []
    for name, path in models:
        if name not in opened:
            sources.append(_Source(load_task_vector(base, path, name=name, head_prefixes=head_prefixes)))
            continue
        ck, names = opened[name]
        head = {n: t.clone() for n, t in read_head(ck, names).items()}
        heads = load_stored_heads(path) or ({name: head} if head else {})
        sources.append(_Source(TaskVector(name=name, source=path, deltas={}, heads=heads), ck, names))
    return sources


def _stacked_deltas(base_tensor: Tensor, name: str, sources: Sequence[_Source], buffer: Tensor) -> Tensor:
    """The (k, *shape) fp32 task vectors of one tensor, each written into its row as it is read
    (``theta_f - theta_p`` in fp32, as ``read_delta`` and ``stack_deltas`` compute them: bf16 and fp16
    widen to fp32 exactly, so subtracting the stored base from the widened row gives the same bits).
    The rows live in ``buffer``, reused for every tensor: memory allocated afresh is paged in on
    first touch, which costs more than the subtraction."""
    stack = buffer[: len(sources) * base_tensor.numel()].view(len(sources), *base_tensor.shape)
    for row, src in zip(stack, sources, strict=True):
        if src.checkpoint is None:
            delta = src.vector.deltas.get(name)
            if delta is None:
                row.zero_()
            else:
                row.copy_(dense_delta(delta, base_tensor))
            continue
        assert src.names is not None
        ft_name = src.names.prefix + name
        tuned = src.checkpoint.get(ft_name)
        row.copy_(tuned).sub_(base_tensor)
        # A finite sum means every value is finite (NaN and Inf propagate); only when it is not, which
        # may also be an overflow or an Inf in the base, is the fine-tuned tensor itself checked, the
        # check merge() does. One pass, no allocation, where isfinite() costs more than the merge.
        if not torch.isfinite(row.sum()) and not torch.isfinite(tuned).all():
            raise TaskVectorError(f"{src.checkpoint.path}: tensor {ft_name!r} holds NaN or Inf; the model is broken")
    return stack


def _merged_tensors(
    spec: MethodSpec,
    chosen: Mapping[str, float],
    base: Checkpoint,
    sources: Sequence[_Source],
    seed: int,
    progress: bool,
    label: str = "the merge",
    out_dtype: torch.dtype | None = None,
) -> Iterator[tuple[str, Tensor]]:
    """Every base tensor in order, merged where mergeable, in the base's dtype (or ``out_dtype``).

    Pages read through a memory map count as this process's memory until the file is unmapped, so
    the files are closed (and reopened, ~1 ms each, on the next read) after every ``UNMAP_BYTES``
    read: mapped pages stay under that, on top of the tensors being merged."""
    assert spec.op is not None
    mergeable = set(mergeable_names(base))
    checkpoints = [base] + [s.checkpoint for s in sources if s.checkpoint is not None]
    largest = max((math.prod(base.shape(n)) for n in mergeable), default=0)
    buffer = torch.empty(len(sources) * largest, dtype=torch.float32)
    arguments = op_arguments(chosen, [s.vector.name for s in sources])
    mapped = 0
    for name in tqdm(base.keys(), desc=f"{spec.name}: merging", disable=not progress, leave=False, unit="tensor"):
        b = base.get(name)
        if name in mergeable:
            deltas = _stacked_deltas(b, name, sources, buffer)
            merged = spec.op(b, deltas, seed=tensor_seed(seed, name), **arguments)
            del deltas
            merged = merged.to(out_dtype or base.dtype(name))
            check_finite_result([(name, merged)], label)
            yield name, merged
            del merged
        else:
            yield name, b
        mapped += b.numel() * b.element_size() * len(checkpoints)
        del b
        if mapped >= UNMAP_BYTES:
            for ck in checkpoints:
                ck.close()
            mapped = 0


def stream_merge(
    base_path: str | Path,
    models: Sequence[tuple[str, str | Path]],
    method: str,
    params: Mapping[str, Any] | None,
    output: str | Path,
    *,
    seed: int = 0,
    head_prefixes: Sequence[str] = DEFAULT_HEAD_PREFIXES,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    overwrite: bool = False,
    extra_record: Mapping[str, Any] | Callable[[], Mapping[str, Any]] | None = None,
    progress: bool = False,
    label: str = "the merge",
    out_dtype: str | None = None,
) -> Path:
    """Merge ``models`` ((name, path) of full fine-tunes or adapters of ``base_path``) with a per-tensor
    ``method`` whose ``params`` each have one value, straight into the model dir ``output``.

    Writes what ``merge(...)`` then ``save_result(...)`` would (the same tensors bit for bit, heads,
    ``supermerge.json`` plus ``extra_record``), atomically: on any error nothing appears at ``output``.
    ``extra_record`` may be a function, called once every tensor is written: what it returns (say,
    the merge's measured cost) goes into the record.
    ``label``: what a NonFiniteError calls this merge (a merged tensor that is NaN or Inf stops it,
    and nothing appears at ``output``). ``out_dtype``: the dtype merged tensors are written in
    (``"bfloat16"`` ...; default: the base's). ``shard_bytes``: the largest output shard (bytes).
    Validation data is never read: to score the
    result, load it afterwards. Returns ``output``.
    """
    started = time.perf_counter()
    spec = get_method(method)
    chosen = _fixed_params(spec, dict(params or {}))
    paths = [(name, Path(path)) for name, path in models]
    _check_inputs(spec, [TaskVector(name=n, source=p, deltas={}) for n, p in paths], None, needs_val=False)
    with ExitStack() as files:
        base = files.enter_context(open_checkpoint(base_path))
        sources = _open_sources(base, paths, head_prefixes, files)
        cast = output_dtype(out_dtype)
        mergeable = set(mergeable_names(base))
        metas = [TensorMeta(n, base.shape(n), cast if cast is not None and n in mergeable else base.dtype(n))
                 for n in base.keys()]
        heads = _heads([s.vector for s in sources])
        with atomic_model_dir(output, overwrite=overwrite) as tmp:
            write_shards_streaming(
                tmp, metas, _merged_tensors(spec, chosen, base, sources, seed, progress, label, cast),
                max_shard_bytes=shard_bytes, progress=False,
            )
            result = MergeResult(spec.name, {}, heads, dict(chosen), seconds=time.perf_counter() - started)
            extra = extra_record() if callable(extra_record) else extra_record
            record = {**result_record(result, base_path=base_path, models={n: str(p) for n, p in paths}),
                      **(extra or {})}
            finish_model_dir(tmp, config_from=config_dir(base_path), record=record, extra_files=_head_files(heads))
    log.info("%s: streamed %d models into %s in %.1f s", spec.name, len(paths), output,
             time.perf_counter() - started)
    return Path(output)


def _head_files(heads: Mapping[str, Mapping[str, Tensor]]) -> dict[str, bytes]:
    """``heads/<task>.safetensors`` as ``save_result`` writes them."""
    from safetensors.torch import save as to_bytes

    return {f"heads/{t}.safetensors": to_bytes({n: x.contiguous() for n, x in h.items()}) for t, h in heads.items()}
