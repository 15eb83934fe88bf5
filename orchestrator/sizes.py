"""Sizes in bytes as people write and read them: ``'8GB'`` in a config, ``1.50 GB`` in a plan."""

from __future__ import annotations

import re

from supermerge.merge_core.errors import ConfigError

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}


def parse_bytes(text: str) -> int:
    """``'8GB'`` (10^9), ``'512MiB'`` (2^20), ``'1.5 GB'``, ``'1000000'`` -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    if m is None or m.group(2).lower() not in _UNITS:
        raise ConfigError(
            f"memory budget {text!r} is not a size; write e.g. '8GB', '512MiB' or a number of bytes"
        )
    value = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if value <= 0:
        raise ConfigError(f"memory budget {text!r} must be positive")
    return value


def format_bytes(n: int | float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"
