"""The one list of merge methods, by name. A variant is a configured instance, not a subclass."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from torch import Tensor

from merge_core.errors import ConfigError
from merge_core.methods import adamerging, average, dare, iso, supermerge, task_arithmetic, ties, tsv, wudi
from merge_core.methods.learned import LearnedMergeConfig

MergeOp = Callable[..., Tensor]
"""``op(base, deltas, *, seed, **params) -> merged``: base (shape S), deltas (k, *S) fp32 -> fp32 S."""


@dataclass(frozen=True)
class Temporaries:
    """What a per-tensor op allocates beyond its inputs while it merges one tensor of ``numel`` values
    from k task vectors, in fp32 values (its result included): ``per_model * k * numel + constant *
    numel + chunked_per_model * k * min(numel, ties.CHUNK_POSITIONS)`` (TIES works that many columns
    at a time). Measured with torch's profiler at k = 2..16 and 4 K..1 M values; the declared values
    bound the measured ones from above by at most 40 % (tests/merge_core/test_methods_per_tensor.py)."""

    per_model: float = 0.0
    constant: float = 0.0
    chunked_per_model: float = 0.0

    def values(self, k: int, numel: int) -> int:
        return int(self.per_model * k * numel + self.constant * numel
                   + self.chunked_per_model * k * min(numel, ties.CHUNK_POSITIONS))


@dataclass(frozen=True)
class MethodSpec:
    name: str
    paper: str
    kind: Literal["per_tensor", "learned"]
    summary: str
    op: MergeOp | None = None
    grid: Mapping[str, tuple[float, ...]] = field(default_factory=dict)
    """Hyperparameters searched on validation data unless the user fixes them."""
    learned: LearnedMergeConfig | None = None
    scale: str | None = None
    """A parameter the result is affine in: ``op(base, d, scale=s) == base + s * op(0, d, scale=1)``
    exactly (same fp32 arithmetic). A grid search then computes the expensive part (trim, sign
    election, DARE masks) once per value of the other parameters, not once per grid point."""
    temporaries: Temporaries = field(default_factory=lambda: Temporaries())
    """What ``op`` allocates beyond its inputs; the memory planner predicts per-tensor merges with it."""


METHODS: dict[str, MethodSpec] = {
    spec.name: spec
    for spec in (
        MethodSpec("average", average.PAPER, "per_tensor", "plain weight averaging", average.merge,
                   temporaries=Temporaries(constant=2)),
        MethodSpec(
            "task_arithmetic", task_arithmetic.PAPER, "per_tensor",
            "base + lam * sum of task vectors; lam by grid search",
            task_arithmetic.merge, task_arithmetic.PARAM_GRID, scale="lam", temporaries=Temporaries(constant=2),
        ),
        MethodSpec(
            "ties", ties.PAPER, "per_tensor",
            "trim to top-density magnitudes, elect sign, disjoint mean (per tensor)",
            ties.merge, ties.PARAM_GRID, scale="lam", temporaries=Temporaries(constant=3, chunked_per_model=4.25),
        ),
        MethodSpec(
            "dare_ta", dare.PAPER, "per_tensor",
            "random drop p, rescale 1/(1-p), then task arithmetic",
            functools.partial(dare.merge, combine="ta"), dare.PARAM_GRID, scale="lam",
            temporaries=Temporaries(per_model=1, constant=3),
        ),
        MethodSpec(
            "dare_ties", dare.PAPER, "per_tensor",
            "random drop p, rescale 1/(1-p), then TIES sign election and disjoint mean",
            functools.partial(dare.merge, combine="ties"), dare.PARAM_GRID, scale="lam",
            temporaries=Temporaries(per_model=1, constant=3, chunked_per_model=2.25),
        ),
        # Matrix methods: Temporaries measured on square matrices, their worst case (tests/merge_core/
        # test_methods_spectral.py); tall ones (embeddings) need less. WUDI on a wide (out, in) matrix
        # holds 2 * min(in, k * out)^2 values more (its Gram matrix and Cholesky factor).
        MethodSpec(
            "tsv", tsv.PAPER, "per_tensor",
            "TSV-M: each task's top 1/k singular vectors, decorrelated (orthogonalised), alpha-scaled",
            tsv.merge, tsv.PARAM_GRID, scale="alpha", temporaries=Temporaries(constant=6.1),
        ),
        MethodSpec(
            "iso_c", iso.PAPER, "per_tensor",
            "Iso-C: SVD of the task-vector sum with every singular value set to their mean",
            iso.merge_iso_c, iso.ISO_C_GRID, scale="alpha", temporaries=Temporaries(constant=4.1),
        ),
        MethodSpec(
            "iso_cts", iso.PAPER, "per_tensor",
            "Iso-CTS: common subspace of the sum + each task's own directions, isotropic spectrum",
            iso.merge_iso_cts, iso.ISO_CTS_GRID, scale="alpha", temporaries=Temporaries(constant=6.1),
        ),
        MethodSpec(
            "wudi", wudi.PAPER, "per_tensor",
            "WUDI: per matrix, the minimiser of each task's interference on its own input subspace",
            wudi.merge, wudi.PARAM_GRID, scale="alpha", temporaries=Temporaries(constant=5.1),
        ),
        MethodSpec(
            "adamerging", adamerging.PAPER, "learned",
            "layer-wise weights in [0, 1] trained on prediction entropy (unlabelled)",
            learned=adamerging.ADAMERGING,
        ),
        MethodSpec(
            "supermerge", supermerge.PAPER, "learned",
            "per-tensor tanh weights trained on labelled validation data",
            learned=supermerge.SUPERMERGE,
        ),
        MethodSpec(
            "supermerge_no_tanh", supermerge.PAPER, "learned",
            "SuperMerge without the tanh bound (the paper's ablation)",
            learned=supermerge.SUPERMERGE_NO_TANH,
        ),
    )
}


def get_method(name: str) -> MethodSpec:
    try:
        return METHODS[name]
    except KeyError:
        raise ConfigError(
            f"unknown merge method {name!r}; choose one of: {', '.join(METHODS)}"
        ) from None
