"""Per-tensor merge operators: hand-worked numbers, PEFT's merge utilities as a reference, DARE's
statistics, shapes and dtypes, and parameter checks."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from peft.utils import merge_utils as peft_merge

from supermerge.merge_core.errors import ConfigError, TaskVectorError
from supermerge.merge_core.methods import average, dare, iso, task_arithmetic, ties, tsv, wudi
from supermerge.merge_core.methods.registry import METHODS

# Three task vectors of six entries, worked by hand for every method below.
BASE = torch.ones(6)
TAUS = torch.tensor(
    [
        [4.0, -1.0, 0.5, 3.0, -2.0, 0.1],
        [2.0, 5.0, -0.2, -6.0, 1.0, 0.3],
        [3.0, -3.5, 0.4, -1.0, -4.0, 0.2],
    ]
)


def test_average_is_base_plus_mean_task_vector() -> None:
    # column sums 9, 0.5, 0.7, -4, -5, 0.6; divided by 3, plus 1
    expected = torch.tensor([4.0, 1 + 0.5 / 3, 1 + 0.7 / 3, 1 - 4 / 3, 1 - 5 / 3, 1.2])
    torch.testing.assert_close(average.merge(BASE, TAUS), expected)


def test_average_equals_mean_of_finetuned_weights() -> None:
    base = torch.randn(4, 5)
    taus = torch.randn(3, 4, 5)
    torch.testing.assert_close(average.merge(base, taus), (base + taus).mean(dim=0))


def test_task_arithmetic_scales_the_sum() -> None:
    # sums 9, 0.5, 0.7, -4, -5, 0.6; times 0.5, plus 1
    expected = torch.tensor([5.5, 1.25, 1.35, -1.0, -1.5, 1.3])
    torch.testing.assert_close(task_arithmetic.merge(BASE, TAUS, lam=0.5), expected)


def test_ties_trim_keeps_top_density_by_magnitude() -> None:
    # density 0.5 of 6 entries keeps int(3.0) = 3 per task vector:
    # |tau1| = 4, 1, .5, 3, 2, .1 -> keep 4, 3, 2 (entries 0, 3, 4)
    # |tau2| = 2, 5, .2, 6, 1, .3 -> keep 6, 5, 2 (entries 3, 1, 0)
    # |tau3| = 3, 3.5, .4, 1, 4, .2 -> keep 4, 3.5, 3 (entries 4, 1, 0)
    expected = torch.tensor(
        [
            [4.0, 0.0, 0.0, 3.0, -2.0, 0.0],
            [2.0, 5.0, 0.0, -6.0, 0.0, 0.0],
            [3.0, -3.5, 0.0, 0.0, -4.0, 0.0],
        ]
    )
    torch.testing.assert_close(ties.trim(TAUS, 0.5), expected, rtol=0, atol=0)


def test_ties_elect_and_disjoint_mean_by_hand() -> None:
    trimmed = ties.trim(TAUS, 0.5)
    # entry 0: 4, 2, 3 all agree            -> sum 9 > 0,   mean of all three       = 3
    # entry 1: 0, 5, -3.5 signs conflict    -> sum 1.5 > 0, only 5 agrees           = 5
    # entry 2: everything trimmed           -> sum 0 elects +, nobody agrees        = 0
    # entry 3: 3, -6, 0 signs conflict      -> sum -3 < 0,  only -6 agrees          = -6
    # entry 4: -2, 0, -4                    -> sum -6 < 0,  mean of -2 and -4       = -3
    # entry 5: everything trimmed                                                   = 0
    sign = ties.elect_sign(trimmed)
    torch.testing.assert_close(sign, torch.tensor([1.0, 1.0, 1.0, -1.0, -1.0, 1.0]))
    mean = ties.disjoint_mean(trimmed, sign)
    torch.testing.assert_close(mean, torch.tensor([3.0, 5.0, 0.0, -6.0, -3.0, 0.0]))
    # merged = 1 + 0.5 * mean
    merged = ties.merge(BASE, TAUS, density=0.5, lam=0.5)
    torch.testing.assert_close(merged, torch.tensor([2.5, 3.5, 1.0, -2.0, -0.5, 1.0]))


def test_ties_zero_sum_elects_plus() -> None:
    # 2 and -2 cancel: PEFT's rule (sum >= 0 -> +1) elects +, so only the 2 is averaged
    taus = torch.tensor([[2.0], [-2.0]])
    assert ties.elect_sign(taus).item() == 1.0
    assert ties.merge(torch.zeros(1), taus, density=1.0).item() == 2.0


def test_ties_trim_keeps_exactly_int_density_numel_with_ties_in_magnitude() -> None:
    # all magnitudes equal: int(0.4 * 5) = 2 kept, the first two in flattened order
    row = torch.tensor([[[1.0, -1.0, 1.0, -1.0, 1.0]]])
    torch.testing.assert_close(ties.trim(row, 0.4), torch.tensor([[[1.0, -1.0, 0.0, 0.0, 0.0]]]))
    # int(0.2 * 4) = 0: everything trimmed, as in PEFT
    assert not ties.trim(torch.randn(2, 4), 0.2).any()


SHAPES = [(7,), (16, 12), (3, 4, 5)]


@pytest.mark.filterwarnings("ignore:The density 1.0 is greater")  # PEFT's notice that 1.0 keeps all
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("density", [0.2, 0.5, 1.0])
@pytest.mark.parametrize("lam", [1.0, 0.7])
def test_ties_matches_peft(shape: tuple[int, ...], density: float, lam: float) -> None:
    # PEFT: trim each tensor with topk(int(density * numel)), elect on the unweighted trimmed tensors,
    # multiply by weights, sum the agreeing entries and divide by their count. With every weight equal
    # to lam that is lam * our disjoint mean, i.e. merge(base, ...) - base.
    taus = torch.randn(4, *shape)
    base = torch.randn(shape)
    ours = ties.merge(base, taus, density=density, lam=lam) - base
    theirs = peft_merge.ties(list(taus), torch.full((4,), lam), density, majority_sign_method="total")
    torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize("shape", SHAPES)
def test_task_arithmetic_matches_peft(shape: tuple[int, ...]) -> None:
    taus = torch.randn(3, *shape)
    ours = task_arithmetic.merge(torch.zeros(shape), taus, lam=0.3)
    torch.testing.assert_close(ours, peft_merge.task_arithmetic(list(taus), torch.full((3,), 0.3)))


WEIGHTS = (0.9, 0.35, 1.6, 0.5)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("density", [0.2, 0.5])
def test_ties_with_unequal_weights_matches_peft(shape: tuple[int, ...], density: float) -> None:
    # PEFT's semantics are our default ("paper") weighting: elect on the unweighted trimmed tensors, then
    # sum the weighted agreeing entries and divide by their count. Continuous random values: no ties.
    taus = torch.randn(4, *shape)
    base = torch.randn(shape)
    ours = ties.merge(base, taus, density=density, weight=list(WEIGHTS)) - base
    theirs = peft_merge.ties(list(taus), torch.tensor(WEIGHTS), density, majority_sign_method="total")
    torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize("combine", ["ta", "ties"])
@pytest.mark.parametrize("shape", SHAPES)
def test_dare_with_unequal_weights_matches_peft(combine: str, shape: tuple[int, ...]) -> None:
    taus = torch.randn(4, *shape)
    ours = dare.merge(torch.zeros(shape), taus, combine=combine, seed=99, density=0.3, weight=list(WEIGHTS))
    torch.manual_seed(99)
    reference = peft_merge.dare_linear if combine == "ta" else peft_merge.dare_ties
    torch.testing.assert_close(ours, reference(list(taus), torch.tensor(WEIGHTS), 0.3))


def test_task_arithmetic_with_unequal_weights_matches_peft() -> None:
    taus = torch.randn(4, 33, 7)
    ours = task_arithmetic.merge(torch.zeros(33, 7), taus, weight=list(WEIGHTS))
    torch.testing.assert_close(ours, peft_merge.task_arithmetic(list(taus), torch.tensor(WEIGHTS)))


def test_ties_mergekit_weighting_by_hand() -> None:
    # one position, three models, no trim; weights 2, 1, 1:
    #   tau = (+1, -1.5, -1): paper elects sign(1 - 1.5 - 1) = -1, mean of the weighted agreeing
    #   (-1.5 - 1) / 2 = -1.25; mergekit weights first: 2*1 - 1.5 - 1 = -0.5 -> -1 too, sum -2.5 over the
    #   agreeing weights 1 + 1 = -1.25; with weights 4, 1, 1 mergekit elects +1 (4 - 2.5 > 0): 4 / 4 = 1,
    #   the paper still -1.25 (its election ignores weights); normalize: false gives the sum 4.
    taus = torch.tensor([[1.0], [-1.5], [-1.0]])
    zero = torch.zeros(1)
    assert ties.merge(zero, taus, density=1.0, weight=[2, 1, 1]).item() == -1.25
    assert ties.merge(zero, taus, density=1.0, weight=[2, 1, 1], weighting="mergekit").item() == -1.25
    assert ties.merge(zero, taus, density=1.0, weight=[4, 1, 1]).item() == -1.25
    assert ties.merge(zero, taus, density=1.0, weight=[4, 1, 1], weighting="mergekit").item() == 1.0
    assert ties.merge(zero, taus, density=1.0, weight=[4, 1, 1], weighting="mergekit", normalize=False).item() == 4.0


def test_per_model_density_trims_each_task_vector_to_its_own_count() -> None:
    taus = torch.tensor([[4.0, -3.0, 2.0, 1.0], [1.0, 2.0, -3.0, 4.0]])
    kept = ties.trim(taus, [0.25, 0.75])
    assert kept.tolist() == [[4.0, 0.0, 0.0, 0.0], [0.0, 2.0, -3.0, 4.0]]
    base = torch.zeros(4)
    # the chunked merge equals trim -> elect -> mean with the per-model counts
    assert torch.equal(ties.merge(base, taus, density=[0.25, 0.75]), ties.disjoint_mean(kept, ties.elect_sign(kept)))


@pytest.mark.parametrize("combine", ["ta", "ties"])
@pytest.mark.parametrize("shape", SHAPES)
def test_dare_matches_peft_with_the_same_seed(combine: str, shape: tuple[int, ...]) -> None:
    # PEFT draws one torch.bernoulli mask per task from the GLOBAL RNG; ours draws the same sequence
    # from a private generator with the same seed, so after torch.manual_seed(seed) the masks, and
    # hence the results, are the same (exactly the masks; the arithmetic to float tolerance).
    taus = torch.randn(3, *shape)
    density, lam, seed = 0.4, 0.8, 1234
    ours = dare.merge(torch.zeros(shape), taus, combine=combine, seed=seed, density=density, lam=lam)
    torch.manual_seed(seed)
    reference = peft_merge.dare_linear if combine == "ta" else peft_merge.dare_ties
    theirs = reference(list(taus), torch.full((3,), lam), density)
    torch.testing.assert_close(ours, theirs)


def test_dare_keeping_everything_is_task_arithmetic_or_ties() -> None:
    taus = torch.randn(3, 10, 8)
    base = torch.randn(10, 8)
    assert torch.equal(
        dare.merge(base, taus, combine="ta", density=1.0, lam=0.7), task_arithmetic.merge(base, taus, lam=0.7)
    )
    assert torch.equal(
        dare.merge(base, taus, combine="ties", density=1.0, lam=1.3, trim_density=0.3),
        ties.merge(base, taus, density=0.3, lam=1.3),
    )


def test_dare_mask_statistics() -> None:
    taus = torch.randn(3, 200_000)
    p = 0.7
    dropped = dare.drop_and_rescale(taus, 1 - p, seed=5)
    kept = dropped != 0
    # 600k Bernoulli(0.3) draws: standard error 0.0006
    assert abs(kept.float().mean().item() - (1 - p)) < 0.005
    # each task gets its own mask, each about 30% dense
    for row in kept:
        assert abs(row.float().mean().item() - (1 - p)) < 0.01
    assert not torch.equal(kept[0], kept[1])
    # survivors are exactly tau / (1 - p); the rest are exactly zero
    assert torch.equal(dropped[kept], taus[kept] / (1 - p))
    assert torch.equal(dropped[~kept], torch.zeros(int((~kept).sum())))


def test_dare_seed_determines_the_result() -> None:
    taus = torch.randn(3, 50, 20)
    base = torch.randn(50, 20)
    for combine in ("ta", "ties"):
        first = dare.merge(base, taus, combine=combine, seed=7, density=0.5)
        assert torch.equal(first, dare.merge(base, taus, combine=combine, seed=7, density=0.5))
        assert not torch.equal(first, dare.merge(base, taus, combine=combine, seed=8, density=0.5))


def test_dare_does_not_touch_the_global_rng() -> None:
    base, taus = torch.zeros(30), torch.randn(2, 30)
    state = torch.get_rng_state()
    dare.merge(base, taus, combine="ties", seed=1, density=0.5)
    assert torch.equal(torch.get_rng_state(), state)


def test_dare_ta_is_task_arithmetic_in_expectation() -> None:
    # Rescaling by 1 / (1 - p) makes E[dare(tau)] = tau. With p = 0.5 each entry of the sum of three
    # dropped vectors has variance sum tau^2 (about 3 for N(0, 1) entries); over 3000 seeds the mean's
    # standard error is about 0.03, so 0.2 is more than 6 of them. Without the rescale the mean would
    # be half of TA, off by about 0.8 on a typical entry.
    taus = torch.randn(3, 40)
    base = torch.zeros(40)
    mean = sum(dare.merge(base, taus, combine="ta", seed=s, density=0.5) for s in range(3000)) / 3000
    torch.testing.assert_close(mean, task_arithmetic.merge(base, taus), rtol=0, atol=0.2)


OPS = {
    "average": average.merge,
    "task_arithmetic": task_arithmetic.merge,
    "ties": ties.merge,
    "dare_ta": lambda b, d, **kw: dare.merge(b, d, combine="ta", **kw),
    "dare_ties": lambda b, d, **kw: dare.merge(b, d, combine="ties", **kw),
    "tsv": tsv.merge,
    "iso_c": iso.merge_iso_c,
    "iso_cts": iso.merge_iso_cts,
    "wudi": wudi.merge,
}
MATRIX_METHODS = {"tsv", "iso_c", "iso_cts", "wudi"}
"""Their temporaries depend on the matrix shape: test_methods_spectral.py measures them on matrices."""


@pytest.mark.parametrize("name", OPS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_shapes_and_dtypes(name: str, shape: tuple[int, ...], dtype: torch.dtype) -> None:
    base = torch.randn(shape).to(dtype)
    taus = torch.randn(3, *shape)
    merged = OPS[name](base, taus, seed=0)
    assert merged.shape == shape
    assert merged.dtype == torch.float32
    # with zero task vectors every method returns the base, upcast
    assert torch.equal(OPS[name](base, torch.zeros(3, *shape), seed=0), base.float())


@pytest.mark.parametrize(
    ("op", "params"),
    [
        (ties.merge, {"density": 0.0}),
        (ties.merge, {"density": 1.5}),
        (ties.merge, {"density": math.nan}),
        (ties.merge, {"lam": math.inf}),
        (task_arithmetic.merge, {"lam": math.nan}),
        (task_arithmetic.merge, {"lam": "0.3"}),
        (dare.merge, {"combine": "ta", "density": 0.0}),
        (dare.merge, {"combine": "ta", "density": 1.1}),
        (dare.merge, {"combine": "ta", "trim_density": 0.5}),
        (dare.merge, {"combine": "ties", "trim_density": 0.0}),
        (ties.merge, {"weight": [1.0]}),  # one weight for two models
        (ties.merge, {"weight": [1.0, math.nan]}),
        (ties.merge, {"weighting": "fusionbench"}),
        (ties.merge, {"normalize": False}),  # mergekit's option, not the paper's
        (ties.merge, {"density": [0.5, 0.5, 0.5]}),
        (dare.merge, {"combine": "mean"}),
        (dare.merge, {"combine": "ties", "lam": math.inf}),
    ],
)
def test_bad_params_raise_config_error(op, params: dict) -> None:
    with pytest.raises(ConfigError):
        op(torch.zeros(4), torch.randn(2, 4), **params)


@pytest.mark.parametrize("name", OPS)
def test_misstacked_deltas_raise(name: str) -> None:
    base = torch.zeros(4, 3)
    bad = (torch.zeros(2, 1, 3), torch.zeros(4, 3), torch.zeros(0, 4, 3), torch.zeros(2, 4, 3).half())
    for deltas in bad:
        with pytest.raises(TaskVectorError):
            OPS[name](base, deltas)


def test_registry_grids_are_small_and_valid() -> None:
    from supermerge.merge_core.methods.registry import METHODS

    per_tensor = [s for s in METHODS.values() if s.kind == "per_tensor"]
    assert {s.name for s in per_tensor} == set(OPS)
    for spec in per_tensor:
        combos = list(itertools.product(*spec.grid.values()))
        assert len(combos) <= 10, spec.name
        for values in combos:
            merged = spec.op(torch.zeros(5), torch.randn(3, 5), seed=0, **dict(zip(spec.grid, values)))
            assert merged.shape == (5,)


@pytest.mark.parametrize("numel", [4096, 1 << 17, 1 << 20])
@pytest.mark.parametrize("k", [2, 8])
@pytest.mark.parametrize("name", [n for n, s in METHODS.items() if s.kind == "per_tensor" and n not in MATRIX_METHODS])
def test_declared_temporaries_cover_what_the_op_allocates(name: str, k: int, numel: int) -> None:
    """The memory planner predicts per-tensor merges from ``MethodSpec.temporaries``; an op that came
    to allocate more than declared would make those predictions low, so it fails here (and one
    declared far above what it allocates would waste the budget)."""
    from torch.profiler import ProfilerActivity, profile

    spec = METHODS[name]
    base, deltas = torch.randn(numel), torch.randn(k, numel)
    params = {p: values[0] for p, values in spec.grid.items()}
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = spec.op(base, deltas, seed=0, **params)
        del out
    live = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    declared = 4 * spec.temporaries.values(k, numel)
    assert 0.6 * declared <= peak <= declared + 4096, (name, k, numel, peak / (4 * numel))  # + scalars


@pytest.mark.parametrize(("shape", "density", "k"), [((300, 300), 0.2, 5), ((1000,), 0.5, 4), ((64, 33), 1.0, 3)])
def test_ties_in_chunks_is_trim_elect_and_mean_bit_for_bit(monkeypatch, shape, density, k) -> None:
    """The merge works a few columns at a time (memory: about one tensor, not several k-stacks), yet
    equals the three steps done on the whole stack, ties at the threshold included, to the last bit."""
    g = torch.Generator().manual_seed(7)
    deltas, base = torch.randn(k, *shape, generator=g), torch.randn(shape, generator=g)
    deltas[0].view(-1)[:4] = 0.5
    deltas[1].view(-1)[:6] = -0.5  # magnitudes tied at a likely threshold
    trimmed = ties.trim(deltas, density)
    whole = base + 1.3 * ties.disjoint_mean(trimmed, ties.elect_sign(trimmed))
    for chunk in (7, 1000):
        monkeypatch.setattr(ties, "CHUNK_POSITIONS", chunk)
        assert torch.equal(ties.merge(base, deltas, density=density, lam=1.3), whole), chunk
