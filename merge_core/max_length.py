"""Which ``max_length`` a merge tokenizes its data to: the config's, else the one the fine-tunes record.

A fine-tune scores differently when its inputs are cut shorter than it was trained on (63.3 vs 64.7
at 128), so the training length is the right default; but nothing standard records it. A tokenizer's
``model_max_length`` is the model's position limit copied from the base (512 for MiniLM, 1e30 when
unset), not a training length, and transformers' config.json has no such field. So the one signal
read is what a fine-tune says itself: ``supermerge-finetune.json`` beside its weights,
``{"max_length": N}``, written by ``supermerge.merge_core.finetune.finetune_classifier`` (or by hand). A model
without it (a plain-transformers fine-tune, an adapter, a merged model) says nothing.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from supermerge.merge_core.errors import ConfigError

FINETUNE_RECORD = "supermerge-finetune.json"
DEFAULT_MAX_LENGTH = 64


@dataclass(frozen=True)
class MaxLength:
    """The resolved ``max_length`` (tokens per example) and where it came from, for ``supermerge plan``."""

    tokens: int
    source: Literal["config", "fine-tunes", "default"]

    def describe(self) -> str:
        where = {"config": "set in the config", "fine-tunes": f"from the fine-tunes' {FINETUNE_RECORD}",
                 "default": "default"}[self.source]
        return f"max_length {self.tokens} ({where})"


def write_finetune_record(folder: str | os.PathLike[str], max_length: int) -> None:
    """Record in a fine-tune's folder the length its training data was tokenized to."""
    (Path(folder) / FINETUNE_RECORD).write_text(json.dumps({"max_length": max_length}) + "\n")


def recorded_max_length(path: str | os.PathLike[str]) -> int | None:
    """The training length a model at ``path`` (a dir, or a weights file in one) records, or None."""
    folder = Path(path) if Path(path).is_dir() else Path(path).parent
    record = folder / FINETUNE_RECORD
    if not record.is_file():
        return None
    try:
        value = json.loads(record.read_text(encoding="utf-8")).get("max_length")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as e:
        raise ConfigError(f"{record} is not a JSON object with max_length ({e}); fix or delete it, "
                          "or set max_length in the config") from None
    if isinstance(value, bool) or not isinstance(value, int) or value < 2:
        raise ConfigError(f"{record}: max_length is {value!r}, not a number of tokens (an integer >= 2); fix or "
                          "delete it, or set max_length in the config")
    return value


def resolve_max_length(given: int | None, models: Mapping[str, str | os.PathLike[str]]) -> MaxLength:
    """``given`` when set; else the training length every model of ``models`` (name -> path) records;
    else the default 64 when none records one. Models that record different lengths, or some a length
    and some none, are a ConfigError: no one length is right for all of them, so the user chooses."""
    if given is not None:
        return MaxLength(given, "config")
    recorded = {name: recorded_max_length(path) for name, path in models.items()}
    lengths = {n for n in recorded.values() if n is not None}
    if not lengths:
        return MaxLength(DEFAULT_MAX_LENGTH, "default")
    if len(lengths) == 1 and None not in recorded.values():
        return MaxLength(lengths.pop(), "fine-tunes")
    said = ", ".join(f"{name} {n if n is not None else 'none'}" for name, n in recorded.items())
    raise ConfigError(f"the fine-tunes do not record one training length ({FINETUNE_RECORD}: {said}); set "
                      "max_length in the config to the tokens per example every task's data is cut to")
