"""The matrix methods (TSV-M, Iso-C, Iso-CTS, WUDI): properties that fail if the math is wrong, exact
alpha scaling, what non-matrix tensors get, and their measured temporaries on matrices."""

from __future__ import annotations

import pytest
import torch

from supermerge.merge_core.errors import ConfigError
from supermerge.merge_core.methods import iso, tsv, wudi
from supermerge.merge_core.methods.registry import METHODS


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _truncated(tau: torch.Tensor, rank: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(tau, full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vh[:rank]


def test_tsv_with_one_task_returns_its_task_vector() -> None:
    tau = torch.randn(1, 9, 6, generator=_gen())
    torch.testing.assert_close(tsv.merge(torch.zeros(9, 6), tau), tau[0], rtol=1e-5, atol=1e-5)


def test_tsv_of_tasks_with_orthogonal_top_directions_is_the_sum_of_their_truncations() -> None:
    # Two tasks whose top 3 (of r = 6) directions sit on disjoint coordinate blocks: their kept U and
    # V blocks are already orthogonal, so orthogonalising changes nothing and TSV-M = the sum of the
    # rank-3 truncations. Each task's small rest lies on the other's block, and TSV-M drops it.
    g = _gen(1)
    taus = torch.zeros(2, 12, 6)
    taus[0, :6, :3] = 10 + torch.randn(6, 3, generator=g).mul_(3)
    taus[1, 6:, 3:] = 10 + torch.randn(6, 3, generator=g).mul_(3)
    taus[0, 6:, 3:] = 0.1 * torch.randn(6, 3, generator=g)
    taus[1, :6, :3] = 0.1 * torch.randn(6, 3, generator=g)
    expected = _truncated(taus[0], 3) + _truncated(taus[1], 3)
    torch.testing.assert_close(tsv.merge(torch.zeros(12, 6), taus), expected, rtol=1e-4, atol=1e-5)
    # and it is not task arithmetic: the dropped directions are gone
    assert not torch.allclose(tsv.merge(torch.zeros(12, 6), taus), taus.sum(0), atol=1e-4)


def test_tsv_merged_factors_are_orthonormal_and_keep_the_singular_values() -> None:
    taus = torch.randn(4, 20, 12, generator=_gen(2))
    u, s, vh = tsv.task_pieces(taus)
    assert u.shape == (20, 12) and vh.shape == (12, 12)  # 12 // 4 = 3 triplets per task
    torch.testing.assert_close(u.T @ u, torch.eye(12), atol=1e-5, rtol=0)
    torch.testing.assert_close(vh @ vh.T, torch.eye(12), atol=1e-5, rtol=0)
    for i, tau in enumerate(taus):
        torch.testing.assert_close(s[3 * i:3 * i + 3], torch.linalg.svdvals(tau)[:3])
    torch.testing.assert_close(tsv.direction(taus), (u * s) @ vh)


def test_tsv_keeps_nothing_of_a_matrix_with_fewer_singular_values_than_tasks() -> None:
    taus = torch.randn(3, 2, 8, generator=_gen(3))  # r = 2 < k = 3: r // k = 0, as the official code
    assert not tsv.merge(torch.zeros(2, 8), taus).any()


@pytest.mark.parametrize("name", ["tsv", "iso_c", "iso_cts", "wudi"])
def test_non_matrix_tensors_get_alpha_times_the_mean(name: str) -> None:
    taus = torch.randn(3, 7, generator=_gen(4))
    base = torch.randn(7, generator=_gen(5))
    merged = METHODS[name].op(base, taus, seed=0, alpha=0.7)
    torch.testing.assert_close(merged, base + 0.7 * taus.mean(0))


def test_iso_c_has_all_equal_singular_values_on_the_sums_subspaces() -> None:
    taus = torch.randn(3, 15, 10, generator=_gen(6))
    merged = iso.merge_iso_c(torch.zeros(15, 10), taus)
    total = torch.linalg.svdvals(taus.sum(0))
    values = torch.linalg.svdvals(merged)
    torch.testing.assert_close(values, torch.full((10,), float(total.mean())), rtol=1e-5, atol=0)
    u, _, vh = torch.linalg.svd(taus.sum(0), full_matrices=False)
    torch.testing.assert_close(merged, total.mean() * u @ vh, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("rank", "k", "fraction", "expected"), [
    (384, 8, 0.8, (304, 10)),  # int(307.2) = 307, (384 - 307) / 8 = 9.6 -> 10 per task, common 304
    (1536, 8, 0.8, (1232, 38)),  # int(1228.8) = 1228, 308 / 8 = 38.5 -> 38 (round half to even)
    (10, 3, 1.0, (10, 0)),
    (2, 8, 0.8, (2, 0)),
    (3, 2, 0.3, (1, 1)),  # official: round(1.5) * 2 = 4 > 3 would leave -1 common; we round down
])
def test_iso_cts_subspace_sizes(rank: int, k: int, fraction: float, expected: tuple[int, int]) -> None:
    common, per_task = iso.subspace_sizes(rank, k, fraction)
    assert (common, per_task) == expected
    assert common + k * per_task == rank


def test_iso_cts_with_the_whole_common_space_is_iso_c() -> None:
    taus = torch.randn(3, 14, 9, generator=_gen(7))
    torch.testing.assert_close(iso.merge_iso_cts(torch.zeros(14, 9), taus, common_space_fraction=1.0),
                               iso.merge_iso_c(torch.zeros(14, 9), taus), rtol=1e-4, atol=1e-5)


def test_iso_cts_spans_the_common_and_each_tasks_own_directions_isotropically() -> None:
    # tall (40, 12), k = 3, fraction 0.5: common 6 directions of the sum, then 2 per task of its task
    # vector projected off them; the merged column space (12 of 40 dims) must contain all of them.
    k, m, n = 3, 40, 12
    taus = torch.randn(k, m, n, generator=_gen(8))
    common, per_task = iso.subspace_sizes(n, k, 0.5)
    assert (common, per_task) == (6, 2)
    merged = iso.merge_iso_cts(torch.zeros(m, n), taus, common_space_fraction=0.5)
    values = torch.linalg.svdvals(merged)
    torch.testing.assert_close(values, values.mean().expand(n), rtol=1e-4, atol=0)
    q = torch.linalg.svd(merged, full_matrices=False)[0]
    off = lambda x: x - q @ (q.T @ x)  # noqa: E731 - the part outside the merged column space
    cu = torch.linalg.svd(taus.sum(0), full_matrices=False)[0][:, :common]
    assert off(cu).norm() < 1e-4
    for tau in taus:
        own = torch.linalg.svd(tau - cu @ (cu.T @ tau), full_matrices=False)[0][:, :per_task]
        assert off(own).norm() < 1e-4
    # a direction of one task that is neither common nor among its top ones is not all in there
    assert off(torch.linalg.svd(taus[0], full_matrices=False)[0][:, -1:]).norm() > 1e-2


def _small_wudi_case(seed: int, k: int = 3, m: int = 12, n: int = 20) -> torch.Tensor:
    return 1e-3 * torch.randn(k, m, n, generator=_gen(seed))  # task-vector-sized entries


def test_wudi_normal_equations_are_the_gradient_of_the_official_loss() -> None:
    taus = _small_wudi_case(9)
    x = torch.randn(12, 20, generator=_gen(10)).mul_(1e-3).requires_grad_(True)
    wudi.objective(x, taus).backward()
    a, b = wudi.normal_equations(taus)
    torch.testing.assert_close(x.grad, 2 * (x.detach() @ a - b), rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("shape", [(12, 20), (20, 12)])
def test_wudi_closed_form_solves_the_normal_equations_and_beats_adam(shape) -> None:
    taus = _small_wudi_case(11, 3, *shape)
    x = wudi.closed_form(taus)
    a, b = wudi.normal_equations(taus)
    assert ((x @ a - b).norm() / b.norm()) < 1e-4
    start = wudi.objective(taus.sum(0), taus)
    reached = wudi.objective(x, taus)
    assert reached < start
    assert reached <= wudi.objective(wudi.adam(taus), taus) * (1 + 1e-5)
    # a minimum: every perturbation raises L
    for seed in range(3):
        assert wudi.objective(x + 1e-4 * torch.randn(shape, generator=_gen(seed)), taus) > reached


def test_wudi_closed_form_solves_a_spectrum_fp32_cannot_factor() -> None:
    """Briefly trained task vectors: one dominant direction each, the rest ~1e-6 of it (the README demo's
    fine-tunes hit this). fp32's rounding of A then exceeds the ridge, so its Cholesky fails; the same
    ridge factored in float64 must give the solution of the normal equations, finite."""
    g = _gen(5)
    k, m, n = 2, 300, 128
    taus = torch.stack([1e3 * torch.outer(torch.randn(m, generator=g), torch.randn(n, generator=g))
                        + 1e-3 * torch.randn(m, n, generator=g) for _ in range(k)])
    a, b = wudi.normal_equations(taus)
    shifted = a.clone()
    shifted.diagonal().add_(wudi.RIDGE * float(a.diagonal().sum()) / n)
    assert int(torch.linalg.cholesky_ex(shifted).info) != 0, "the case no longer needs float64"
    x = wudi.closed_form(taus)
    assert torch.isfinite(x).all() and x.dtype == torch.float32
    a64, b64 = wudi.normal_equations(taus.double())  # A unshifted; the solve uses A + ridge I
    start = taus.double().sum(0)
    shifted64 = a64 + torch.eye(n, dtype=torch.float64) * wudi.RIDGE * float(a64.diagonal().sum()) / n
    reference = start + torch.linalg.solve(shifted64, (b64 - start @ a64).T).T  # shifted64 is symmetric
    torch.testing.assert_close(x.double(), reference, rtol=1e-4, atol=1e-6 * float(reference.abs().max()))


def test_wudi_wide_matrix_reaches_zero_in_the_row_space_nearest_the_start() -> None:
    # in = 50 > k * out = 2 * 8: the interference can be cancelled exactly, X tau_i^T = tau_i tau_i^T
    taus = _small_wudi_case(12, 2, 8, 50)
    x = wudi.closed_form(taus)
    for tau in taus:
        torch.testing.assert_close(x @ tau.T, tau @ tau.T, rtol=1e-3, atol=1e-10)
    step = x - taus.sum(0)
    rows = taus.reshape(16, 50)
    # the step lies in the task vectors' row space (nothing added where L does not look)
    assert (step - step @ torch.linalg.pinv(rows) @ rows).norm() < 1e-5 * step.norm()


@pytest.mark.parametrize("seed", range(3))
def test_wudi_objective_never_rises_along_the_official_adam_path(seed: int) -> None:
    taus = _small_wudi_case(seed)
    trace: list[float] = []
    wudi.adam(taus, trace=trace)
    assert len(trace) == wudi.ADAM_STEPS + 1
    assert all(after <= before for before, after in zip(trace, trace[1:]))
    assert trace[-1] < 0.5 * trace[0]


@pytest.mark.parametrize("name", ["tsv", "iso_c", "iso_cts", "wudi"])
@pytest.mark.parametrize("shape", [(10, 6), (6, 10), (5,)])
def test_alpha_is_an_exact_scale(name: str, shape: tuple[int, ...]) -> None:
    spec = METHODS[name]
    assert spec.scale == "alpha"
    taus = torch.randn(3, *shape, generator=_gen(13))
    base = torch.randn(shape, generator=_gen(14))
    unit = spec.op(torch.zeros(shape), taus, seed=0, alpha=1.0)
    for alpha in (0.6, 1.3):
        assert torch.equal(spec.op(base, taus, seed=0, alpha=alpha), base + alpha * unit)


@pytest.mark.parametrize(("op", "params"), [
    (tsv.merge, {"alpha": float("nan")}),
    (iso.merge_iso_c, {"alpha": "1"}),
    (iso.merge_iso_cts, {"common_space_fraction": 0.0}),
    (iso.merge_iso_cts, {"common_space_fraction": 1.5}),
    (wudi.merge, {"solver": "sgd"}),
    (wudi.merge, {"solver": "adam", "steps": -1}),
])
def test_bad_params_raise_config_error(op, params: dict) -> None:
    with pytest.raises(ConfigError):
        op(torch.zeros(4, 3), torch.randn(2, 4, 3), **params)


@pytest.mark.parametrize("k", [2, 8])
@pytest.mark.parametrize("name", ["tsv", "iso_c", "iso_cts", "wudi"])
def test_declared_temporaries_cover_what_the_op_allocates_on_matrices(name: str, k: int) -> None:
    """As test_methods_per_tensor's check, on matrices: every tall or square shape within the
    declared values, and the square one (the worst case) within 40 % of them."""
    from torch.profiler import ProfilerActivity, profile

    spec = METHODS[name]
    measured = {}
    for shape in [(128, 128), (512, 32), (2048, 8)]:
        base, deltas = torch.randn(shape), torch.randn(k, *shape)
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            out = spec.op(base, deltas, seed=0)
            del out
        live = peak = 0
        for event in sorted(prof.events(), key=lambda e: e.time_range.start):
            live += event.self_cpu_memory_usage
            peak = max(peak, live)
        numel = shape[0] * shape[1]
        measured[shape] = peak
        assert peak <= 4 * spec.temporaries.values(k, numel) + 4096, (name, shape, peak / (4 * numel))
    assert measured[(128, 128)] >= 0.6 * 4 * spec.temporaries.values(k, 128 * 128), name


def test_wudi_takes_the_official_procedure_as_parameters() -> None:
    from supermerge.merge_core.merge import _candidates

    assert _candidates(METHODS["wudi"], {"solver": "adam", "steps": 10, "alpha": 1.0}) == [
        {"solver": "adam", "steps": 10, "alpha": 1.0}]
