"""DARE (Yu et al., arXiv 2311.03099): keep each task-vector entry with probability ``density`` (drop
it with probability p = 1 - density), rescale the survivors by 1 / density so each task vector keeps
its expected value, then combine.

``density`` is the fraction kept, as mergekit and PEFT name it (the paper's drop rate p is 1 - density).

``combine="ta"``: ``base + lam * sum_i weight_i * dare(tau_i)`` (Task Arithmetic on the sparsified
vectors; mergekit's ``dare_linear``). ``combine="ties"``: TIES' sign election and disjoint mean on the
sparsified vectors, times lam, with TIES' two ``weighting`` rules (supermerge.merge_core.methods.ties). By default
(``trim_density=1``) nothing is trimmed by magnitude after the random drop, as in mergekit's and PEFT's
``dare_ties``: the random drop already does the sparsifying. The DARE authors' code instead ran full
TIES (with its magnitude trim) on the dropped vectors; ``trim_density < 1`` reproduces that. Note that
``int(trim_density * numel)`` counts the dropped zeros, so once ``density <= trim_density`` the trim
keeps about every survivor.

The mask is drawn per tensor from a generator seeded with ``seed`` (one Bernoulli draw per task in
order), never from torch's global RNG. It is the mask PEFT's ``dare_linear``/``dare_ties`` would draw
after ``torch.manual_seed(seed)`` on the same device; the tests rely on that. mergekit draws from the
global RNG and rescales to each vector's L1 norm rather than by 1 / density, so its DARE results are
not reproducible here bit for bit (nor from one mergekit run to the next without a fixed seed).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from supermerge.merge_core.errors import ConfigError
from supermerge.merge_core.methods import task_arithmetic, ties
from supermerge.merge_core.methods.task_arithmetic import check_lam, check_stack, check_weights, per_model

PAPER = "https://arxiv.org/abs/2311.03099"

# The authors' GLUE search (BERT/RoBERTa) tries drop rates p in {0.1, 0.3, 0.5, 0.7, 0.9} and lam in
# {0.1, 0.3, 0.5, 0.7, 0.9, 1.0}. Two drop rates (the paper's headline 0.9, and 0.5 since small encoders
# tolerate less dropping than 7B LLMs), i.e. density 0.1 and 0.5, times four scales gives eight
# validation passes (with `search: true`). dare_ta and dare_ties share this grid: the lower scales suit
# the sum, the higher ones the disjoint mean.
PARAM_GRID: dict[str, tuple[float, ...]] = {
    "density": (0.1, 0.5),
    "lam": (0.3, 0.5, 0.7, 1.0),
}


def check_keep(density: float | Sequence[float], k: int, method: str) -> list[float]:
    """``density`` is the probability of keeping each entry, in (0, 1]: 0 would drop everything and
    divide by zero. One value, or one per model."""
    values = per_model(density, k, "density", method)
    for d in values:
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0.0 < d <= 1.0:
            raise ConfigError(
                f"{method}: density must be in (0, 1] (the probability of keeping each task-vector entry; "
                f"the paper's drop rate p is 1 - density), got {density!r}"
            )
    return values


def drop_and_rescale(deltas: Tensor, density: float | Sequence[float], seed: int) -> Tensor:
    """Each entry of ``deltas`` (k, *S) kept with probability ``density`` (one, or one per task) and
    divided by it; -> (k, *S).

    Task i's mask is the i-th Bernoulli draw from a generator seeded with ``seed`` on deltas' device.
    """
    keeps = per_model(density, deltas.shape[0], "density", "dare")
    generator = torch.Generator(device=deltas.device).manual_seed(seed)
    out = torch.empty_like(deltas)
    for i, (row, keep) in enumerate(zip(deltas, keeps, strict=True)):
        mask = torch.bernoulli(torch.full_like(row, keep), generator=generator)
        out[i] = row * mask / keep
    return out


def merge(
    base: Tensor,
    deltas: Tensor,
    *,
    combine: Literal["ta", "ties"],
    seed: int = 0,
    density: float | Sequence[float] = 0.1,
    lam: float = 1.0,
    weight: Sequence[float] | None = None,
    weighting: ties.Weighting = "paper",
    normalize: bool | None = None,
    trim_density: float = 1.0,
) -> Tensor:
    """``base`` (shape S, any dtype), ``deltas`` (k, *S) fp32 -> fp32 S; same ``seed``, same result.

    ``density`` (one, or one per model): the fraction kept by the random drop; the default 0.1 is the
    paper's headline drop rate p = 0.9. ``trim_density`` (ties only) trims the dropped vectors by
    magnitude before the sign election. ``normalize``: for ``combine="ta"`` divide by the sum of the
    weights (default false); for ties with ``weighting="mergekit"`` divide by the agreeing weights
    (default false, as mergekit's ``dare_ties``).
    """
    method = f"dare_{combine}"
    if combine not in ("ta", "ties"):
        raise ConfigError(f"dare: combine must be 'ta' or 'ties', got {combine!r}")
    k = deltas.shape[0]
    check_keep(density, k, method)
    check_lam(lam, method)
    ties.check_density(trim_density, method)
    if combine == "ta" and trim_density != 1.0:
        raise ConfigError(
            f"dare_ta: trim_density={trim_density!r} only applies to dare_ties (a magnitude trim before the "
            "sign election); leave it at 1"
        )
    if combine == "ta" and weighting != "paper":
        raise ConfigError("dare_ta: weighting applies to dare_ties' sign election only; leave it out")
    check_stack(base, deltas)
    dropped = drop_and_rescale(deltas, density, seed)
    if combine == "ta":
        return task_arithmetic.merge(base, dropped, lam=lam, weight=weight, normalize=bool(normalize))
    if normalize is None:
        normalize = weighting == "paper"
    weight = check_weights(weight, k, method)
    ties.check_weighting(weighting, normalize, method)
    return ties.scaled_onto(base, ties.trimmed_disjoint_mean(dropped, trim_density, weight, weighting, normalize),
                            lam)
