"""Weight averaging (model soups, Wortsman et al., arXiv 2203.05482): ``base + mean_i tau_i``.

Identical to the mean of the fine-tuned weights, since every fine-tuned model is ``base + tau_i``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from supermerge.merge_core.methods.task_arithmetic import check_stack

PAPER = "https://arxiv.org/abs/2203.05482"

PARAM_GRID: dict[str, tuple[float, ...]] = {}


def merge(base: Tensor, deltas: Tensor, *, seed: int = 0) -> Tensor:
    """``base`` (shape S, any dtype), ``deltas`` (k, *S) fp32 -> fp32 S. ``seed`` is unused (not random)."""
    check_stack(base, deltas)
    return base.to(torch.float32) + deltas.mean(dim=0)
