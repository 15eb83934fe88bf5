"""One task's classifier from a merged model: a standard Hugging Face dir anyone loads in one line.

A merged classifier is the merged body plus one head per task (``heads/<task>.safetensors``); nothing
outside supermerge knows that layout. ``export_task`` writes, for one task, a dir that
``AutoModelForSequenceClassification.from_pretrained(DIR)`` loads with no missing or unexpected
weights: ``config.json`` (the sequence-classification architecture, ``num_labels``, ``id2label`` /
``label2id``), the tokenizer, and the weights as an index over two files, ``body.safetensors`` and
``head.safetensors``. The body file is a hard link to the merged model's own shard when its names are
already the classifier's (so k tasks cost the body once), or written once with the names the
classifier expects (a headless encoder's ``embeddings.*`` become ``bert.embeddings.*``) and then hard
linked by every further task ``export_all`` writes.

Label names come from the merge record (``labels``: each fine-tune's ``id2label``, recorded by
``supermerge.merge_core.merge.result_record`` through ``supermerge.merge_core.labels``, the reader that also maps string labels in
the data); a task without them gets transformers' ``LABEL_i``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from supermerge.merge_core.checkpoint import MODEL_FILES, RECORD_FILE, SAFETENSORS_INDEX, open_checkpoint, refuse_existing
from supermerge.merge_core.errors import CheckpointError, ConfigError

log = logging.getLogger(__name__)

BODY_FILE = "body.safetensors"
HEAD_FILE = "head.safetensors"


def _record(merged: Path) -> dict[str, Any]:
    path = merged / RECORD_FILE
    if not path.is_file():
        raise CheckpointError(f"{merged} has no {RECORD_FILE}: it is not a model `supermerge merge` wrote")
    return json.loads(path.read_text())


def _classifier_config(merged: Path, head: Mapping[str, torch.Tensor], labels: Mapping[str, str]):
    """The merged model's config as a sequence classifier with the head's number of classes."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES

    config = AutoConfig.from_pretrained(merged)
    arch = MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES.get(config.model_type)
    if arch is None:
        raise ConfigError(f"{merged}: transformers has no sequence classifier for model type {config.model_type!r}")
    weights = [t for n, t in head.items() if n.endswith("weight") and t.dim() == 2]
    if not weights:
        raise CheckpointError(f"the head holds no 2-D weight to count the classes from: {sorted(head)}")
    num_labels = int(weights[-1].shape[0])  # the output projection comes last (pre_classifier before it)
    names = {int(k): v for k, v in labels.items()}
    if names and sorted(names) != list(range(num_labels)):
        raise CheckpointError(f"the recorded labels {names} do not name the head's {num_labels} classes")
    id2label = {i: names.get(i, f"LABEL_{i}") for i in range(num_labels)}
    config.architectures = [arch]
    config.num_labels = num_labels
    config.id2label, config.label2id = id2label, {v: k for k, v in id2label.items()}
    return config


def _expected_names(config) -> tuple[set[str], str]:
    """The names the classifier's state dict holds, and its base-model prefix (``"bert."``)."""
    from transformers import AutoModelForSequenceClassification

    with torch.device("meta"):
        model = AutoModelForSequenceClassification.from_config(config)
    return set(model.state_dict()), getattr(model, "base_model_prefix", "") + "."


def _body_names(body: list[str], expected: set[str], prefix: str) -> dict[str, str]:
    """merged name -> classifier name for every body tensor the classifier holds."""
    out = {}
    for n in body:
        if n in expected:
            out[n] = n
        elif prefix + n in expected:
            out[n] = prefix + n
    return out


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError as e:  # another filesystem: one copy (export_all links the others to it)
        log.info("hard link %s -> %s failed (%s); copying once", src, dst, e)
        shutil.copy2(src, dst)


def export_task(
    merged: str | os.PathLike[str],
    task: str,
    out: str | os.PathLike[str],
    *,
    body_from: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write task ``task`` of the merged model ``merged`` as a classifier dir ``out`` (see the module
    docstring). ``body_from``: a dir ``export_task`` wrote before for the same merged model, whose
    ``body.safetensors`` is hard linked instead of being written again. Returns ``out``."""
    merged, out = Path(merged), Path(out)
    record = _record(merged)
    head_file = merged / "heads" / f"{task}.safetensors"
    if not head_file.is_file():
        raise ConfigError(f"{merged} has no head for task {task!r}; its tasks: {record.get('tasks')}")
    refuse_existing(out, overwrite=overwrite, instead="another --out")
    if out.exists():
        shutil.rmtree(out)
    head = load_file(head_file)
    config = _classifier_config(merged, head, record.get("labels", {}).get(task, {}))
    expected, prefix = _expected_names(config)
    with open_checkpoint(merged) as ck:
        body_names = _body_names([n for n in ck.keys()], expected, prefix)
        problems = sorted(expected - set(body_names.values()) - set(head))
        if problems:
            raise CheckpointError(f"{merged}: the {config.architectures[0]} for task {task!r} needs "
                                  f"{problems[:5]} ({len(problems)} tensors) that neither the body nor the head holds")
        out.mkdir(parents=True)
        body_path = out / BODY_FILE
        single = merged / "model.safetensors"  # one shard: linkable as it is when the names fit
        as_is = all(a == b for a, b in body_names.items()) and len(body_names) == len(ck.keys())
        if body_from is not None and (Path(body_from) / BODY_FILE).is_file():
            _link_or_copy(Path(body_from) / BODY_FILE, body_path)
        elif as_is and single.is_file():
            _link_or_copy(single, body_path)
        else:
            save_file({body_names[n]: ck.get(n).contiguous() for n in body_names}, body_path, metadata={"format": "pt"})
    save_file({n: t.contiguous() for n, t in head.items()}, out / HEAD_FILE, metadata={"format": "pt"})
    weight_map = {n: BODY_FILE for n in body_names.values()} | {n: HEAD_FILE for n in head}
    total = sum((out / f).stat().st_size for f in (BODY_FILE, HEAD_FILE))
    (out / SAFETENSORS_INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                    indent=2, sort_keys=True))
    config.save_pretrained(out)
    for name in MODEL_FILES:
        if name != "config.json" and (merged / name).is_file():
            shutil.copy2(merged / name, out / name)
    (out / "export.json").write_text(json.dumps({"merged": str(merged.resolve()), "task": task,
                                                 "method": record.get("method")}, indent=2))
    return out


def export_all(merged: str | os.PathLike[str], out: str | os.PathLike[str], *, overwrite: bool = False) -> list[Path]:
    """Every task of ``merged`` as ``out/<task>/``; the body is stored once, hard linked into each."""
    merged, out = Path(merged), Path(out)
    tasks = list(_record(merged).get("tasks", []))
    if not tasks:
        raise ConfigError(f"{merged} records no tasks (no heads were merged); nothing to export")
    written: list[Path] = []
    for task in tasks:
        written.append(export_task(merged, task, out / task, body_from=written[0] if written else None,
                                   overwrite=overwrite))
    return written
