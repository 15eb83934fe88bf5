"""Method parameters checked before any work: each of the type its method applies it as, and finite
in the dtype it is applied in.

A learned merge's parameters are fields of ``LearnedMergeConfig`` (``steps: int``, ``lr: float``,
``transform: Literal[...]`` ...); a per-tensor method's are numbers its operator multiplies fp32
tensors by, one value or a list searched on validation data. ``lam: 1e39`` is a finite float64 but
infinite in fp32, where it is applied, and would publish an all-Inf model: it is refused here. A
parameter whose defaults are strings (wudi's ``solver``) must be a string; its choices are the method's.
Unknown names are left to the method (``supermerge.merge_core.merge``), which lists the ones it takes.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Mapping
from typing import Any

import torch

FP32_MAX = float(torch.finfo(torch.float32).max)


def _number_problem(value: Any, integer: bool) -> str | None:
    """Why ``value`` is not a finite fp32 number (an int when ``integer``), or None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"must be {'an integer' if integer else 'a number'}, got {value!r}"
    if integer and not isinstance(value, int):
        return f"must be an integer, got {value!r}"
    if not math.isfinite(value) or abs(value) > FP32_MAX:
        return (f"must be finite in float32 (|x| <= {FP32_MAX:.3g}), where it is applied; got {value!r}")
    return None


def _learned_field_problem(name: str, value: Any, hint: Any) -> str | None:
    origin = typing.get_origin(hint)
    if hint is int:
        return _number_problem(value, integer=True)
    if hint is float:
        return _number_problem(value, integer=False)
    if origin is typing.Literal:
        choices = typing.get_args(hint)
        return None if value in choices else f"must be one of {', '.join(map(str, choices))}, got {value!r}"
    if hint is str:
        return None if isinstance(value, str) else f"must be a string, got {value!r}"
    return None


def parameter_problems(method: str, params: Mapping[str, Any]) -> list[str]:
    """One line per parameter of ``method`` that has the wrong type or is not finite in fp32, each
    naming ``parameters.<name>``; empty when they are all fine (or the method is unknown)."""
    from supermerge.merge_core.methods.learned import LearnedMergeConfig
    from supermerge.merge_core.methods.registry import METHODS

    spec = METHODS.get(method)
    if spec is None:
        return []
    problems = []
    if spec.kind == "learned":
        hints = typing.get_type_hints(LearnedMergeConfig)
        fields = {f.name for f in dataclasses.fields(LearnedMergeConfig)}
        for name, value in params.items():
            if name not in fields:
                continue
            why = _learned_field_problem(name, value, hints[name])
            if why is not None and isinstance(value, list):
                why = f"takes one value ({spec.name} trains its merge weights; it searches no grid), got {value!r}"
            if why is not None:
                problems.append(f"parameters.{name} {why}")
        return problems
    for name, value in params.items():
        if name not in spec.grid:
            continue
        values = value if isinstance(value, (list, tuple)) else [value]
        if not values:
            problems.append(f"parameters.{name} is an empty list; give a number or a non-empty list to search")
            continue
        textual = all(isinstance(d, str) for d in spec.grid[name])  # e.g. wudi's solver
        for v in values:
            why = (None if isinstance(v, str) else f"must be a string, got {v!r}") if textual else \
                _number_problem(v, integer=False)
            if why is not None:
                at = f"[{values.index(v)}]" if isinstance(value, (list, tuple)) else ""
                problems.append(f"parameters.{name}{at} {why}")
                break
    return problems
