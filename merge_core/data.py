"""Labelled examples as tensors: what the learned merges train on and evaluation scores.

A task's data is a batch dict of equal-length tensors (``input_ids``, ``attention_mask``, ...) plus
``labels``. Users give JSONL (``{"text": ..., "label": ...}``; a label is a class id, or a class name of the
fine-tune's ``id2label``) tokenized with the base model's tokenizer, or a safetensors file of ready
tensors; tests build tensors directly.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from supermerge.merge_core.errors import DataError

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


@dataclass(frozen=True)
class TaskData:
    """``inputs``: model keyword arguments, each of shape (n, ...); ``labels``: (n,) int64 class ids
    (or (n, seq) token ids with -100 for ignored positions, for generation tasks)."""

    inputs: Mapping[str, Tensor]
    labels: Tensor

    def __post_init__(self) -> None:
        n = len(self.labels)
        for name, t in self.inputs.items():
            if len(t) != n:
                raise DataError(f"input {name!r} has {len(t)} rows but there are {n} labels")

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, index: Tensor) -> TaskData:
        return TaskData({k: v[index] for k, v in self.inputs.items()}, self.labels[index])

    def batches(self, batch_size: int, *, by_length: bool = False) -> Iterator[TaskData]:
        """Consecutive batches, each cut to its longest row (see ``trimmed``). ``by_length``: rows in
        order of length, so a batch pads little (for scoring, where the order does not matter)."""
        order = torch.arange(len(self))
        mask = self.inputs.get("attention_mask")
        if by_length and mask is not None:
            order = torch.argsort(mask.sum(dim=1), stable=True)
        for start in range(0, len(self), batch_size):
            yield self.take(order[start:start + batch_size]).trimmed()

    def sample(self, batch_size: int, generator: torch.Generator) -> TaskData:
        """A random batch without replacement (the whole set when it is smaller), cut to its longest row."""
        if batch_size >= len(self):
            return self.trimmed()
        return self.take(torch.randperm(len(self), generator=generator)[:batch_size]).trimmed()

    def trimmed(self) -> TaskData:
        """The same rows without the trailing columns that are padding in every row.

        Data is padded to the longest row of the whole set; a batch of short rows would otherwise pay
        for that length in every layer (scoring 300 examples ran 1.7x slower). Masked positions do not
        change what the unmasked ones compute, so the results are the same. Left-padded data always
        has a real token in its last column and is returned as is."""
        mask = self.inputs.get("attention_mask")
        if mask is None or mask.ndim != 2 or mask.shape[1] == 0:
            return self
        used = torch.nonzero(mask.any(dim=0))
        length = int(used.max()) + 1 if len(used) else 1
        if length == mask.shape[1]:
            return self
        inputs = {k: v[:, :length] if v.ndim >= 2 and v.shape[1] == mask.shape[1] else v
                  for k, v in self.inputs.items()}
        labels = self.labels[:, :length] if self.labels.ndim == 2 else self.labels
        return TaskData(inputs, labels)

    def to(self, device: torch.device | str) -> TaskData:
        return TaskData({k: v.to(device) for k, v in self.inputs.items()}, self.labels.to(device))

    def tensors(self) -> dict[str, Tensor]:
        """Flat dict (inputs + labels) for hashing or saving."""
        return {**self.inputs, "labels": self.labels}


def require_labelled(task: str, data: TaskData | None, split: str = "validation") -> TaskData:
    """The learned merges and the grid searches need labelled examples; say so plainly."""
    if data is None or len(data) == 0:
        raise DataError(
            f"task {task!r} has no {split} examples; give at least one labelled example "
            "(the paper uses 32 per task)"
        )
    return data


CHARS_PER_TOKEN = 16
"""Characters of a text kept per token of ``max_length`` before tokenising (see ``cut_text``)."""


def cut_text(text: str, tokenizer, max_length: int) -> str:
    """``text`` cut, at a space, to a prefix whose first ``max_length`` tokens are the whole text's.

    A tokenizer holds every token of its input before truncating, so an 11 MB line held more than a
    GB while it was tokenised, for 64 tokens kept. Words before the cut tokenise as they do in the whole
    text; the prefix is grown until it has ``max_length`` tokens, or is the whole text."""
    keep = max_length * CHARS_PER_TOKEN
    while len(text) > keep:
        cut = text[:keep]
        at = max(cut.rfind(" "), cut.rfind("\n"), cut.rfind("\t"))
        cut = cut[:at] if at > 0 else cut
        if len(tokenizer(cut, add_special_tokens=False)["input_ids"]) >= max_length:
            return cut
        keep *= 4
    return text


def tokenize(texts: Sequence[str], labels: Sequence[int], tokenizer, max_length: int = 64) -> TaskData:
    """Tokenize to fixed-length tensors (padding to the longest, truncating at ``max_length``); long
    texts are cut before they are tokenised (``cut_text``)."""
    if len(texts) != len(labels):
        raise DataError(f"{len(texts)} texts but {len(labels)} labels")
    enc = tokenizer(
        [cut_text(t, tokenizer, max_length) for t in texts], padding=True, truncation=True, max_length=max_length,
        return_tensors="pt",
    )
    inputs = {k: enc[k] for k in MODEL_INPUTS if k in enc}
    return TaskData(inputs, torch.as_tensor(list(labels), dtype=torch.long))


def load_task_data(
    path: str | os.PathLike[str], tokenizer=None, max_length: int = 64, label_ids: Mapping[str, int] | None = None
) -> TaskData:
    """Read JSONL (``text`` + ``label`` per line) or a safetensors file (``labels`` + inputs).

    A JSONL ``label`` is a class id, or a class name that ``label_ids`` (the task's fine-tune's
    ``id2label`` inverted, ``supermerge.merge_core.labels.label_ids``) maps to one."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"data file {path} is a directory; give the .jsonl or .safetensors file in it")
    if path.exists() and not path.is_file():
        raise DataError(f"data file {path} is not a regular file (a pipe or device?); give a .jsonl or "
                        ".safetensors file")
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            tensors = load_file(path)
        except (SafetensorError, OSError, ValueError) as e:
            raise DataError(
                f"data file {path} is not a readable safetensors file ({e}); write it again with "
                "supermerge.merge_core.data.save_task_data, or give the examples as .jsonl"
            ) from None
        if "labels" not in tensors:
            raise DataError(f"{path}: no 'labels' tensor; supervised merges need labels")
        labels = tensors.pop("labels")
        if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.dtype.is_complex:
            raise DataError(f"{path}: 'labels' is {labels.dtype}; labels are integer class ids (int64)")
        return TaskData(tensors, labels.long())
    if path.suffix not in (".jsonl", ".json"):
        raise DataError(f"{path}: expected .jsonl (text, label per line) or .safetensors")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(
            f"data file {path} cannot be read as UTF-8 text ({e}); check the file and its permissions"
        ) from None
    texts, labels = [], []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            texts.append(row["text"])
            labels.append(row["label"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise DataError(
                f"{path}:{lineno}: each line must be a JSON object with 'text' and a 'label' (a class id, "
                f"or a class name of the fine-tune's id2label) ({e})"
            ) from e
        if not isinstance(texts[-1], str) or not texts[-1].strip():
            raise DataError(f"{path}:{lineno}: 'text' is {texts[-1]!r}; each example needs a non-empty string")
        if isinstance(labels[-1], str):
            labels[-1] = _label_id(labels[-1], label_ids, f"{path}:{lineno}")
        elif isinstance(labels[-1], bool) or not isinstance(labels[-1], int):
            raise DataError(f"{path}:{lineno}: 'label' is {labels[-1]!r}; labels are integer class ids (0, 1, ...) "
                            "or class names of the fine-tune's id2label")
    if not texts:
        raise DataError(f"{path} holds no examples")
    if tokenizer is None:
        raise DataError(f"{path} is text, and reading it needs the base model's tokenizer; the base has none "
                        "(a model dir with config.json and tokenizer files, e.g. vocab.txt or tokenizer.json)")
    return tokenize(texts, labels, tokenizer, max_length)


def _label_id(label: str, label_ids: Mapping[str, int] | None, where: str) -> int:
    """The class id of a label given by name; DataError saying how to fix it otherwise."""
    if label_ids is None:
        raise DataError(
            f"{where}: 'label' is the name {label!r}, but the task's fine-tune names no classes (its config.json "
            "has no id2label, or only transformers' LABEL_0, LABEL_1, ...); give class ids (0, 1, ...), or add "
            "the names to the fine-tune's config.json, e.g. \"id2label\": {\"0\": \"negative\", \"1\": \"positive\"}"
        )
    if label not in label_ids:
        known = ", ".join(f"{n!r} ({i})" for n, i in sorted(label_ids.items(), key=lambda kv: kv[1]))
        raise DataError(f"{where}: label {label!r} is not a class of the task: its fine-tune's id2label names "
                        f"{known}; use one of those names or its class id")
    return label_ids[label]


def check_labels(data: TaskData, classes: int, source: str) -> None:
    """Every class label of ``data`` (1-D labels) is a class of a head with ``classes`` outputs; DataError
    naming ``source``, the first bad label and its row otherwise (-100, ignored by the loss, is no
    class either: a classification example without a class teaches nothing)."""
    labels = data.labels
    if labels.ndim != 1 or len(labels) == 0:
        return
    bad = torch.nonzero((labels < 0) | (labels >= classes)).flatten()
    if len(bad):
        row = int(bad[0])
        raise DataError(f"{source}: label {int(labels[row])} (example {row + 1}, {len(bad)} of {len(labels)} bad) "
                        f"is not a class of the task's head, which has {classes} classes (labels 0..{classes - 1})")


def check_inputs(data: TaskData, *, vocab_size: int | None, max_positions: int | None, source: str) -> None:
    """Ready-made token ids (a .safetensors data file) fit the model: ids below its vocabulary size,
    rows no longer than its position embeddings; DataError naming ``source`` otherwise."""
    ids = data.inputs.get("input_ids")
    if ids is None or ids.numel() == 0:
        return
    if ids.dtype.is_floating_point:
        raise DataError(f"{source}: input_ids is {ids.dtype}; token ids are integers")
    if vocab_size is not None and (int(ids.max()) >= vocab_size or int(ids.min()) < 0):
        raise DataError(f"{source}: token id {int(ids.max()) if int(ids.max()) >= vocab_size else int(ids.min())} "
                        f"is outside the model's vocabulary (0..{vocab_size - 1}); tokenise with the base's tokenizer")
    if max_positions is not None and ids.ndim == 2 and ids.shape[1] > max_positions:
        raise DataError(f"{source}: rows of {ids.shape[1]} tokens are longer than the model's {max_positions} "
                        "positions (max_position_embeddings); cut them to at most that")


def save_task_data(data: TaskData, path: str | os.PathLike[str]) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in data.tensors().items()}, str(path))
