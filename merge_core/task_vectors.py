"""Task vectors: ``tau(i, j) = theta_f(i, j) - theta_p(j)`` per parameter tensor, in fp32.

Names are always the BASE checkpoint's tensor names. A fine-tuned Hugging Face model usually saves its
encoder under a prefix (``bert.embeddings...`` for a ``BertForSequenceClassification`` whose base is a
headless ``BertModel``) and adds a task head (``classifier.*``): we detect the prefix, and the head
becomes the task's own, never merged (as in the paper's CLIP setting). Everything is checked against the
base before a single tensor is read, so a mismatch is reported before any work.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from supermerge.merge_core.checkpoint import Checkpoint, open_checkpoint
from supermerge.merge_core.deltas import Delta, dense_delta
from supermerge.merge_core.errors import NonFiniteError, TaskVectorError

log = logging.getLogger(__name__)

DEFAULT_HEAD_PREFIXES: tuple[str, ...] = ("classifier.", "score.", "pre_classifier.")


@dataclass
class TaskVector:
    """One fine-tuned model's difference from the base, plus the task heads it carries.

    ``deltas`` maps base tensor names to fp32 deltas (dense, or compact for adapters); ``heads`` maps
    each task this model serves to that task's unmerged head tensors (keyed as in the task model).
    A leaf serves one task; a merged intermediate model serves every task of its subtree.
    """

    name: str
    source: Path
    deltas: dict[str, Delta]
    heads: dict[str, dict[str, Tensor]] = field(default_factory=dict)

    @property
    def tasks(self) -> list[str]:
        return sorted(self.heads) if self.heads else [self.name]


@dataclass(frozen=True)
class NameMap:
    """How a fine-tuned file's names relate to the base's: ``ft_name = prefix + base_name``."""

    prefix: str
    head: tuple[str, ...]


def mergeable_names(base: Checkpoint) -> list[str]:
    """Floating-point tensors of the base: the ones a task vector has. Integer buffers
    (e.g. ``position_ids``) are copied from the base unchanged."""
    return [n for n in base.keys() if base.dtype(n).is_floating_point]


def _detect_prefix(base_names: Sequence[str], ft_names: set[str]) -> str:
    probe = base_names[0]
    candidates = {""}
    for name in ft_names:
        if name.endswith(probe):
            prefix = name[: len(name) - len(probe)]
            if prefix == "" or prefix.endswith("."):
                candidates.add(prefix)
    return max(sorted(candidates), key=lambda p: sum((p + n) in ft_names for n in base_names))


def match_names(
    base: Checkpoint, finetuned: Checkpoint, head_prefixes: Sequence[str] = DEFAULT_HEAD_PREFIXES
) -> NameMap:
    """Check, from headers alone, that ``finetuned`` was made from ``base``; return the name map.

    Raises one TaskVectorError listing every missing, extra, mis-shaped or mis-typed tensor.
    """
    names = mergeable_names(base)
    if not names:
        raise TaskVectorError(f"{base.path}: the base has no floating-point tensors to merge")
    ft_names = set(finetuned.keys())
    prefix = _detect_prefix(names, ft_names)
    problems: list[str] = []
    for n in names:
        ft = prefix + n
        if ft not in ft_names:
            problems.append(f"tensor {n!r} of the base is missing (looked for {ft!r})")
            continue
        if tuple(finetuned.shape(ft)) != tuple(base.shape(n)):
            problems.append(
                f"tensor {ft!r} has shape {tuple(finetuned.shape(ft))}, the base's {n!r} has "
                f"{tuple(base.shape(n))}"
            )
        elif finetuned.dtype(ft) != base.dtype(n):
            problems.append(
                f"tensor {ft!r} is {finetuned.dtype(ft)}, the base's {n!r} is {base.dtype(n)}; "
                "save the fine-tuned model in the base's dtype"
            )
    known = {prefix + n for n in base.keys()}
    head = tuple(sorted(n for n in ft_names - known if n.startswith(tuple(head_prefixes))))
    extra = sorted(ft_names - known - set(head))
    problems += [
        f"tensor {n!r} is not in the base; if it is a task head, add its prefix to head_prefixes "
        f"(now {list(head_prefixes)})"
        for n in extra
    ]
    if problems:
        shown = "\n  - ".join(problems[:10])
        more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
        raise TaskVectorError(
            f"{finetuned.path} does not fit the base {base.path} ({len(problems)} problems):"
            f"\n  - {shown}{more}"
        )
    return NameMap(prefix=prefix, head=head)


def _finite(t: Tensor, what: str, path: Path) -> Tensor:
    if not torch.isfinite(t).all():
        raise TaskVectorError(f"{path}: tensor {what!r} holds NaN or Inf; the model is broken")
    return t


def check_finite(checkpoint: Checkpoint) -> None:
    """Every floating-point tensor of ``checkpoint`` holds only finite values; the first that does not
    is named in a TaskVectorError. Reads one tensor at a time (the whole file once)."""
    for name in checkpoint.keys():
        if checkpoint.dtype(name).is_floating_point:
            tensor = checkpoint.get(name)
            # NaN and Inf propagate through a sum, so a finite sum means finite values: one pass, no
            # allocation, where isfinite() writes a mask as large as the tensor. A sum that overflows
            # (or holds +Inf and -Inf) is checked value by value.
            if not torch.isfinite(tensor.sum(dtype=torch.float32)):
                _finite(tensor, name, checkpoint.path)


def check_finite_result(tensors: Iterable[tuple[str, Tensor]], what: str) -> None:
    """Every floating-point tensor of a merge result is finite; a NonFiniteError naming ``what`` (the
    node) and the first tensor that is not, before the result is stored or published."""
    for name, tensor in tensors:
        if tensor.is_floating_point() and not torch.isfinite(tensor.sum(dtype=torch.float32)):
            bad = int((~torch.isfinite(tensor)).sum())
            if bad:
                raise NonFiniteError(
                    f"{what}: the merged tensor {name!r} holds NaN or Inf ({bad} of {tensor.numel()} values); "
                    "nothing was stored or published: lower the method's scale (parameters.lam) or its learning "
                    "rate, or check the inputs")


def check_finite_model(path: str | os.PathLike[str], what: str) -> None:
    """``check_finite_result`` over every tensor of the model at ``path`` (read one at a time)."""
    with open_checkpoint(path) as model:
        check_finite_result(((n, model.get(n)) for n in model.keys()), what)


def read_delta(base: Checkpoint, finetuned: Checkpoint, names: NameMap, name: str) -> Tensor:
    """``theta_f - theta_p`` for one base tensor, fp32, with a finiteness check on both sides."""
    ft = _finite(finetuned.get(names.prefix + name), names.prefix + name, finetuned.path)
    return ft.to(torch.float32) - base.get(name).to(torch.float32)


def read_head(finetuned: Checkpoint, names: NameMap) -> dict[str, Tensor]:
    """The task head's tensors, fp32, as copies: a tensor read from a checkpoint is a view into its
    memory map, and one view keeps the whole file mapped (a model's size of RSS, per model loaded)."""
    return {n: _finite(finetuned.get(n), n, finetuned.path).to(torch.float32, copy=True) for n in names.head}


def task_vector_from_checkpoint(
    base: Checkpoint,
    finetuned: Checkpoint,
    *,
    name: str,
    head_prefixes: Sequence[str] = DEFAULT_HEAD_PREFIXES,
    tasks: Sequence[str] | None = None,
) -> TaskVector:
    """Dense fp32 task vector of a full fine-tune (holds one model's worth of fp32 deltas)."""
    names = match_names(base, finetuned, head_prefixes)
    deltas = {n: read_delta(base, finetuned, names, n) for n in mergeable_names(base)}
    head = read_head(finetuned, names)
    heads = {t: head for t in (tasks or [name])} if head else {}
    return TaskVector(name=name, source=Path(finetuned.path), deltas=deltas, heads=heads)


def load_task_vector(
    base: Checkpoint,
    path: str | os.PathLike[str],
    *,
    name: str,
    head_prefixes: Sequence[str] = DEFAULT_HEAD_PREFIXES,
) -> TaskVector:
    """Task vector of a fine-tuned model dir/file or a PEFT adapter dir (LoRA, IA3).

    A merged model written by supermerge (``heads/<task>.safetensors`` beside the weights) comes back
    with one head per task it serves, so it can be merged again as a fine-tuned model.
    """
    from supermerge.merge_core.adapters import is_adapter_dir, load_adapter_task_vector

    path = Path(path)
    if is_adapter_dir(path):
        adapter = load_adapter_task_vector(path, base)
        heads = {name: adapter.head} if adapter.head else {}
        return TaskVector(name=name, source=path, deltas=adapter.deltas, heads=heads)
    with open_checkpoint(path) as finetuned:
        tv = task_vector_from_checkpoint(base, finetuned, name=name, head_prefixes=head_prefixes)
    stored = load_stored_heads(path)
    if stored:
        tv.heads = stored
    return tv


def load_stored_heads(path: Path) -> dict[str, dict[str, Tensor]]:
    """Heads a supermerge output keeps per task under ``heads/``; empty for other models."""
    from safetensors.torch import load_file

    folder = path / "heads" if path.is_dir() else path.parent / "heads"
    if not folder.is_dir():
        return {}
    return {f.stem: {n: t.clone() for n, t in load_file(f).items()} for f in sorted(folder.glob("*.safetensors"))}


def stack_deltas(base_tensor: Tensor, vectors: Sequence[TaskVector], name: str) -> Tensor:
    """The k deltas of one tensor stacked to shape (k, *shape), fp32; zero where a model (e.g. a
    LoRA adapter that does not target it) leaves the tensor unchanged."""
    rows = []
    for tv in vectors:
        delta: Delta | None = tv.deltas.get(name)
        rows.append(
            torch.zeros(base_tensor.shape, dtype=torch.float32)
            if delta is None
            else dense_delta(delta, base_tensor)
        )
    return torch.stack(rows)
