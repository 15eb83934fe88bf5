"""The one list of merge methods, by name. A variant is a configured instance, not a subclass."""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from torch import Tensor

from supermerge.merge_core.errors import ConfigError
from supermerge.merge_core.methods import adamerging, average, dare, iso, supermerge, task_arithmetic, ties, tsv, wudi
from supermerge.merge_core.methods.learned import LearnedMergeConfig

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
    """The values searched on validation data when the config asks for a search (``search: true``);
    otherwise a parameter left out takes the default of ``op``'s signature (``parameter_defaults``)."""
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
            "base + lambda * sum of (weighted) task vectors",
            task_arithmetic.merge, task_arithmetic.PARAM_GRID, scale="lam", temporaries=Temporaries(constant=2),
        ),
        MethodSpec(
            "ties", ties.PAPER, "per_tensor",
            "trim to top-density magnitudes, elect sign, disjoint mean (per tensor)",
            ties.merge, ties.PARAM_GRID, scale="lam", temporaries=Temporaries(constant=3, chunked_per_model=4.25),
        ),
        MethodSpec(
            "dare_ta", dare.PAPER, "per_tensor",
            "keep each entry with probability density, rescale 1/density, then task arithmetic",
            functools.partial(dare.merge, combine="ta"), dare.PARAM_GRID, scale="lam",
            temporaries=Temporaries(per_model=1, constant=3),
        ),
        MethodSpec(
            "dare_ties", dare.PAPER, "per_tensor",
            "keep each entry with probability density, rescale 1/density, then TIES sign election and disjoint mean",
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
            "supermerge_tsv", supermerge.PAPER, "learned",
            "SuperMerge's tanh weights over the TSV-M decorrelated per-task pieces",
            learned=supermerge.SUPERMERGE_TSV,
        ),
        MethodSpec(
            "supermerge_tsv_init", supermerge.PAPER, "learned",
            "SuperMerge over the TSV-M pieces, started at TSV-M with alpha chosen on validation",
            learned=supermerge.SUPERMERGE_TSV_INIT,
        ),
        MethodSpec(
            "supermerge_iso_cts_init", supermerge.PAPER, "learned",
            "SuperMerge over the Iso-CTS pieces, started at Iso-CTS with alpha chosen on validation",
            learned=supermerge.SUPERMERGE_ISO_CTS_INIT,
        ),
        MethodSpec(
            "supermerge_compressed", supermerge.PAPER, "learned",
            "SuperMerge's tanh weights over task vectors compressed to their top singular components",
            learned=supermerge.SUPERMERGE_COMPRESSED,
        ),
        MethodSpec(
            "supermerge_ta_init", supermerge.PAPER, "learned",
            "SuperMerge started at Task Arithmetic with lam chosen on validation",
            learned=supermerge.SUPERMERGE_TA_INIT,
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


SEARCH = "search"
"""``parameters: {search: true}``: search every grid parameter the config leaves out over its grid."""
PER_MODEL = ("weight", "density")
"""Parameters a config may give per model (``models[i].weight``); the op receives one value per input."""
SCALE_NAME = "lambda"
"""What a config calls any method's scale (mergekit's name); the scale's own name is an alias."""
_OP_ARGUMENTS = ("base", "deltas", "seed", "combine")


def parameter_defaults(spec: MethodSpec) -> dict[str, Any]:
    """Every parameter of a per-tensor method with the value it takes when the config leaves it out:
    the defaults of ``op``'s signature (documented there), whatever the parameters are named; for a
    learned method, LearnedMergeConfig's fields."""
    if spec.learned is not None:
        return {f.name: getattr(spec.learned, f.name) for f in dataclasses.fields(spec.learned)}
    assert spec.op is not None
    return {
        name: p.default for name, p in inspect.signature(spec.op).parameters.items()
        if name not in _OP_ARGUMENTS and p.kind is inspect.Parameter.KEYWORD_ONLY
        and p.default is not inspect.Parameter.empty
    }


def unknown_parameters(spec: MethodSpec, names: Sequence[str]) -> str | None:
    """The problem with parameter ``names`` the method does not take (a config's ``lambda`` or
    ``search`` included), or None. Checked before anything else, so a misspelt name is the first error."""
    known = set(parameter_defaults(spec))
    if spec.kind == "per_tensor":
        known.add(SEARCH)
        if spec.scale is not None:
            known.add(SCALE_NAME)
    unknown = sorted(set(names) - known)
    if not unknown:
        return None
    hint = ""
    if "p" in unknown and "density" in known and spec.name.startswith("dare"):
        hint = ("; DARE's drop rate is given as density, the fraction of entries kept (mergekit's and "
                "PEFT's name): density = 1 - p")
    takes = sorted(known - {SEARCH}) + ([f"{SEARCH} (true: search the grid)"] if SEARCH in known else [])
    return f"method {spec.name!r} has no parameter(s) {unknown}; it takes {takes or 'none'}{hint}"


def canonical_parameters(spec: MethodSpec, params: Mapping[str, Any]) -> dict[str, Any]:
    """``params`` with ``lambda`` renamed to the method's scale (``lam``, ``alpha``, ...); unknown names
    and a scale given under both names are refused (ConfigError)."""
    problem = unknown_parameters(spec, list(params))
    if problem:
        raise ConfigError(problem)
    out = dict(params)
    if SCALE_NAME in out and spec.scale is not None and spec.scale != SCALE_NAME:
        if spec.scale in out:
            raise ConfigError(
                f"method {spec.name!r}: {SCALE_NAME!r} and {spec.scale!r} name the same scale; give one of them"
            )
        out[spec.scale] = out.pop(SCALE_NAME)
    return out


def op_arguments(candidate: Mapping[str, Any], inputs: Sequence[str]) -> dict[str, Any]:
    """One candidate's parameters as ``op`` takes them: a per-model mapping (input name -> value, the
    form a config's ``models[i].weight`` takes) becomes the sequence of values in ``inputs``' order; an
    input it does not name is an error (in a tree, a merged input has no weight of its own)."""
    out = dict(candidate)
    for name in PER_MODEL:
        values = out.get(name)
        if isinstance(values, Mapping):
            missing = [i for i in inputs if i not in values]
            if missing:
                raise ConfigError(
                    f"{name} is given per model, but not for input(s) {missing}; give every model one (per-model "
                    "values apply to a flat merge of the models themselves)"
                )
            out[name] = tuple(values[i] for i in inputs)
    return out
