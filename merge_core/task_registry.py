"""A folder of task models that a merge config can name (``registry: DIR``): ``DIR/registry.yaml``.

New task models arrive one by one (``supermerge register``), long after the first merge; the config
keeps naming the same folder and each merge picks up whatever is registered by then. The file lists
the base every model was checked against and one entry per model, in registration order (the order
matters: it keeps the merge tree's children, and so the checkpoint store's keys, stable)::

    base: /models/base
    models:
      - {name: sentiment, path: /models/sentiment, validation: /data/sentiment.val.jsonl}

Paths in the file may be relative to the folder. The file is replaced atomically (a temporary sibling
renamed over it), so a reader sees the old list or the new one, never half of one.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from supermerge.merge_core.errors import ConfigError
from supermerge.merge_core.safe_yaml import load_yaml

REGISTRY_FILE = "registry.yaml"
PATH_FIELDS = ("path", "validation", "test")


@dataclass(frozen=True)
class TaskRegistry:
    """``base``: the base model the entries fit (None before the first registration); ``models``:
    ModelEntry-shaped dicts (name, path, validation, test) with absolute paths."""

    folder: Path
    base: Path | None = None
    models: list[dict[str, Any]] = field(default_factory=list)

    @property
    def file(self) -> Path:
        return self.folder / REGISTRY_FILE

    def names(self) -> list[str]:
        return [str(m["name"]) for m in self.models]


def _absolute(value: Any, folder: Path) -> Any:
    if isinstance(value, str) and value and not os.path.isabs(value):
        return str(folder / value)
    return value


def read_registry(folder: str | os.PathLike[str], *, missing_ok: bool = False) -> TaskRegistry:
    """The registry in ``folder`` (an empty one when it has no registry.yaml and ``missing_ok``)."""
    folder = Path(folder).resolve()
    f = folder / REGISTRY_FILE
    if not f.is_file():
        if missing_ok:
            return TaskRegistry(folder)
        raise ConfigError(f"registry {folder} has no {REGISTRY_FILE}; register a model first "
                          "(supermerge register MODEL_DIR --task NAME --val DATA --registry DIR)")
    raw = load_yaml(f)
    if not isinstance(raw, dict) or not isinstance(raw.get("models", []), list):
        raise ConfigError(f"{f}: expected a mapping with 'base' and a list 'models' (got {type(raw).__name__}); "
                          "it is not a registry file: restore it, or remove it and register the models again")
    unknown = sorted(set(raw) - {"base", "models"})
    if unknown:
        raise ConfigError(f"{f}: unknown key(s) {unknown}; a registry file holds 'base' and 'models'")
    if raw.get("base") is not None and not isinstance(raw["base"], str):
        raise ConfigError(f"{f}: 'base' must be the path of the base model, got {raw['base']!r}")
    models = []
    for i, m in enumerate(raw.get("models", [])):
        if not isinstance(m, dict) or "name" not in m or "path" not in m:
            raise ConfigError(f"{f}: models[{i}] must be a mapping with at least 'name' and 'path'")
        bad = [k for k in ("name", *PATH_FIELDS) if k in m and not isinstance(m[k], str)]
        if bad:
            raise ConfigError(f"{f}: models[{i}].{bad[0]} must be a string (a name or a path), got {m[bad[0]]!r}")
        models.append({k: _absolute(v, folder) if k in PATH_FIELDS else v for k, v in m.items()})
    base = raw.get("base")
    return TaskRegistry(folder, Path(_absolute(str(base), folder)) if base else None, models)


def write_registry(registry: TaskRegistry) -> Path:
    """Replace ``registry.yaml`` atomically; returns its path."""
    registry.folder.mkdir(parents=True, exist_ok=True)
    body = {
        "base": str(registry.base) if registry.base is not None else None,
        "models": [{k: str(v) if k in PATH_FIELDS else v for k, v in m.items() if v is not None}
                   for m in registry.models],
    }
    fd, tmp = tempfile.mkstemp(prefix=f".{REGISTRY_FILE}.", suffix=".partial", dir=registry.folder)
    try:
        with os.fdopen(fd, "w") as fh:
            yaml.safe_dump(body, fh, sort_keys=False)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, registry.file)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return registry.file


def with_registry_models(raw: dict[str, Any], source: str) -> dict[str, Any]:
    """A raw config with the models of its ``registry`` appended to ``models`` (none while the folder
    has no registry.yaml yet).

    An entry already listed exactly as the registry has it is not added again: a config re-validated
    from its resolved form (``MergeConfig.resolved()``) lists the registry's models already. A registry
    checked against another base than the config's is refused.
    """
    folder = raw.get("registry")
    if not folder:
        return raw
    if not Path(folder).is_dir():
        raise ConfigError(f"{source}: registry folder {folder} does not exist; create it, or register a model "
                          "into it (supermerge register MODEL_DIR --task NAME --val DATA --registry DIR --base BASE)")
    registry = read_registry(folder, missing_ok=True)
    base = raw.get("base")
    if registry.base is not None and base and Path(str(base)).resolve() != registry.base.resolve():
        raise ConfigError(f"{source}: registry {registry.folder} holds models of the base {registry.base}, "
                          f"but the config's base is {base}; use one base for both")
    listed = raw.get("models") if isinstance(raw.get("models"), list) else []

    def same(a: Any, b: dict[str, Any]) -> bool:
        return isinstance(a, dict) and all(
            (str(a.get(k)) if a.get(k) is not None else None) == (str(b.get(k)) if b.get(k) is not None else None)
            for k in ("name", *PATH_FIELDS)
        )

    added = [m for m in registry.models if not any(same(x, m) for x in listed)]
    return {**raw, "models": [*listed, *added]}
