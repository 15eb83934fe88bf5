"""The user-facing merge config (YAML, in the spirit of mergekit's), validated once.

Every problem is reported in one ConfigError (pydantic's field errors plus missing files), before any
weights are read. The resolved config is saved beside the output so a merge can be reproduced.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from merge_core.errors import ConfigError
from merge_core.safe_yaml import load_yaml
from merge_core.task_registry import with_registry_models
from merge_core.task_vectors import DEFAULT_HEAD_PREFIXES


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


class TreeConfig(_Strict):
    """How the orchestrator arranges merges (hierarchical SuperMerge)."""

    max_fan_in: int | None = Field(default=None, ge=2)
    """Most children per merge node; None lets the memory planner choose."""
    groups: list[Any] | None = None
    """A tree given by hand: nested lists of model names."""
    flat: bool = False
    memory_budget: str | None = None
    """e.g. '8GB', or a number of bytes; default: a safe fraction of what is free."""

    @field_validator("memory_budget", mode="before")
    @classmethod
    def _bytes_as_text(cls, value: Any) -> Any:
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


class MergeConfig(_Strict):
    base: Path
    output: Path
    method: str = "supermerge"
    parameters: dict[str, Any] = Field(default_factory=dict)
    """Method hyperparameters; a list searches those values on the validation data."""
    models: list[ModelEntry]
    kind: Literal["classification", "causal_lm"] = "classification"
    seed: int = 0
    device: str = "auto"
    max_length: int = Field(default=64, ge=2)
    head_prefixes: list[str] = Field(default_factory=lambda: list(DEFAULT_HEAD_PREFIXES))
    tree: TreeConfig = Field(default_factory=TreeConfig)
    retry: RetryPolicy = Field(default_factory=lambda: RetryPolicy())
    registry: Path | None = None
    """A task-model registry folder (see merge_core.task_registry); its models are appended to ``models``."""

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
        from merge_core.methods.registry import METHODS

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
    try:
        config = MergeConfig.model_validate(raw)
    except ValidationError as e:
        lines = [
            f"  - {'.'.join(str(p) for p in err['loc']) or '(top)'}: {err['msg']}" for err in e.errors()
        ]
        raise ConfigError(f"{source} has {len(lines)} problem(s):\n" + "\n".join(lines)) from None
    from merge_core.params import parameter_problems

    missing = config.missing_files() + parameter_problems(config.method, config.parameters)
    if missing:
        raise ConfigError(
            f"{source} has {len(missing)} problem(s):\n" + "\n".join(f"  - {m}" for m in missing)
        )
    return config


def load_config(path: str | os.PathLike[str], overrides: dict[str, Any] | None = None) -> MergeConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    raw = load_yaml(path)
    if isinstance(raw, dict) and overrides:
        raw = {**raw, **{k: v for k, v in overrides.items() if v is not None}}
    return parse_config(raw, root=path.parent.resolve(), source=str(path))


class RetryPolicy(_Strict):
    """How often a failed merge node is tried again (the Prefect flow's task retries): a node that
    died of something passing (a preempted GPU, a full disk being cleaned) need not fail the tree."""

    retries: int = Field(default=0, ge=0)
    retry_delay_seconds: float = Field(default=0.0, ge=0)


MergeConfig.model_rebuild()
