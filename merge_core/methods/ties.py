"""TIES-Merging (Yadav et al., arXiv 2306.01708): trim, elect sign, disjoint mean, then scale.

For each tensor: keep each task vector's top ``density`` fraction of entries by magnitude (trim), give
every entry the sign of the sum of the trimmed values (elect; a zero sum elects +1), average only the
trimmed entries that carry the elected sign (disjoint mean; zero where none does), and add
``lam`` times that to the base.

This runs PER TENSOR: "top 20%" is counted within each tensor, not over the whole model. Other
implementations differ, so their numbers are not interchangeable with ours:

- PEFT (``peft.utils.merge_utils.ties``): the same steps per tensor, with the same rounding
  (``int(density * numel)`` kept) and the same tie rule for the sign; it elects on the unweighted
  trimmed tensors, then averages the *weighted* agreeing entries over their count. With every weight
  equal to ``lam`` it equals ``merge(...) - base`` here; the tests check that.
- mergekit (``ties``): multiplies by each model's weight before the election and, by default, divides
  the agreeing sum by the sum of the agreeing weights rather than by their count.
- FusionBench and the authors' code: trim over the whole model's flattened task vector (one global
  threshold), and resolve a zero sum to the sign of the model-wide total; the authors' code also
  keeps every entry whose magnitude ties the threshold, which is one entry more than ``int(d * n)``.

Trimming keeps exactly ``int(density * numel)`` entries. Where magnitudes tie at the threshold the
earlier entries (in flattened order) are kept, so the result does not depend on the device.
"""

from __future__ import annotations

import torch
from torch import Tensor

from merge_core.errors import ConfigError
from merge_core.methods.task_arithmetic import check_lam, check_stack

PAPER = "https://arxiv.org/abs/2306.01708"

# The paper keeps the top 20% (k = 20), its recommended value when no tuning is done, and its code
# searches lam from 0.8 to 2.5 in steps of 0.1 (lam = 1 without validation data). Seven points over that
# range keep the search to seven validation passes; lam < 0.8 is rarely chosen since the disjoint mean
# is already an average, not a sum.
PARAM_GRID: dict[str, tuple[float, ...]] = {
    "density": (0.2,),
    "lam": (0.8, 1.0, 1.2, 1.5, 1.8, 2.1, 2.5),
}


def check_density(density: float, method: str) -> None:
    """``density`` is the fraction of each task vector kept by magnitude: in (0, 1]."""
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0.0 < density <= 1.0:
        raise ConfigError(
            f"{method}: density must be in (0, 1] (the fraction of each task vector's entries kept "
            f"by magnitude; 1 keeps all), got {density!r}"
        )


def trim(deltas: Tensor, density: float) -> Tensor:
    """Zero all but the ``int(density * numel)`` largest-magnitude entries of each task vector.

    ``deltas`` (k, *S) -> (k, *S): a new tensor, or ``deltas`` itself when everything is kept. The
    count matches PEFT's ``magnitude_based_pruning``; a k-th-value threshold replaces its ``topk``
    (about 3x faster on CPU for embedding-sized tensors).
    """
    numel = deltas[0].numel()
    keep = int(density * numel)
    if keep >= numel:
        return deltas
    out = torch.zeros_like(deltas)
    if keep == 0:
        return out
    for i, row in enumerate(deltas):
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


def disjoint_mean(deltas: Tensor, sign: Tensor) -> Tensor:
    """Mean over the tasks whose entry is non-zero with the elected ``sign``; 0 where there is none.

    ``deltas`` (k, *S), ``sign`` S of +-1 -> S.
    """
    agree = deltas.sign() == sign
    count = agree.sum(dim=0).clamp(min=1)  # integers: exact in any order
    return sum_over_tasks(deltas * agree) / count


CHUNK_POSITIONS = 1 << 16
"""Positions of a tensor (columns of the (k, n) stack) trimmed, elected and averaged at a time."""


def _thresholds(flat: Tensor, keep: int) -> tuple[Tensor, Tensor]:
    """Per task vector (row of ``flat``, (k, n)): the magnitude ``trim`` cuts at, and how many entries
    equal to it ``trim`` keeps besides those above it. One row's magnitudes are held at a time."""
    n = flat.shape[1]
    thresholds = torch.empty(flat.shape[0], dtype=flat.dtype, device=flat.device)
    tied_kept = torch.empty(flat.shape[0], dtype=torch.int32, device=flat.device)
    for i, row in enumerate(flat):
        magnitude = row.abs()
        thresholds[i] = magnitude.kthvalue(n - keep + 1).values
        tied_kept[i] = keep - int((magnitude > thresholds[i]).sum())
        del magnitude
    return thresholds, tied_kept


def trimmed_disjoint_mean(deltas: Tensor, density: float) -> Tensor:
    """``disjoint_mean(t, elect_sign(t))`` of ``t = trim(deltas, density)``, bit for bit, computed
    CHUNK_POSITIONS columns at a time: ``deltas`` (k, *S) fp32 -> S.

    Every step but the trim's threshold is elementwise across positions, so after one pass for each
    row's threshold (and how many entries tied with it to keep, in flattened order) the rest runs on
    (k, chunk) slices: besides the result, about one tensor's worth of memory (a row's magnitudes)
    instead of the several (k, *S) copies of trim-then-elect-then-average."""
    k = deltas.shape[0]
    flat = deltas.reshape(k, -1)
    n = flat.shape[1]
    keep = int(density * n)
    out = torch.zeros(n, dtype=torch.float32, device=deltas.device)
    if keep == 0:
        return out.reshape(deltas.shape[1:])
    trimming = keep < n
    if trimming:
        thresholds, tied_kept = _thresholds(flat, keep)
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
        out[start:start + CHUNK_POSITIONS] = disjoint_mean(chunk, elect_sign(chunk))
    return out.reshape(deltas.shape[1:])


def scaled_onto(base: Tensor, direction: Tensor, lam: float) -> Tensor:
    """``base.float() + lam * direction``, bit for bit, reusing ``direction``'s memory (it is consumed)."""
    return direction.mul_(lam).add_(base.to(torch.float32))


def merge(
    base: Tensor, deltas: Tensor, *, seed: int = 0, density: float = 0.2, lam: float = 1.0
) -> Tensor:
    """``base`` (shape S, any dtype), ``deltas`` (k, *S) fp32 -> fp32 S. ``seed`` is unused (not random).

    Defaults are the paper's choice without validation data: keep 20%, lam = 1.
    """
    check_density(density, "ties")
    check_lam(lam, "ties")
    check_stack(base, deltas)
    return scaled_onto(base, trimmed_disjoint_mean(deltas, density), lam)
