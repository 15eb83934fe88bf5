"""Isotropic merging, Iso-C and Iso-CTS (Marczak et al., ICML 2025, "No task left behind: isotropic
model merging with common and task-specific subspaces", arXiv 2502.04959).

Iso-C, per 2-D tensor: the SVD of the task-vector sum ``U S V^T`` with every singular value replaced
by their mean, ``base + alpha * mean(S) U V^T``: the spectrum is flattened so that no task's
directions dominate (the nuclear norm of the sum is kept).

Iso-CTS, per 2-D tensor with r = min(out, in): the sum's top ``r - k * c`` left/right singular
directions (the common subspace, about ``common_space_fraction`` of r, adjusted so that k divides
the rest) plus, per task, the top ``c`` singular directions of its task vector projected off the
common left subspace; the r left and r right directions side by side are orthogonalised (polar
factor) and all singular values set to the mean of the ones kept: ``base + alpha * mean * U' V'^T``.

Every other tensor gets ``alpha * mean_i tau_i``, as the authors' code (and FusionBench's ``iso_c``
/ ``iso_cts``) does; embedding matrices are 2-D and merged like any other matrix, as there.

Differences from the official code: the task sum is added in task order before the SVD (theirs
divides the sum by k and multiplies it back, which changes the last bits only); where rounding the
task-specific size up would leave the common subspace negative (r < k with a small fraction, where
their slicing fails), the task-specific size is rounded down instead.
"""

from __future__ import annotations

import torch
from torch import Tensor

from supermerge.merge_core.errors import ConfigError
from supermerge.merge_core.methods.task_arithmetic import check_stack
from supermerge.merge_core.methods.ties import scaled_onto, sum_over_tasks
from supermerge.merge_core.methods.tsv import check_alpha, mean_of_tasks, orthogonal_factor

PAPER = "https://arxiv.org/abs/2502.04959"

# The paper picks alpha on validation data; flattening the spectrum spreads the sum's energy over
# every direction, and its best alphas for ViTs lie between 1 and 2 (FusionBench's default is 1.0).
ISO_C_GRID: dict[str, tuple[float, ...]] = {"alpha": (0.6, 0.8, 1.0, 1.2, 1.4, 1.6, 1.8, 2.0)}
# 0.8 is the paper's (and FusionBench's) common-subspace fraction.
ISO_CTS_GRID: dict[str, tuple[float, ...]] = {**ISO_C_GRID, "common_space_fraction": (0.8,)}


def iso_c_direction(deltas: Tensor) -> Tensor:
    """The Iso-C delta at alpha = 1: (k, *S) fp32 -> S."""
    if deltas.dim() != 3:
        return mean_of_tasks(deltas)
    u, s, vh = torch.linalg.svd(sum_over_tasks(deltas), full_matrices=False)
    return (u * s.mean()) @ vh


def subspace_sizes(rank: int, k: int, common_space_fraction: float) -> tuple[int, int]:
    """(common directions, directions per task) of an Iso-CTS matrix with ``rank`` = min(out, in)
    singular values, as the official code rounds them: the task-specific total is a multiple of k
    nearest to ``rank - int(rank * fraction)``, and the common subspace takes the rest."""
    task_total = round((rank - int(rank * common_space_fraction)) / k) * k
    if task_total > rank:
        task_total -= k
    return rank - task_total, task_total // k


def iso_cts_components(deltas: Tensor, common_space_fraction: float) -> tuple[Tensor, Tensor, Tensor]:
    """One matrix's Iso-CTS components at alpha = 1, (k, m, n) fp32 -> ``left`` (m, r) already times
    the mean singular value, ``right`` (r, n) and ``owner`` (r,): the task whose own directions
    component j holds, -1 for the common subspace. ``left @ right`` is the Iso-CTS delta; the learned
    merge's ``basis: iso_cts`` weights these components per task (supermerge.merge_core.methods.basis)."""
    k, m, n = deltas.shape
    rank = min(m, n)
    common, per_task = subspace_sizes(rank, k, common_space_fraction)
    u, s, vh = torch.linalg.svd(sum_over_tasks(deltas), full_matrices=False)
    left = torch.empty(m, rank, dtype=torch.float32, device=deltas.device)
    values = torch.empty(rank, dtype=torch.float32, device=deltas.device)
    right = torch.empty(rank, n, dtype=torch.float32, device=deltas.device)
    shared = slice(k * per_task, rank)
    left[:, shared], values[shared], right[shared] = u[:, :common], s[:common], vh[:common]
    common_u = left[:, shared]
    del u, s, vh
    for i, tau in enumerate(deltas if per_task else ()):
        own = tau - common_u @ (common_u.T @ tau)
        ui, si, vhi = torch.linalg.svd(own, full_matrices=False)
        cols = slice(i * per_task, (i + 1) * per_task)
        left[:, cols], values[cols], right[cols] = ui[:, :per_task], si[:per_task], vhi[:per_task]
        del own, ui, si, vhi
    owner = torch.full((rank,), -1, dtype=torch.long, device=deltas.device)
    owner[: k * per_task] = torch.arange(k, device=deltas.device).repeat_interleave(per_task)
    return orthogonal_factor(left) * values.mean(), orthogonal_factor(right), owner


def iso_cts_direction(deltas: Tensor, common_space_fraction: float) -> Tensor:
    """The Iso-CTS delta at alpha = 1: (k, *S) fp32 -> S."""
    if deltas.dim() != 3:
        return mean_of_tasks(deltas)
    left, right, _ = iso_cts_components(deltas, common_space_fraction)
    return left @ right


def check_fraction(common_space_fraction: float) -> None:
    if (isinstance(common_space_fraction, bool) or not isinstance(common_space_fraction, (int, float))
            or not 0.0 < common_space_fraction <= 1.0):
        raise ConfigError(
            "iso_cts: common_space_fraction must be in (0, 1] (the share of each matrix's directions "
            f"taken from the task-vector sum; the paper uses 0.8), got {common_space_fraction!r}"
        )


def merge_iso_c(base: Tensor, deltas: Tensor, *, seed: int = 0, alpha: float = 1.0) -> Tensor:
    """``base`` (shape S, any dtype), ``deltas`` (k, *S) fp32 -> fp32 S. ``seed`` is unused."""
    check_alpha(alpha, "iso_c")
    check_stack(base, deltas)
    return scaled_onto(base, iso_c_direction(deltas), alpha)


def merge_iso_cts(
    base: Tensor, deltas: Tensor, *, seed: int = 0, alpha: float = 1.0, common_space_fraction: float = 0.8
) -> Tensor:
    """``base`` (shape S, any dtype), ``deltas`` (k, *S) fp32 -> fp32 S. ``seed`` is unused."""
    check_alpha(alpha, "iso_cts")
    check_fraction(common_space_fraction)
    check_stack(base, deltas)
    return scaled_onto(base, iso_cts_direction(deltas, common_space_fraction), alpha)
