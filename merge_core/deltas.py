"""The three shapes a task vector's per-tensor delta takes, and how to make each dense.

A full fine-tune gives a dense delta. A LoRA adapter gives ``scale * B @ A``: stored factored it costs
``r * (out + in)`` floats instead of ``out * in``. An IA3 adapter rescales a weight along one axis by a
learned vector ``l``; since ``W * l = W + W * (l - 1)`` the task vector is ``l - 1`` and its dense delta
is ``W * (l - 1)`` along that axis. Every merge is linear in these, so each form can stay compact until
a method needs the dense tensor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class LowRankDelta:
    """``delta = scale * B @ A`` with ``B`` of shape (out, r) and ``A`` of shape (r, in), fp32."""

    B: Tensor
    A: Tensor
    scale: float

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.B.shape[0], self.A.shape[1])

    def dense(self, base: Tensor | None = None) -> Tensor:
        return (self.B @ self.A) * self.scale

    def stored_numel(self) -> int:
        return self.B.numel() + self.A.numel()


@dataclass(frozen=True)
class ScaleDelta:
    """IA3: ``delta = base * (l - 1)`` broadcast along ``axis`` of the base weight.

    ``vector`` holds ``l - 1`` (the task vector in IA3's own parameter space), shape (base.shape[axis],).
    """

    vector: Tensor
    axis: int
    shape: tuple[int, ...]

    def dense(self, base: Tensor | None = None) -> Tensor:
        if base is None:
            raise ValueError("an IA3 delta needs its base tensor to become dense")
        view = [1] * len(self.shape)
        view[self.axis] = -1
        return base.to(torch.float32) * self.vector.reshape(view)

    def stored_numel(self) -> int:
        return self.vector.numel()


Delta = Tensor | LowRankDelta | ScaleDelta


def dense_delta(delta: Delta, base: Tensor) -> Tensor:
    """The fp32 dense delta for ``base``'s tensor, whatever form it is stored in."""
    if isinstance(delta, Tensor):
        return delta.to(torch.float32)
    return delta.dense(base)


def stored_numel(delta: Delta) -> int:
    """How many numbers the delta keeps in memory (for the memory planner)."""
    if isinstance(delta, Tensor):
        return delta.numel()
    return delta.stored_numel()
