"""mergekit's YAML config, read as ours: ``supermerge merge mergekit.yml --output DIR`` runs it.

A mergekit config (``merge_method``, ``base_model``, ``models: [{model, parameters}]``, ``parameters``,
``dtype``, ``out_dtype``) becomes our config for the methods both tools have, with mergekit's
semantics made explicit: ``weighting: mergekit`` for TIES and DARE-TIES, mergekit's ``normalize``
default per method, and mergekit's defaults for what the config leaves out (``density`` 1, every
``weight`` 1, ``lambda`` 1), so the merge is the one mergekit would run. Where the semantics are the
same the bytes are too (Task Arithmetic; TIES on tensors without magnitude ties at the trim
threshold; both with ``dtype: float32``, the precision we always compute in):
tests/merge_core/test_mergekit.py and ``bench/mergekit_bench.py`` check it against mergekit 0.1.5.

Paths are used as mergekit uses them: relative to the working directory, not to the config file.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from supermerge.merge_core.errors import ConfigError

METHODS: dict[str, str] = {
    "task_arithmetic": "task_arithmetic",
    "ties": "ties",
    "dare_ties": "dare_ties",
    "dare_linear": "dare_ta",
    "linear": "task_arithmetic",
}
"""mergekit's merge_method -> ours. ``linear`` (sum_i w_i theta_i / sum_i w_i) is Task Arithmetic with
the weights normalised: base + sum_i w_i tau_i / sum_i w_i is the same model."""
NORMALIZE_DEFAULT = {"task_arithmetic": False, "ties": True, "dare_ties": False, "dare_linear": False, "linear": True}
"""mergekit 0.1.5's ``normalize`` default per method (merge_methods/registry.py, linear.py)."""
SHARED = {"lambda", "normalize", "weight", "density", "int8_mask", "rescale"}
PER_MODEL = {"weight", "density"}


def is_mergekit_config(raw: Any) -> bool:
    return isinstance(raw, dict) and "merge_method" in raw


def _scalar(value: Any, where: str, problems: list[str]) -> Any:
    if isinstance(value, (list, dict)):
        problems.append(f"{where}: a per-tensor value ({type(value).__name__}: mergekit's gradients or filters) "
                        "is not supported; give one number")
    return value


def _name(path: str, taken: set[str]) -> str:
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(path.rstrip("/")).name).lstrip("._-") or "model"
    name, i = stem, 2
    while name in taken:
        name, i = f"{stem}_{i}", i + 1
    taken.add(name)
    return name


def from_mergekit(raw: dict[str, Any], source: str = "config") -> dict[str, Any]:
    """Our config (a mapping, not yet validated) for mergekit config ``raw``; one ConfigError listing
    every part of it we cannot run as mergekit would."""
    problems: list[str] = []
    method = raw.get("merge_method")
    if method not in METHODS:
        problems.append(f"merge_method: {method!r} is not one supermerge runs; it runs {sorted(METHODS)}")
    unsupported = sorted(set(raw) - {"merge_method", "base_model", "models", "parameters", "dtype", "out_dtype",
                                     "output", "tokenizer_source", "name"})
    if unsupported:
        problems.append(f"{unsupported}: not supported (slices, layer ranges and the like have no supermerge "
                        "equivalent); remove them")
    if raw.get("tokenizer_source") not in (None, "base"):
        problems.append("tokenizer_source: only the base's tokenizer is copied (tokenizer_source: base)")
    base = raw.get("base_model")
    if not isinstance(base, str):
        problems.append("base_model: supermerge merges task vectors against a base model; name it (a local dir)")
    shared = dict(raw.get("parameters") or {})
    for key in sorted(set(shared) - SHARED):
        problems.append(f"parameters.{key}: not a parameter of mergekit's {method} that supermerge runs")
    for key, value in shared.items():
        _scalar(value, f"parameters.{key}", problems)
    if shared.get("rescale") is False and str(method).startswith("dare"):
        problems.append("parameters.rescale: false (DARE without rescaling) is not supported")
    models, taken = [], set()
    for i, entry in enumerate(raw.get("models") or []):
        if not isinstance(entry, dict) or not isinstance(entry.get("model"), str):
            problems.append(f"models[{i}]: expected {{model: PATH, parameters: {{weight: ..., density: ...}}}}")
            continue
        if entry["model"] == base:
            continue  # mergekit lets the base be listed among the models; it has no task vector
        params = dict(entry.get("parameters") or {})
        for key in sorted(set(params) - PER_MODEL):
            problems.append(f"models[{i}].parameters.{key}: only weight and density are per-model in supermerge")
        model = {"name": _name(entry["model"], taken), "path": entry["model"]}
        for key in ("weight", "density"):
            value = params.get(key, shared.get(key))
            if value is not None:
                model[key] = _scalar(value, f"models[{i}].parameters.{key}", problems)
        if "weight" not in model:
            model["weight"] = 1.0
        models.append(model)
    if problems:
        raise ConfigError(f"{source} (a mergekit config) has {len(problems)} problem(s):\n"
                          + "\n".join(f"  - {p}" for p in problems))
    ours = METHODS[method]
    parameters: dict[str, Any] = {"lambda": float(shared.get("lambda", 1.0))}
    normalize = bool(shared.get("normalize", NORMALIZE_DEFAULT[method]))
    if method == "linear":
        if not normalize:
            problems.append("linear with normalize: false sums whole models; supermerge merges task vectors")
        parameters["normalize"] = True
    elif method in ("ties", "dare_ties"):
        parameters.update(weighting="mergekit", normalize=normalize)
    else:
        parameters["normalize"] = normalize
    if method in ("ties", "dare_ties", "dare_linear"):
        for m in models:
            m.setdefault("density", 1.0)  # mergekit's default: keep everything
    if problems:
        raise ConfigError(f"{source} (a mergekit config): {problems[0]}")
    config: dict[str, Any] = {"base": base, "method": ours, "parameters": parameters, "models": models,
                              "tree": {"flat": True}}
    for key in ("dtype", "out_dtype", "output"):
        if raw.get(key) is not None:
            config[key] = raw[key]
    return config
