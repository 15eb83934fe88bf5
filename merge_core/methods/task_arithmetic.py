"""Task Arithmetic (Ilharco et al., arXiv 2212.04089): ``base + lam * sum_i tau_i``.

Also home to the input checks every per-tensor operator shares, since each is this sum with a
different combination of the task vectors.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from supermerge.merge_core.errors import ConfigError, TaskVectorError

PAPER = "https://arxiv.org/abs/2212.04089"

# The paper picks lam on held-out validation data from 0.05 to 1.0; steps of 0.1 halve the cost of the
# search and its best value rarely sits between two of them.
PARAM_GRID: dict[str, tuple[float, ...]] = {
    "lam": (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0),
}


def check_stack(base: Tensor, deltas: Tensor) -> None:
    """``deltas`` must be the fp32 (k, *base.shape) stack of k >= 1 task vectors of ``base``'s tensor.

    Broadcasting would otherwise turn a mis-stacked input into a silently wrong tensor.
    """
    if deltas.dtype != torch.float32:
        raise TaskVectorError(f"task vectors must be stacked as float32, got {deltas.dtype}")
    if deltas.dim() != base.dim() + 1 or deltas.shape[1:] != base.shape or deltas.shape[0] < 1:
        raise TaskVectorError(
            f"task vectors have shape {tuple(deltas.shape)}; a base tensor of shape "
            f"{tuple(base.shape)} needs (k, {', '.join(map(str, base.shape))}) with k >= 1"
        )


def check_lam(lam: float, method: str) -> None:
    """``lam`` scales the combined task vector; any finite number (negative lam subtracts a task)."""
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not math.isfinite(lam):
        raise ConfigError(f"{method}: lam must be a finite number (the task vector scale), got {lam!r}")


def per_model(value: float | Sequence[float] | None, k: int, what: str, method: str,
              default: float = 1.0) -> list[float]:
    """One value for each of k models: a single value repeated, or a sequence of exactly k."""
    if value is None:
        return [default] * k
    if isinstance(value, (list, tuple)):
        if len(value) != k:
            raise ConfigError(f"{method}: {what} has {len(value)} values for {k} models; give one per model")
        return list(value)
    return [value] * k


def check_weights(weight: Sequence[float] | None, k: int, method: str) -> list[float] | None:
    """Per-model weights: k finite numbers, or None (every weight 1, nothing multiplied)."""
    if weight is None:
        return None
    values = per_model(weight, k, "weight", method)
    for w in values:
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
            raise ConfigError(f"{method}: weight must be a finite number per model, got {weight!r}")
    return values


def weight_column(weights: Sequence[float], like: Tensor) -> Tensor:
    """Per-model weights as a (k, 1, ..., 1) column that broadcasts over ``like`` (k, *S)."""
    return torch.tensor(weights, dtype=like.dtype, device=like.device).reshape(-1, *([1] * (like.dim() - 1)))


def merge(
    base: Tensor,
    deltas: Tensor,
    *,
    seed: int = 0,
    lam: float = 1.0,
    weight: Sequence[float] | None = None,
    normalize: bool = False,
) -> Tensor:
    """``base + lam * sum_i weight_i * tau_i``: ``base`` (shape S, any dtype), ``deltas`` (k, *S) fp32 ->
    fp32 S. ``seed`` is unused (not random).

    lam = 1 (the default) is the plain sum the paper defines. ``weight``: one per model (default all 1,
    nothing multiplied); ``normalize`` divides the weighted sum by the sum of the weights (mergekit's
    option, off by default as in mergekit; a sum of weights near 0 divides by 1, as mergekit does).
    """
    check_lam(lam, "task_arithmetic")
    check_stack(base, deltas)
    weight = check_weights(weight, deltas.shape[0], "task_arithmetic")
    if not isinstance(normalize, bool):
        raise ConfigError(f"task_arithmetic: normalize must be true or false, got {normalize!r}")
    if not normalize:  # one expression, so the sum is freed as soon as it is scaled (2 temporaries, not 3)
        if weight is None:
            return base.to(torch.float32) + lam * deltas.sum(dim=0)
        return base.to(torch.float32) + lam * (deltas * weight_column(weight, deltas)).sum(dim=0)
    weights = torch.tensor(weight if weight is not None else [1.0] * deltas.shape[0], dtype=torch.float32)
    divisor = float(weights.sum())
    total = (deltas * weight_column(weights.tolist(), deltas)).sum(dim=0) / (divisor if abs(divisor) >= 1e-8 else 1.0)
    return base.to(torch.float32) + lam * total
