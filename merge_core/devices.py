"""The one place that decides which device a merge runs on."""

from __future__ import annotations

import torch

from supermerge.merge_core.errors import ConfigError


def resolve_device(name: str = "auto") -> str:
    """``auto`` picks the first CUDA GPU when there is one, else the CPU; an explicit CUDA device
    that is not there is an error rather than a silent fall back to a 100x slower CPU run."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device {name!r} was asked for but torch sees no CUDA GPU; use 'cpu' or 'auto'")
        index = int(name.split(":", 1)[1]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise ConfigError(f"device {name!r}: only {torch.cuda.device_count()} CUDA device(s) here")
        return name
    if name != "cpu":
        raise ConfigError(f"unknown device {name!r}; use 'auto', 'cpu', 'cuda' or 'cuda:N'")
    return name
