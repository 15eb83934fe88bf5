"""The user-facing merge config (YAML, in the spirit of mergekit's), validated once.

Every problem is reported in one ConfigError (pydantic's field errors plus missing files), before any
weights are read. The resolved config is saved beside the output so a merge can be reproduced.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from supermerge.merge_core.errors import ConfigError
from supermerge.merge_core.max_length import MaxLength, resolve_max_length
from supermerge.merge_core.mergekit import from_mergekit, is_mergekit_config
from supermerge.merge_core.safe_yaml import load_yaml
from supermerge.merge_core.task_registry import with_registry_models
from supermerge.merge_core.task_vectors import DEFAULT_HEAD_PREFIXES

DEFAULT_METHOD = "supermerge"
"""The method of a config that names none."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelEntry(_Strict):
    """One fine-tuned task model: a full fine-tune (file or HF dir) or a PEFT adapter dir."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    path: Path
    validation: Path | None = None
    """Labelled validation data (.jsonl text+label, or .safetensors tensors); 32 examples a task."""
    test: Path | None = None
    """Held-out test data for `supermerge evaluate` and the report."""
    weight: float | None = None
    """This model's weight in a per-tensor merge (mergekit's ``weight``; default 1)."""
    density: float | None = Field(default=None, gt=0, le=1)
    """This model's own density (TIES: fraction kept by magnitude; DARE: fraction kept at random),
    instead of the shared ``parameters.density``."""


class TreeConfig(_Strict):
    """How the orchestrator arranges merges (hierarchical SuperMerge)."""

    max_fan_in: int | None = Field(default=None, ge=2)
    """Most children per merge node; None lets the memory planner choose."""
    groups: list[Any] | None = None
    """A tree given by hand: nested lists of model names."""
    shape: Literal["balanced", "dendrogram"] = "balanced"
    """How a clustered tree is shaped: ``balanced`` has depth ceil(log_f k) for k models at fan-in f,
    similarity choosing which models share a merge; ``dendrogram`` opens the similarity dendrogram
    (similar models merge first, but clustered models give chains of depth up to k - 1). See
    supermerge.orchestrator.tree."""
    flat: bool = False
    flat_compressed: bool = True
    """When a dense flat merge does not fit the budget, the planner may choose a flat merge over
    compressed task vectors (each matrix kept as its top singular components, supermerge.merge_core.compress)
    before a tree; false: a tree instead. Applies to learned merges over the raw task vectors."""
    memory_budget: str | None = None
    """e.g. '8GB', or a number of bytes; default: a safe fraction of what is free."""

    @field_validator("memory_budget", mode="before")
    @classmethod
    def _bytes_as_text(cls, value: Any) -> Any:
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


class MergeConfig(_Strict):
    base: Path
    output: Path
    method: str = DEFAULT_METHOD
    parameters: dict[str, Any] = Field(default_factory=dict)
    """Method hyperparameters; a list searches those values on the validation data."""
    models: list[ModelEntry]
    kind: Literal["classification", "causal_lm"] = "classification"
    seed: int = 0
    device: str = "auto"
    max_length: int | None = Field(default=None, ge=2)
    """Tokens per example for merge training and scoring. Left out: the training length the fine-tunes
    record, else 64 (``supermerge.merge_core.max_length``); an int once the config is validated."""
    dtype: Literal["float32", "bfloat16", "float16"] | None = None
    """mergekit's ``dtype``: the dtype merged tensors are written in when ``out_dtype`` is not given
    (the math is float32 whatever it says); default: each tensor's dtype in the base."""
    out_dtype: Literal["float32", "bfloat16", "float16"] | None = None
    """The dtype merged tensors are written in; overrides ``dtype``."""
    head_prefixes: list[str] = Field(default_factory=lambda: list(DEFAULT_HEAD_PREFIXES))
    tree: TreeConfig = Field(default_factory=TreeConfig)
    retry: RetryPolicy = Field(default_factory=lambda: RetryPolicy())
    store: str | None = None
    """Where the checkpoint store of intermediate nodes is: a folder (relative to the config file) or
    ``s3://bucket/prefix`` for workers on several machines (needs ``supermerge[distributed]``); left
    out: ``.supermerge-store`` beside the output."""
    registry: Path | None = None
    """A task-model registry folder (see supermerge.merge_core.task_registry); its models are appended to ``models``."""
    _max_length_from: str = PrivateAttr(default="config")

    @field_validator("store")
    @classmethod
    def _store_is_a_folder_or_s3(cls, store: str | None) -> str | None:
        if store is not None and "://" in store and (not store.startswith("s3://") or not store[5:].strip("/")):
            raise ValueError(f"{store!r} is not a folder or an s3://bucket/prefix URL (the only object store "
                             "with the conditional writes the store locks with)")
        return store

    @field_validator("models")
    @classmethod
    def _unique_and_enough(cls, models: list[ModelEntry]) -> list[ModelEntry]:
        names = [m.name for m in models]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"model names must be unique; repeated: {dupes}")
        if len(models) < 2:
            raise ValueError(
                f"at least 2 models are needed to merge, got {len(models)}; with one there is "
                "nothing to merge"
            )
        return models

    @model_validator(mode="after")
    def _method_known(self) -> MergeConfig:
        from supermerge.merge_core.methods.registry import METHODS

        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of: {', '.join(METHODS)}")
        return self

    @model_validator(mode="after")
    def _output_apart_from_inputs(self) -> MergeConfig:
        """The output (and, with --overwrite, what it replaces) never holds an input: an output inside
        an input's folder would write into it, an input inside the output would be deleted with it."""
        output = self.output.resolve()
        inputs = {"base": self.base, "registry": self.registry}
        for m in self.models:
            inputs.update({f"models[{m.name}].{what}": getattr(m, what) for what in ("path", "validation", "test")})
        clashes = []
        for what, p in inputs.items():
            if p is None or path_problem(p) is not None:
                continue  # reported by missing_files
            folder = p.resolve()
            if folder.is_file() and (folder.parent / "config.json").is_file():
                folder = folder.parent  # a model's weights file: its model dir is the input
            if output.is_relative_to(folder) or folder.is_relative_to(output):
                clashes.append(f"{what} {p}")
        if clashes:
            raise ValueError(
                f"output {self.output} overlaps the input(s) {', '.join(clashes)}; writing it would change or "
                "delete them: choose an output outside every input folder"
            )
        return self

    @model_validator(mode="after")
    def _per_model_values_fit_the_method(self) -> MergeConfig:
        from supermerge.merge_core.methods.registry import METHODS

        given = [w for w in ("weight", "density") if any(getattr(m, w) is not None for m in self.models)]
        if given and METHODS[self.method].kind == "learned":
            raise ValueError(
                f"models[].{'/'.join(given)}: {self.method} learns each model's weights on the validation "
                "data, so per-model weight and density do not apply; leave them out or choose a per-tensor "
                "method (task_arithmetic, ties, dare_ta, dare_ties)"
            )
        if "density" in given and isinstance(self.parameters.get("density"), list):
            raise ValueError("models[].density and a searched parameters.density (a list) both given; choose one")
        from supermerge.merge_core.methods.registry import unknown_parameters

        if unknown_parameters(METHODS[self.method], list(self.parameters)) is None:  # else reported first
            try:
                self.method_parameters()
            except ConfigError as e:
                raise ValueError(str(e)) from None
        return self

    @model_validator(mode="after")
    def _max_length_resolved(self) -> MergeConfig:
        """``max_length`` as an int: set, or read from the fine-tunes (their paths that cannot be read are
        left to ``missing_files``), with where it came from kept for ``supermerge plan``."""
        readable = {m.name: m.path for m in self.models if path_problem(m.path) is None}
        try:
            resolved = resolve_max_length(self.max_length, readable)
        except ConfigError as e:
            raise ValueError(str(e)) from None
        config = self if self.max_length is not None else self.model_copy(update={"max_length": resolved.tokens})
        config._max_length_from = resolved.source
        return config

    @property
    def max_length_resolved(self) -> MaxLength:
        """``max_length`` and where it came from: the config, the fine-tunes' record, or the default."""
        return MaxLength(self.max_length, self._max_length_from)  # type: ignore[arg-type]  # an int once validated

    @property
    def write_dtype(self) -> str | None:
        """The dtype merged tensors are written in (``out_dtype``, else ``dtype``); None: the base's."""
        return self.out_dtype or self.dtype

    def method_parameters(self) -> dict[str, Any]:
        """``parameters`` as the method runs them: the scale under its own name (``lambda`` -> ``lam``),
        and per-model ``weight`` / ``density`` as name -> value maps (a model without its own density
        takes the shared one, else the method's default). The store's keys are made from this."""
        from supermerge.merge_core.methods.registry import canonical_parameters, get_method, parameter_defaults

        spec = get_method(self.method)
        params = canonical_parameters(spec, self.parameters)
        if any(m.weight is not None for m in self.models):
            params["weight"] = {m.name: 1.0 if m.weight is None else m.weight for m in self.models}
        if any(m.density is not None for m in self.models):
            shared = params.get("density", parameter_defaults(spec).get("density"))
            params["density"] = {m.name: shared if m.density is None else m.density for m in self.models}
        return params

    def missing_files(self) -> list[str]:
        problems = []
        why = path_problem(self.base)
        if why is not None:
            problems.append(f"base: {self.base} {why}")
        for m in self.models:
            for what in ("path", "validation", "test"):
                p = getattr(m, what)
                why = path_problem(p) if p is not None else None
                if why is not None:
                    problems.append(f"models[{m.name}].{what}: {p} {why}")
        return problems

    def resolved(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def path_problem(p: Path) -> str | None:
    """Why an input path cannot be read (it does not exist, is a symlink loop, ...), or None."""
    try:
        os.stat(p)
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "is a symbolic link loop (it leads back to itself); point to the model or file itself"
        if e.errno == errno.ENOTDIR:
            return "does not exist (a folder on its path is a file)"
        if e.errno == errno.ENOENT:
            return "does not exist"
        return f"cannot be read ({e.strerror})"
    return None


def _resolve_paths(raw: dict[str, Any], root: Path) -> dict[str, Any]:
    """Relative paths in a config file are relative to that file, so configs travel with data."""

    def fix(value: Any) -> Any:
        if isinstance(value, str) and value and not os.path.isabs(value):
            return str(root / value)
        return value

    out = dict(raw)
    for key in ("base", "output", "registry"):
        if key in out:
            out[key] = fix(out[key])
    if isinstance(out.get("store"), str) and "://" not in out["store"]:
        out["store"] = fix(out["store"])
    if isinstance(out.get("models"), list):
        out["models"] = [
            {k: fix(v) if k in ("path", "validation", "test") else v for k, v in m.items()}
            if isinstance(m, dict) else m
            for m in out["models"]
        ]
    return out


def parse_config(raw: Any, *, root: Path | None = None, source: str = "config") -> MergeConfig:
    """Validate a config mapping; one ConfigError listing every problem."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping with base, output, models, method")
    if root is not None:
        raw = _resolve_paths(raw, root)
    raw = with_registry_models(raw, source)
    first = _parameter_problems(raw)
    try:
        config = MergeConfig.model_validate(raw)
    except ValidationError as e:
        lines = first + [
            f"  - {'.'.join(str(p) for p in err['loc']) or '(top)'}: {err['msg']}" for err in e.errors()
        ]
        raise ConfigError(f"{source} has {len(lines)} problem(s):\n" + "\n".join(lines)) from None
    if first:
        raise ConfigError(f"{source} has {len(first)} problem(s):\n" + "\n".join(first))
    from supermerge.merge_core.params import parameter_problems

    missing = config.missing_files() + parameter_problems(config.method, config.parameters)
    if missing:
        raise ConfigError(
            f"{source} has {len(missing)} problem(s):\n" + "\n".join(f"  - {m}" for m in missing)
        )
    return config


def _parameter_problems(raw: dict[str, Any]) -> list[str]:
    """Parameter names the config's method does not take: reported first, before anything that a
    misspelt name could cause (a missing lambda would otherwise ask for validation data)."""
    from supermerge.merge_core.methods.registry import METHODS, unknown_parameters

    method = raw.get("method", DEFAULT_METHOD)
    spec = METHODS.get(method) if isinstance(method, str) else None
    params = raw.get("parameters")
    if spec is None or not isinstance(params, dict):
        return []
    problem = unknown_parameters(spec, [str(k) for k in params])
    return [f"  - parameters: {problem}"] if problem else []


def read_config(path: str | os.PathLike[str], overrides: dict[str, Any] | None = None) -> tuple[dict[str, Any], Path]:
    """The config file's mapping (a mergekit config translated to ours) with ``overrides`` set, not yet
    validated, and the folder its relative paths are relative to: for callers that change it further
    before the one validation (supermerge.orchestrator.options)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    raw = load_yaml(path)
    root = path.parent.resolve()
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    if is_mergekit_config(raw):
        if given.get("output", raw.get("output")) is None:
            raise ConfigError(f"{path} is a mergekit config, which names no output; pass --output DIR "
                              "(mergekit's OUT_PATH argument)")
        raw, root = from_mergekit(raw, str(path)), Path.cwd()  # mergekit's paths are relative to the cwd
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping with base, output, models, method")
    return {**raw, **given}, root


def load_config(path: str | os.PathLike[str], overrides: dict[str, Any] | None = None) -> MergeConfig:
    """The config file validated (``overrides``: keys set over the file's, e.g. ``output``)."""
    raw, root = read_config(path, overrides)
    return parse_config(raw, root=root, source=str(path))


class RetryPolicy(_Strict):
    """How often a failed merge node is tried again (the Prefect flow's task retries): a node that
    died of something passing (a preempted GPU, a full disk being cleaned) need not fail the tree."""

    retries: int = Field(default=0, ge=0)
    retry_delay_seconds: float = Field(default=0.0, ge=0)


MergeConfig.model_rebuild()
