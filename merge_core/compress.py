"""Compressed task vectors (issue 15 part 3): each matrix of a task vector kept as its top-r singular
components, so k tasks cost about what one dense model costs and a flat merge fits where only a tree
did.

Task i's (out, in) delta ``tau`` becomes ``U_r diag(S_r) V_r^T`` (its best rank-r approximation),
held as a ``LowRankDelta`` with ``B = U_r diag(S_r)`` (out, r) and ``A = V_r^T`` (r, in): the form a
LoRA adapter's delta takes, so the learned merge stacks it factored (``FactoredStack``) with no second
code path, and SuperMerge's tanh weights multiply the reconstruction where they multiplied ``tau``.

``r`` defaults to TSV-M's truncation, ``floor(min(out, in) / k)``: the k tasks' kept singular values
together number at most ``min(out, in)``. Their factors hold ``k * r * (out + in)`` values against
``out * in`` for one dense matrix: ``(out + in) / max(out, in)`` dense matrices, 1-2 (2 for square
ones), so the k compressed task vectors cost one to two dense task vectors in all, not k. Tensors that
are not matrices (biases, LayerNorm) stay dense, as does a matrix with fewer than k singular values
(r = 0 would drop it) and a delta already compact (a LoRA adapter's).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from supermerge.merge_core.deltas import Delta, LowRankDelta
from supermerge.merge_core.errors import ConfigError
from supermerge.merge_core.task_vectors import TaskVector


def compressed_rank(shape: Sequence[int], k: int, rank: int | None = None) -> int:
    """Singular components kept per task for a tensor of ``shape`` in a merge of ``k``: ``rank``
    (at most ``min(out, in)``), else ``floor(min(out, in) / k)``; 0 for a tensor kept dense."""
    if k < 1:
        raise ConfigError(f"a compressed merge needs at least one task vector, got k={k}")
    if rank is not None and rank < 1:
        raise ConfigError(f"rank must be at least 1 (singular components kept per task), got {rank}")
    if len(shape) != 2:
        return 0
    full = min(shape)
    return min(rank, full) if rank is not None else full // k


def compress_delta(delta: Tensor, rank: int) -> LowRankDelta:
    """The best rank-``rank`` approximation of an (out, in) delta: ``B = U_r diag(S_r)``, ``A = V_r^T``, fp32.

    Through the eigendecomposition of the smaller Gram matrix (``delta^T delta`` or ``delta delta^T``,
    min(out, in) square) instead of an SVD of ``delta``: a 151,936 x 896 word embedding costs one
    matrix product and an 896 x 896 eigh, several times faster than its economy SVD. The Gram's
    eigenvectors are the singular vectors of ``delta``; the other factor is ``delta`` projected on
    them (``B = delta V_r``, or ``A = diag(1/S_r) U_r^T delta``), so the product is the projection of
    ``delta`` on its top-r singular subspace, Eckart-Young's optimum. The eigh runs in fp64 (squaring
    the singular values squares their range); ``rank = min(out, in)`` gives ``delta`` back to rounding."""
    if delta.dim() != 2 or not 1 <= rank <= min(delta.shape):
        raise ValueError(f"compress_delta needs a matrix and 1 <= rank <= {min(delta.shape)}, got "
                         f"shape {tuple(delta.shape)} and rank {rank}")
    d = delta.to(torch.float32)
    tall = d.shape[0] >= d.shape[1]
    gram = d.T @ d if tall else d @ d.T
    values, vectors = top_eigenpairs(gram.to(torch.float64), rank)
    top = vectors.to(torch.float32)
    if tall:
        return LowRankDelta((d @ top).contiguous(), top.T.contiguous(), 1.0)
    s = values.clamp(min=0).sqrt().to(torch.float32)
    a = top.T @ d  # diag(S_r) V_r^T
    return LowRankDelta((top * s).contiguous(), (a / s.clamp(min=torch.finfo(torch.float32).tiny)[:, None]).contiguous(), 1.0)


def top_eigenpairs(gram: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """The ``rank`` largest eigenvalues of a symmetric matrix, descending, and their eigenvectors (columns).

    On the CPU only that index range is computed (LAPACK's syevr through scipy): the tridiagonal
    reduction, then ``rank`` eigenvectors instead of all of them. For an 896 x 896 fp64 Gram and rank 28
    (a Qwen2-0.5B matrix in a merge of 32) that took 0.34 s against 1.24 s for ``torch.linalg.eigh``,
    the same pairs to 2e-14; the full eigh was 85 % of compressing a 0.5B-parameter task vector (some
    160 s each on this 2-core machine). Elsewhere (a GPU tensor) torch's full eigh."""
    n = gram.shape[0]
    if gram.device.type != "cpu":
        values, vectors = torch.linalg.eigh(gram)  # ascending
        return values[-rank:].flip(0), vectors[:, -rank:].flip(1)
    import scipy.linalg

    values, vectors = scipy.linalg.eigh(gram.numpy(), subset_by_index=[n - rank, n - 1], driver="evr",
                                        check_finite=False)
    return (torch.from_numpy(values[::-1].copy()).to(gram.dtype),
            torch.from_numpy(vectors[:, ::-1].copy()).to(gram.dtype))


def compress_task_vector(vector: TaskVector, k: int, rank: int | None = None) -> TaskVector:
    """``vector`` with every dense matrix delta compressed (``compressed_rank``); other deltas, and
    compact ones, as they are. The result shares the uncompressed tensors with ``vector``."""
    deltas: dict[str, Delta] = {}
    for name, delta in vector.deltas.items():
        r = compressed_rank(tuple(delta.shape), k, rank) if isinstance(delta, Tensor) else 0
        deltas[name] = compress_delta(delta, r) if r else delta
    return TaskVector(vector.name, vector.source, deltas, vector.heads)


def compressed_values(shape: Sequence[int], k: int, rank: int | None = None) -> int:
    """Values one task's delta of ``shape`` holds once compressed (``r * (out + in)``, or dense)."""
    r = compressed_rank(shape, k, rank)
    dense = 1
    for d in shape:
        dense *= d
    return r * (shape[0] + shape[1]) if r else dense


def stacked_values(shape: Sequence[int], k: int, rank: int | None = None) -> int:
    """Values the learned merge's stack of k compressed deltas of ``shape`` holds: factored where that
    is smaller than the dense (k, out, in) stack, else dense (supermerge.merge_core.methods.learned._factored)."""
    r = compressed_rank(shape, k, rank)
    dense = 1
    for d in shape:
        dense *= d
    return k * r * (shape[0] + shape[1]) if r and r * (shape[0] + shape[1]) < dense else k * dense
