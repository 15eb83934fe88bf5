"""TSV-M, Task Singular Vectors merging (Gargiulo et al., CVPR 2025, arXiv 2412.00081).

For each 2-D tensor (out, in) with r = min(out, in): an economy SVD of every task vector, its top
``r // k`` singular triplets kept; the kept U's side by side (out, k * (r // k)) and V^T's stacked
are each replaced by their nearest orthonormal matrix (polar factor: SVD, then P Q^T), which removes
the interference between tasks' directions; the merged delta is ``U_orth diag(s) V^T_orth`` with
the tasks' own singular values, and the merge is ``base + alpha * delta``.

Every other tensor (biases, LayerNorm, anything not 2-D) gets ``alpha * mean_i tau_i``, as the
authors' code and FusionBench's ``compute_and_sum_svd_mem_reduction`` do. Embedding matrices are 2-D
and go through TSV like any other matrix (as in both codes). A matrix with fewer than k singular
values (r // k == 0, e.g. BERT's 2-row token-type embedding at k >= 3) keeps nothing, so its merged
delta is zero: the official codes do the same, and we keep it so the results agree.

Differences from the official code: the polar factors are taken of the kept columns only, not of the
(out, r) matrix padded with zero columns when k does not divide r (the same factor on the kept
columns whenever they are linearly independent; the padded ones are multiplied by a zero singular
value there); the authors' exclusion of CLIP's ``text_projection`` by name is not copied (no such
tensor in the models merged here).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from supermerge.merge_core.errors import ConfigError
from supermerge.merge_core.methods.task_arithmetic import check_stack
from supermerge.merge_core.methods.ties import scaled_onto

PAPER = "https://arxiv.org/abs/2412.00081"

# The paper and FusionBench use alpha = 1.0 (the task's own singular values already carry its scale);
# the grid brackets it so validation data can correct for a different number of tasks or fine-tune.
PARAM_GRID: dict[str, tuple[float, ...]] = {"alpha": (0.6, 0.8, 1.0, 1.2, 1.4, 1.6, 1.8, 2.0)}


def check_alpha(alpha: float, method: str) -> None:
    """``alpha`` scales the merged task vector; any finite number."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise ConfigError(f"{method}: alpha must be a finite number (the merged task vector's scale), got {alpha!r}")


def orthogonal_factor(a: Tensor) -> Tensor:
    """The orthonormal matrix nearest to ``a`` in Frobenius norm (its polar factor): ``P Q^T`` of
    ``a = P S Q^T``; same shape as ``a``."""
    p, _, qh = torch.linalg.svd(a, full_matrices=False)
    return p @ qh


def mean_of_tasks(deltas: Tensor) -> Tensor:
    """``mean_i tau_i`` in task order (k, *S) -> S: what the spectral methods' official codes give
    every tensor that is not a matrix (their running mean, up to rounding)."""
    total = deltas[0].clone()
    for row in deltas[1:]:
        total += row
    return total.div_(deltas.shape[0])


def task_pieces(deltas: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The decorrelated per-task pieces of one matrix's task vectors: ``U`` (out, k*c), ``s`` (k*c,)
    and ``Vh`` (k*c, in) with c = min(out, in) // k, task i's triplets in columns/rows i*c..(i+1)*c,
    U and Vh already orthogonalised. ``U diag(s) Vh`` is the TSV-M delta; task i's columns alone give
    its decorrelated piece (the basis ``supermerge`` can learn weights over)."""
    k, m, n = deltas.shape
    keep = min(m, n) // k
    u = torch.empty(m, k * keep, dtype=torch.float32, device=deltas.device)
    s = torch.empty(k * keep, dtype=torch.float32, device=deltas.device)
    vh = torch.empty(k * keep, n, dtype=torch.float32, device=deltas.device)
    if keep == 0:
        return u, s, vh
    for i, tau in enumerate(deltas):
        ui, si, vhi = torch.linalg.svd(tau, full_matrices=False)
        cols = slice(i * keep, (i + 1) * keep)
        u[:, cols], s[cols], vh[cols] = ui[:, :keep], si[:keep], vhi[:keep]
        del ui, si, vhi
    return orthogonal_factor(u), s, orthogonal_factor(vh)


def direction(deltas: Tensor) -> Tensor:
    """The TSV-M delta at alpha = 1: (k, *S) fp32 -> S."""
    if deltas.dim() != 3:
        return mean_of_tasks(deltas)
    u, s, vh = task_pieces(deltas)
    if s.numel() == 0:
        return torch.zeros(deltas.shape[1:], dtype=torch.float32, device=deltas.device)
    return (u * s) @ vh


def merge(base: Tensor, deltas: Tensor, *, seed: int = 0, alpha: float = 1.0) -> Tensor:
    """``base`` (shape S, any dtype), ``deltas`` (k, *S) fp32 -> fp32 S. ``seed`` is unused."""
    check_alpha(alpha, "tsv")
    check_stack(base, deltas)
    return scaled_onto(base, direction(deltas), alpha)
