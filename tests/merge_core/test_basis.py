"""SuperMerge over the TSV-M pieces and started at a training-free merge (supermerge.merge_core.methods.basis)."""

from __future__ import annotations

import math

import pytest
import torch

from supermerge.merge_core.merge import merge
from supermerge.merge_core.methods import basis, iso, tsv
from supermerge.merge_core.methods.learned import FactoredStack, combine
from tests.tiny import task_vectors_and_validation

TASKS = ("alpha", "beta")


@pytest.fixture(scope="module")
def setup(tiny_base_dir, tiny_finetuned):
    return task_vectors_and_validation(tiny_base_dir, tiny_finetuned, TASKS)


def test_tsv_pieces_at_alpha_are_tsv_m_for_every_tensor_kind() -> None:
    g = torch.Generator().manual_seed(0)
    stacks = {"matrix": torch.randn(3, 12, 9, generator=g), "bias": torch.randn(3, 9, generator=g),
              "narrow": torch.randn(3, 2, 9, generator=g)}
    pieces = basis.to_basis(dict(stacks), "tsv")
    assert isinstance(pieces["matrix"], FactoredStack) and pieces["matrix"].B.shape == (12, 9)  # 3 * (9 // 3)
    base = {n: torch.zeros(s.shape[1:]) for n, s in stacks.items()}
    merged = combine(base, pieces, torch.full((3, 1), 0.7), {n: 0 for n in stacks})
    torch.testing.assert_close(merged["matrix"], tsv.merge(base["matrix"], stacks["matrix"], alpha=0.7),
                               rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(merged["bias"], 0.7 * stacks["bias"].mean(0))
    # fewer singular values (2) than tasks (3): the mean, not TSV-M's zero
    torch.testing.assert_close(merged["narrow"], 0.7 * stacks["narrow"].mean(0))
    # one task's coefficient moves only its own piece
    one = combine(base, pieces, torch.tensor([[1.0], [0.0], [0.0]]), {n: 0 for n in stacks})
    u, s, vh = tsv.task_pieces(stacks["matrix"])
    torch.testing.assert_close(one["matrix"], (u[:, :3] * s[:3]) @ vh[:3], rtol=1e-5, atol=1e-6)


def test_iso_cts_pieces_at_alpha_are_iso_cts_and_each_holds_its_own_directions() -> None:
    g = torch.Generator().manual_seed(1)
    stacks = {"matrix": torch.randn(4, 16, 12, generator=g), "bias": torch.randn(4, 12, generator=g)}
    pieces = basis.to_basis(dict(stacks), "iso_cts")
    assert pieces["matrix"].shape == (4, 16, 12)
    base = {n: torch.zeros(s.shape[1:]) for n, s in stacks.items()}
    merged = combine(base, pieces, torch.full((4, 1), 1.3), {n: 0 for n in stacks})
    torch.testing.assert_close(merged["matrix"], iso.merge_iso_cts(base["matrix"], stacks["matrix"], alpha=1.3),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(merged["bias"], 1.3 * stacks["bias"].mean(0))
    # piece 0 minus the shared common part is task 0's own components: rank = its share of directions
    left, right, owner = iso.iso_cts_components(stacks["matrix"], 0.8)
    common = left[:, owner < 0] @ right[owner < 0] / 4
    own = pieces["matrix"][0] - common
    torch.testing.assert_close(own, left[:, owner == 0] @ right[owner == 0], rtol=1e-5, atol=1e-5)
    assert int((owner == 0).sum()) == iso.subspace_sizes(12, 4, 0.8)[1] == torch.linalg.matrix_rank(own)
    # the pieces differ: a task's coefficient moves its own directions, not only a shared scale
    assert not torch.allclose(pieces["matrix"][0], pieces["matrix"][1])


@pytest.mark.parametrize(("method", "reference"), [("supermerge_tsv_init", "tsv"),
                                                   ("supermerge_iso_cts_init", "iso_cts"),
                                                   ("supermerge_ta_init", "task_arithmetic")])
def test_training_free_start_is_that_methods_merge(tiny_base_dir, setup, method, reference) -> None:
    vectors, val = setup
    start = merge(tiny_base_dir, vectors, method, params={"steps": 0}, val=val)
    chosen = merge(tiny_base_dir, vectors, reference, params={"search": True}, val=val)  # its grid search, same data
    scale_key = "lam" if reference == "task_arithmetic" else "alpha"
    assert [p["scale"] for p in start.search] == [p[scale_key] for p in chosen.search]
    assert [p["val_accuracy"] for p in start.search] == pytest.approx([p["val_accuracy"] for p in chosen.search])
    for n, t in chosen.tensors.items():
        torch.testing.assert_close(start.tensors[n], t, rtol=1e-4, atol=1e-5, msg=n)
    assert torch.allclose(start.learned.coefficients, torch.full_like(start.learned.coefficients, 0.3))


def test_training_over_tsv_pieces_lowers_the_validation_loss(tiny_base_dir, setup) -> None:
    vectors, val = setup
    result = merge(tiny_base_dir, vectors, "supermerge_tsv", params={"steps": 15, "batch_size": 8}, val=val)
    assert result.learned.losses[-1] < result.learned.losses[0]
    assert not math.isnan(result.learned.losses[-1])
