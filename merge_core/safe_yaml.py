"""YAML as supermerge reads it: safe, duplicate keys refused, aliases bounded.

``yaml.safe_load`` never builds objects, but it lets a later key silently win over an earlier one
(``method:`` given twice) and expands aliases without limit: a 500-byte file of nested aliases is a
tree of millions of values that validation then walks for minutes. Here a repeated key is an error
naming its line, and a document whose aliases expand past ``MAX_VALUES`` values is refused.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from supermerge.merge_core.errors import ConfigError

MAX_VALUES = 100_000
"""The most values (scalars, lists, mappings) a config may hold once its aliases are expanded; a
real config holds hundreds."""


class _DuplicateKey(Exception):
    """A mapping repeats a key (the message says which, and where)."""


class _Loader(yaml.SafeLoader):
    """SafeLoader refusing a mapping that repeats a key."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if isinstance(key, (str, int, float, bool)) and key in seen:
                raise _DuplicateKey(f"key {key!r} is given twice (lines {seen[key]} and {line}); keep one: "
                                    "YAML would silently use the last")
            if isinstance(key, (str, int, float, bool)):
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


def _expanded_size(value: Any, sizes: dict[int, int]) -> int:
    """How many values ``value`` is once shared (aliased) parts are counted at every use; each
    distinct object is sized once, so this is cheap even for a document that expands to billions."""
    if not isinstance(value, (dict, list)):
        return 1
    known = sizes.get(id(value))
    if known is not None:
        return known
    sizes[id(value)] = 1  # a recursive alias counts once more per visit, never loops
    items = list(value.keys()) + list(value.values()) if isinstance(value, dict) else value
    total = 1
    for item in items:
        total += _expanded_size(item, sizes)
        if total > MAX_VALUES:
            break
    sizes[id(value)] = total
    return total


def load_yaml(path: str | os.PathLike[str]) -> Any:
    """The YAML document in ``path``; ConfigError for a file that cannot be read, is not valid YAML,
    repeats a key, or expands (through aliases) past MAX_VALUES values."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path} is not UTF-8 text ({e}); it is not a YAML file") from None
    except OSError as e:
        raise ConfigError(f"{path} cannot be read ({e.strerror or e})") from None
    loader = _Loader(text)  # what yaml.load does, with this SafeLoader
    try:
        raw = loader.get_single_data()
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from None
    except _DuplicateKey as e:
        raise ConfigError(f"{path}: {e}") from None
    finally:
        loader.dispose()
    if _expanded_size(raw, {}) > MAX_VALUES:
        raise ConfigError(f"{path} expands to more than {MAX_VALUES} values through YAML aliases (&anchor / *alias); "
                          "write the values out, or use fewer nested aliases")
    return raw
