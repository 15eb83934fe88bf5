"""Each task's class names: read once from its fine-tune, used to read string labels and to export.

A fine-tune's ``config.json`` ``id2label`` names its head's classes (transformers' placeholders
``LABEL_i`` name nothing). Data may give a label as that name instead of its class id
(``supermerge.merge_core.data.load_task_data`` maps it through ``label_ids``); the merge record keeps the names
(``merged_labels``) and ``supermerge export`` writes them into the task's ``config.json``. One reader
for both, so the ids the data is scored with are the ids the exported config names.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from supermerge.merge_core.checkpoint import RECORD_FILE

_DEFAULT_LABEL = re.compile(r"^LABEL_\d+$")


def read_labels(
    path: str | os.PathLike[str], name: str, *, config: Mapping[str, Any] | None = None
) -> dict[str, dict[str, str]]:
    """task -> {class index (str): label name} that a model at ``path`` carries: a merged model's record
    (every task beneath it), or a fine-tune's ``config.json`` ``id2label`` (for task ``name``) unless
    those are transformers' placeholders ``LABEL_i``. ``config``: that config.json as the caller
    already parsed it (a plan's ``ModelInventory``), so it is not read again."""
    folder = Path(path) if Path(path).is_dir() else Path(path).parent
    record = folder / RECORD_FILE
    if record.is_file():
        return dict(json.loads(record.read_text()).get("labels", {}))
    if config is None:
        file = folder / "config.json"
        if not file.is_file():
            return {}
        config = json.loads(file.read_text())
    id2label = config.get("id2label") or {}
    if not id2label or all(_DEFAULT_LABEL.match(str(v)) for v in id2label.values()):
        return {}
    return {name: {str(k): str(v) for k, v in sorted(id2label.items(), key=lambda kv: int(kv[0]))}}


def merged_labels(models: Mapping[str, str]) -> dict[str, dict[str, str]]:
    """The label names of every task under ``models`` (input name -> path)."""
    out: dict[str, dict[str, str]] = {}
    for name, path in models.items():
        out.update(read_labels(path, name))
    return out


def label_ids(path: str | os.PathLike[str], name: str) -> dict[str, int] | None:
    """label name -> class id for task ``name`` of the model at ``path`` (its ``id2label`` inverted:
    the names the merge record keeps and export writes); None when it names no classes."""
    names = read_labels(path, name).get(name)
    return {label: int(i) for i, label in names.items()} if names else None
