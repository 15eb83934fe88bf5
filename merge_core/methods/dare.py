"""DARE (Yu et al., arXiv 2311.03099): drop each task-vector entry with probability p, rescale the
survivors by 1 / (1 - p) so each task vector keeps its expected value, then combine.

``combine="ta"``: ``base + lam * sum_i dare(tau_i)`` (Task Arithmetic on the sparsified vectors).
``combine="ties"``: TIES' sign election and disjoint mean on the sparsified vectors, times lam. By
default (``density=1``) nothing is trimmed by magnitude after the random drop, as in mergekit's and
PEFT's ``dare_ties``: the random drop already does the sparsifying. The DARE authors' code instead ran
full TIES (with its magnitude trim) on the dropped vectors; ``density < 1`` reproduces that. Note that
``int(density * numel)`` counts the dropped zeros, so once ``1 - p <= density`` the trim keeps about
every survivor.

The mask is drawn per tensor from a generator seeded with ``seed`` (one Bernoulli draw per task in
order), never from torch's global RNG. It is the mask PEFT's ``dare_linear``/``dare_ties`` would draw
after ``torch.manual_seed(seed)`` on the same device; the tests rely on that.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from merge_core.errors import ConfigError
from merge_core.methods import task_arithmetic, ties
from merge_core.methods.task_arithmetic import check_lam, check_stack

PAPER = "https://arxiv.org/abs/2311.03099"

# The authors' GLUE search (BERT/RoBERTa) tries p in {0.1, 0.3, 0.5, 0.7, 0.9} and lam in
# {0.1, 0.3, 0.5, 0.7, 0.9, 1.0}. Two drop rates (the paper's headline 0.9, and 0.5 since small encoders
# tolerate less dropping than 7B LLMs) times four scales gives eight validation passes. dare_ta and
# dare_ties share this grid: the lower scales suit the sum, the higher ones the disjoint mean.
PARAM_GRID: dict[str, tuple[float, ...]] = {
    "p": (0.5, 0.9),
    "lam": (0.3, 0.5, 0.7, 1.0),
}


def check_p(p: float) -> None:
    """``p`` is the drop probability, in [0, 1): p = 1 would drop everything and divide by zero."""
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
        raise ConfigError(
            f"dare: p must be in [0, 1) (the probability of dropping each task-vector entry), got {p!r}"
        )


def drop_and_rescale(deltas: Tensor, p: float, seed: int) -> Tensor:
    """Each entry of ``deltas`` (k, *S) kept with probability 1 - p and divided by 1 - p; -> (k, *S).

    Task i's mask is the i-th Bernoulli draw from a generator seeded with ``seed`` on deltas' device.
    """
    keep = 1.0 - p
    generator = torch.Generator(device=deltas.device).manual_seed(seed)
    out = torch.empty_like(deltas)
    for i, row in enumerate(deltas):
        mask = torch.bernoulli(torch.full_like(row, keep), generator=generator)
        out[i] = row * mask / keep
    return out


def merge(
    base: Tensor,
    deltas: Tensor,
    *,
    combine: Literal["ta", "ties"],
    seed: int = 0,
    p: float = 0.9,
    lam: float = 1.0,
    density: float = 1.0,
) -> Tensor:
    """``base`` (shape S, any dtype), ``deltas`` (k, *S) fp32 -> fp32 S; same ``seed``, same result.

    ``density`` (ties only) trims the dropped vectors by magnitude before the sign election.
    """
    if combine not in ("ta", "ties"):
        raise ConfigError(f"dare: combine must be 'ta' or 'ties', got {combine!r}")
    check_p(p)
    check_lam(lam, f"dare_{combine}")
    ties.check_density(density, f"dare_{combine}")
    if combine == "ta" and density != 1.0:
        raise ConfigError(
            f"dare_ta: density={density!r} only applies to combine='ties' (a magnitude trim before the "
            "sign election); leave it at 1"
        )
    check_stack(base, deltas)
    dropped = drop_and_rescale(deltas, p, seed)
    if combine == "ta":
        return task_arithmetic.merge(base, dropped, lam=lam)
    return ties.scaled_onto(base, ties.trimmed_disjoint_mean(dropped, density), lam)
