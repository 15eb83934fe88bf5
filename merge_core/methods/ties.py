"""TIES-Merging (Yadav et al., arXiv 2306.01708): trim, elect sign, disjoint mean, then scale.

For each tensor: keep each task vector's top ``density`` fraction of entries by magnitude (trim), give
every entry the sign of the sum of the trimmed values (elect; a zero sum elects +1), average only the
trimmed entries that carry the elected sign (disjoint mean; zero where none does), and add
``lam`` (``lambda`` in a config) times that to the base.

This runs PER TENSOR: "top 20%" is counted within each tensor, not over the whole model. Per-model
``weight`` and ``density`` (a sequence of k values) are combined in one of two ways, ``weighting``:

- ``"paper"`` (the default): the paper's steps with PEFT's weights (``peft.utils.merge_utils.ties``):
  the sign is elected on the *unweighted* trimmed vectors, then the *weighted* agreeing entries are
  summed and divided by their count. With every weight 1 this is the paper's disjoint mean.
- ``"mergekit"``: mergekit's ``ties``: each trimmed vector is multiplied by its weight *before* the
  election, and the agreeing sum is divided by the sum of the agreeing weights (``normalize``, true
  by default) or not divided at all (``normalize: false``). With every weight 1 and ``normalize`` both
  are the same.

Trimming keeps exactly ``int(density * numel)`` entries. Where magnitudes tie at the threshold the
earlier entries (in flattened order) are kept, so the result does not depend on the device. The other
tools break that tie differently (mergekit: the order of ``torch.argsort``, and at least one entry;
PEFT: the order of ``torch.topk``), so on a tensor with ties at its threshold the results differ in
the tied entries only. FusionBench and the authors' code trim over the whole model's flattened task
vector (one global threshold), resolve a zero sum to the sign of the model-wide total, and keep every
entry tied with the threshold.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from supermerge.merge_core.errors import ConfigError
from supermerge.merge_core.methods.task_arithmetic import check_lam, check_stack, check_weights, per_model, weight_column

PAPER = "https://arxiv.org/abs/2306.01708"

# The paper keeps the top 20% (k = 20), its recommended value when no tuning is done, and its code
# searches lam from 0.8 to 2.5 in steps of 0.1 (lam = 1 without validation data). Seven points over that
# range keep the search to seven validation passes; lam < 0.8 is rarely chosen since the disjoint mean
# is already an average, not a sum.
PARAM_GRID: dict[str, tuple[float, ...]] = {
    "density": (0.2,),
    "lam": (0.8, 1.0, 1.2, 1.5, 1.8, 2.1, 2.5),
}


Weighting = Literal["paper", "mergekit"]
WEIGHTINGS: tuple[str, ...] = ("paper", "mergekit")


def check_density(density: float | Sequence[float], method: str, k: int | None = None) -> None:
    """``density`` is the fraction of each task vector kept: in (0, 1]; one value, or one per model."""
    values = per_model(density, k, "density", method) if k is not None else [density]
    for d in values:
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0.0 < d <= 1.0:
            raise ConfigError(
                f"{method}: density must be in (0, 1] (the fraction of each task vector's entries kept; "
                f"1 keeps all), got {density!r}"
            )


def check_weighting(weighting: str, normalize: bool, method: str) -> None:
    if weighting not in WEIGHTINGS:
        raise ConfigError(f"{method}: weighting must be one of {list(WEIGHTINGS)}, got {weighting!r}")
    if not isinstance(normalize, bool):
        raise ConfigError(f"{method}: normalize must be true or false, got {normalize!r}")
    if weighting == "paper" and not normalize:
        raise ConfigError(
            f"{method}: normalize: false (sum the agreeing entries without dividing) is mergekit's option; "
            "set weighting: mergekit with it, or leave normalize out for the paper's disjoint mean"
        )


def _keeps(density: float | Sequence[float], k: int, numel: int) -> list[int]:
    return [int(d * numel) for d in per_model(density, k, "density", "ties")]


def trim(deltas: Tensor, density: float | Sequence[float]) -> Tensor:
    """Zero all but the ``int(density * numel)`` largest-magnitude entries of each task vector.

    ``deltas`` (k, *S) -> (k, *S): a new tensor, or ``deltas`` itself when everything is kept.
    ``density``: one value, or one per task vector. The count matches PEFT's
    ``magnitude_based_pruning``; a k-th-value threshold replaces its ``topk`` (about 3x faster on CPU
    for embedding-sized tensors).
    """
    numel = deltas[0].numel()
    keeps = _keeps(density, deltas.shape[0], numel)
    if all(keep >= numel for keep in keeps):
        return deltas
    out = torch.zeros_like(deltas)
    for i, (row, keep) in enumerate(zip(deltas, keeps, strict=True)):
        if keep >= numel:
            out[i] = row
            continue
        if keep == 0:
            continue
        magnitude = row.abs().reshape(-1)
        threshold = magnitude.kthvalue(numel - keep + 1).values
        mask = magnitude > threshold
        missing = keep - int(mask.sum())
        if missing > 0:
            tied = magnitude == threshold
            mask |= tied & (tied.cumsum(0) <= missing)
        out[i] = row * mask.reshape(row.shape)
    return out


def sum_over_tasks(deltas: Tensor) -> Tensor:
    """``deltas.sum(dim=0)`` added in task order, one row at a time: (k, *S) -> S. torch's own dim-0
    reduction picks its summation order by the tensor's width, so a merge done in chunks (or streamed)
    would differ in the last bit from one done whole; this order does not depend on the width."""
    total = deltas[0].clone()
    for row in deltas[1:]:
        total += row
    return total


def elect_sign(deltas: Tensor) -> Tensor:
    """The sign (+1 or -1, fp32) of the sum over tasks: ``deltas`` (k, *S) -> S; a zero sum elects +1."""
    total = sum_over_tasks(deltas)
    sign = torch.ones_like(total)
    sign[total < 0] = -1.0
    return sign


def disjoint_mean(deltas: Tensor, sign: Tensor, weight: Sequence[float] | None = None) -> Tensor:
    """Mean over the tasks whose entry is non-zero with the elected ``sign``; 0 where there is none.

    ``deltas`` (k, *S), ``sign`` S of +-1 -> S. ``weight``: each task's entries are multiplied by it
    before they are summed, and the sum still divided by the count (PEFT's ``disjoint_merge``).
    """
    agree = deltas.sign() == sign
    count = agree.sum(dim=0).clamp(min=1)  # integers: exact in any order
    if weight is None:  # the product is a temporary: freed before the division allocates
        return sum_over_tasks(deltas * agree) / count
    return sum_over_tasks(deltas * weight_column(weight, deltas) * agree) / count


def weighted_disjoint_sum(weighted: Tensor, weight: Sequence[float], normalize: bool) -> Tensor:
    """mergekit's TIES combination of already weighted task vectors ``weighted`` (k, *S) -> S: the sign
    of their sum is elected, the agreeing entries summed and, with ``normalize``, divided by the sum of
    the agreeing models' weights (1 where that is 0)."""
    agree = weighted.sign() == elect_sign(weighted)
    total = sum_over_tasks(weighted * agree)
    if not normalize:
        return total
    divisor = sum_over_tasks(weight_column(weight, weighted) * agree)
    divisor[divisor == 0] = 1.0
    return total / divisor


def combine_agreeing(
    chunk: Tensor, weight: Sequence[float] | None, weighting: Weighting, normalize: bool
) -> Tensor:
    """The TIES combination of (trimmed or dropped) task vectors ``chunk`` (k, *S) -> S, as
    ``weighting`` defines it (see the module docstring)."""
    if weighting == "paper":
        return disjoint_mean(chunk, elect_sign(chunk), weight)
    w = weight if weight is not None else [1.0] * chunk.shape[0]
    weighted = chunk if weight is None else chunk * weight_column(w, chunk)
    return weighted_disjoint_sum(weighted, w, normalize)


CHUNK_POSITIONS = 1 << 16
"""Positions of a tensor (columns of the (k, n) stack) trimmed, elected and averaged at a time."""


def _thresholds(flat: Tensor, keeps: Sequence[int]) -> tuple[Tensor, Tensor]:
    """Per task vector (row of ``flat``, (k, n)): the magnitude ``trim`` cuts at, and how many entries
    equal to it ``trim`` keeps besides those above it. One row's magnitudes are held at a time. A row
    kept whole cuts at -1 (every magnitude is above it), a row kept empty at +inf."""
    n = flat.shape[1]
    thresholds = torch.empty(flat.shape[0], dtype=flat.dtype, device=flat.device)
    tied_kept = torch.zeros(flat.shape[0], dtype=torch.int32, device=flat.device)
    for i, (row, keep) in enumerate(zip(flat, keeps, strict=True)):
        if keep >= n or keep == 0:
            thresholds[i] = -1.0 if keep >= n else math.inf
            continue
        magnitude = row.abs()
        thresholds[i] = magnitude.kthvalue(n - keep + 1).values
        tied_kept[i] = keep - int((magnitude > thresholds[i]).sum())
        del magnitude
    return thresholds, tied_kept


def trimmed_disjoint_mean(
    deltas: Tensor,
    density: float | Sequence[float],
    weight: Sequence[float] | None = None,
    weighting: Weighting = "paper",
    normalize: bool = True,
) -> Tensor:
    """``combine_agreeing(trim(deltas, density), ...)``, bit for bit, computed CHUNK_POSITIONS columns
    at a time: ``deltas`` (k, *S) fp32 -> S.

    Every step but the trim's threshold is elementwise across positions, so after one pass for each
    row's threshold (and how many entries tied with it to keep, in flattened order) the rest runs on
    (k, chunk) slices: besides the result, about one tensor's worth of memory (a row's magnitudes)
    instead of the several (k, *S) copies of trim-then-elect-then-average."""
    k = deltas.shape[0]
    flat = deltas.reshape(k, -1)
    n = flat.shape[1]
    keeps = _keeps(density, k, n)
    out = torch.zeros(n, dtype=torch.float32, device=deltas.device)
    if all(keep == 0 for keep in keeps):
        return out.reshape(deltas.shape[1:])
    trimming = any(keep < n for keep in keeps)
    if trimming:
        thresholds, tied_kept = _thresholds(flat, keeps)
        cut, tied_left = thresholds[:, None], tied_kept[:, None]
        tied_seen = torch.zeros_like(tied_left)
    for start in range(0, n, CHUNK_POSITIONS):
        chunk = flat[:, start:start + CHUNK_POSITIONS].contiguous()  # reduced over k as the whole stack is
        if trimming:
            magnitude = chunk.abs()
            mask = magnitude > cut
            tied = magnitude == cut
            if tied.any():  # rare: entries equal to a row's threshold, kept first come first served
                mask |= tied & (tied.cumsum(1, dtype=torch.int32) + tied_seen <= tied_left)
                tied_seen += tied.sum(1, keepdim=True, dtype=torch.int32)
            chunk = chunk * mask
            del magnitude, mask, tied
        out[start:start + CHUNK_POSITIONS] = combine_agreeing(chunk, weight, weighting, normalize)
    return out.reshape(deltas.shape[1:])


def scaled_onto(base: Tensor, direction: Tensor, lam: float) -> Tensor:
    """``base.float() + lam * direction``, bit for bit, reusing ``direction``'s memory (it is consumed)."""
    return direction.mul_(lam).add_(base.to(torch.float32))


def merge(
    base: Tensor,
    deltas: Tensor,
    *,
    seed: int = 0,
    density: float | Sequence[float] = 0.2,
    lam: float = 1.0,
    weight: Sequence[float] | None = None,
    weighting: Weighting = "paper",
    normalize: bool = True,
) -> Tensor:
    """``base`` (shape S, any dtype), ``deltas`` (k, *S) fp32 -> fp32 S. ``seed`` is unused (not random).

    Defaults are the paper's choice without validation data: keep 20%, lam = 1, every weight 1.
    ``density`` and ``weight`` take one value per model as well (a sequence of k).
    """
    k = deltas.shape[0]
    check_density(density, "ties", k)
    check_lam(lam, "ties")
    weight = check_weights(weight, k, "ties")
    check_weighting(weighting, normalize, "ties")
    check_stack(base, deltas)
    return scaled_onto(base, trimmed_disjoint_mean(deltas, density, weight, weighting, normalize), lam)
