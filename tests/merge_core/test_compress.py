"""Compressed task vectors (supermerge.merge_core.compress) and SuperMerge learned over them."""

from __future__ import annotations

import math

import pytest
import torch

from supermerge.merge_core.checkpoint import open_checkpoint
from supermerge.merge_core.compress import compress_delta, compress_task_vector, compressed_rank, compressed_values, stacked_values
from supermerge.merge_core.deltas import LowRankDelta, dense_delta, stored_numel
from supermerge.merge_core.errors import ConfigError
from supermerge.merge_core.merge import merge
from supermerge.merge_core.methods.learned import FactoredStack, LearnedMergeConfig, combine, stack_task_vectors
from tests.tiny import task_vectors_and_validation

TASKS = ("alpha", "beta", "gamma")
STEPS = {"steps": 4, "batch_size": 8}


@pytest.fixture(scope="module")
def setup(tiny_base_dir, tiny_finetuned):
    return task_vectors_and_validation(tiny_base_dir, tiny_finetuned, TASKS)


def test_rank_is_tsv_ms_truncation_unless_given():
    assert compressed_rank((64, 32), 4) == 8 and compressed_rank((32, 64), 3) == 10
    assert compressed_rank((2, 32), 3) == 0  # fewer singular values than tasks: kept dense
    assert compressed_rank((32,), 2) == 0  # not a matrix
    assert compressed_rank((64, 32), 4, rank=5) == 5 and compressed_rank((64, 32), 4, rank=999) == 32
    with pytest.raises(ConfigError, match="rank must be at least 1"):
        compressed_rank((64, 32), 4, rank=0)


def test_compressed_delta_is_the_best_rank_r_approximation():
    """Eckart-Young: the Frobenius error of the top-r truncation is the norm of the dropped singular
    values; at full rank the delta comes back."""
    g = torch.Generator().manual_seed(0)
    delta = torch.randn(12, 7, generator=g)
    s = torch.linalg.svdvals(delta)
    low = compress_delta(delta, 3)
    assert low.B.shape == (12, 3) and low.A.shape == (3, 7) and low.scale == 1.0
    assert torch.linalg.norm(delta - low.dense()).item() == pytest.approx(torch.linalg.norm(s[3:]).item(), rel=1e-4)
    torch.testing.assert_close(compress_delta(delta, 7).dense(), delta, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(300, 40), (40, 300)])
def test_gram_compression_equals_the_svds_truncation(shape):
    """compress_delta goes through the smaller Gram matrix's eigendecomposition, not an SVD: its factors
    are U_r S_r and V_r^T as the SVD gives them (up to each component's sign), for tall and wide
    matrices, when the kept singular values stand apart from the dropped ones (low rank plus noise,
    the shape of a fine-tune's delta)."""
    g = torch.Generator().manual_seed(1)
    m, n = shape
    delta = torch.randn(m, 6, generator=g) @ torch.randn(6, n, generator=g) + 1e-2 * torch.randn(m, n, generator=g)
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    low = compress_delta(delta, 6)
    signs = torch.sign((low.A * vh[:6]).sum(1))
    torch.testing.assert_close(low.A * signs[:, None], vh[:6], rtol=0, atol=1e-4)
    torch.testing.assert_close(low.B * signs, u[:, :6] * s[:6], rtol=0, atol=1e-3)
    torch.testing.assert_close(low.dense(), (u[:, :6] * s[:6]) @ vh[:6], rtol=0, atol=1e-4)


def test_small_rank_stores_about_one_kth_per_task(setup):
    """Per task a compressed (out, in) matrix holds r (out + in) = (out + in) / (max(out, in) k) of its
    dense values at TSV-M's rank: 1/k for the long side, 2/k at most (square); the k tasks together
    hold one to two dense matrices, not k."""
    vectors, _ = setup
    k = len(vectors)
    for shape in [(64, 32), (32, 32), (1536, 384)]:
        dense = shape[0] * shape[1]
        per_task = compressed_values(shape, k)
        assert per_task == (min(shape) // k) * sum(shape)
        assert per_task <= 2 * dense / k
    assert compressed_values((1536, 384), 4) / (1536 * 384) == pytest.approx(1 / 4 * 1920 / 1536)
    assert compressed_values((32,), 4) == 32
    compressed = compress_task_vector(vectors[0], k)
    matrices = [n for n, d in vectors[0].deltas.items() if d.dim() == 2 and min(d.shape) >= k]
    assert matrices and all(isinstance(compressed.deltas[n], LowRankDelta) for n in matrices)
    for n, d in vectors[0].deltas.items():
        if n in matrices:
            assert stored_numel(compressed.deltas[n]) == compressed_values(tuple(d.shape), k)
            assert stored_numel(compressed.deltas[n]) <= 2 * d.numel() / k
        else:
            assert compressed.deltas[n] is d  # biases, LayerNorm, narrow matrices: dense, untouched
    dense_matrices = sum(vectors[0].deltas[n].numel() for n in matrices)
    kept = sum(stored_numel(compressed.deltas[n]) for n in matrices)
    assert kept / dense_matrices <= 2 / k
    # compressing twice changes nothing: the node runner compresses as it loads, the merge again
    again = compress_task_vector(compressed, k)
    assert all(again.deltas[n] is compressed.deltas[n] for n in compressed.deltas)


def test_stacks_of_compressed_task_vectors_are_factored_and_counted_right(tiny_base_dir, setup):
    vectors, _ = setup
    k = len(vectors)
    compressed = [compress_task_vector(v, k) for v in vectors]
    with open_checkpoint(tiny_base_dir) as base:
        base_params = {n: base.get(n).float() for n in vectors[0].deltas}
    stacks = stack_task_vectors(base_params, compressed)
    for n, b in base_params.items():
        stack = stacks[n]
        held = (stack.B.numel() + stack.A.numel()) if isinstance(stack, FactoredStack) else stack.numel()
        assert held == stacked_values(tuple(b.shape), k), n
    # the merge weights multiply the reconstruction U_r S_r V_r^T where they multiplied tau
    coeffs = torch.tensor([[0.2], [-0.5], [0.9]])
    merged = combine(base_params, stacks, coeffs, {n: 0 for n in stacks})
    for n, b in base_params.items():
        expected = b + sum(c * dense_delta(v.deltas[n], b) for c, v in zip(coeffs[:, 0], compressed))
        torch.testing.assert_close(merged[n], expected, rtol=1e-5, atol=1e-6, msg=n)


def test_full_rank_compressed_merge_reproduces_the_dense_merge(tiny_base_dir, setup):
    vectors, val = setup
    dense = merge(tiny_base_dir, vectors, "supermerge", params=STEPS, val=val)
    full = merge(tiny_base_dir, vectors, "supermerge_compressed", params={**STEPS, "rank": 10**6}, val=val)
    assert full.learned.losses == pytest.approx(dense.learned.losses, rel=1e-4)
    torch.testing.assert_close(full.learned.coefficients, dense.learned.coefficients, rtol=1e-4, atol=1e-5)
    for n, t in dense.tensors.items():
        torch.testing.assert_close(full.tensors[n], t, rtol=1e-4, atol=1e-5, msg=n)
    # and at TSV-M's rank it is a different (approximate) merge that still trains
    small = merge(tiny_base_dir, vectors, "supermerge_compressed", params={"steps": 12, "batch_size": 8}, val=val)
    assert any(not torch.allclose(small.tensors[n], t, atol=1e-4) for n, t in dense.tensors.items())
    assert small.learned.losses[-1] < small.learned.losses[0] and not math.isnan(small.learned.losses[-1])


def test_rank_is_refused_outside_the_compressed_basis():
    with pytest.raises(ConfigError, match="rank 4 applies only to basis: compressed"):
        LearnedMergeConfig(rank=4)
    with pytest.raises(ConfigError, match="rank 0 applies only"):
        LearnedMergeConfig(basis="compressed", rank=0)
    assert LearnedMergeConfig(basis="compressed", rank=3).rank == 3


def test_top_eigenpairs_are_the_full_eigendecompositions_largest():
    """Only the top index range is computed (scipy's syevr): the same pairs as torch's full eigh."""
    from supermerge.merge_core.compress import top_eigenpairs

    g = torch.Generator().manual_seed(2)
    x = torch.randn(200, 50, generator=g, dtype=torch.float64)
    gram = x.T @ x
    values, vectors = top_eigenpairs(gram, 7)
    full_values, full_vectors = torch.linalg.eigh(gram)
    torch.testing.assert_close(values, full_values[-7:].flip(0))
    signs = torch.sign((vectors * full_vectors[:, -7:].flip(1)).sum(0))
    torch.testing.assert_close(vectors * signs, full_vectors[:, -7:].flip(1))
