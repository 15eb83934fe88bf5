"""What every merge (and ``supermerge register``) checks before a weight is merged, beyond headers.

The base must be a readable model whose values are finite (one NaN in the base makes every merged
tensor NaN); each full fine-tune's ``config.json`` must describe the base's architecture (it may
differ in its label fields); each task's validation and test data must fit the task's head (labels
0..classes-1) and the model (``max_length`` and ready-made token ids within its positions and
vocabulary). Each problem is one error naming the file; nothing is written.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import Tensor

from supermerge.merge_core.checkpoint import Checkpoint, config_dir, open_checkpoint
from supermerge.merge_core.data import TaskData, check_inputs, check_labels
from supermerge.merge_core.errors import CheckpointError, ConfigError, DataError, TaskVectorError
from supermerge.merge_core.task_vectors import check_finite, load_stored_heads, match_names

log = logging.getLogger(__name__)

LABEL_FIELDS = frozenset({
    "architectures", "id2label", "label2id", "num_labels", "problem_type", "finetuning_task", "_name_or_path",
    "transformers_version", "dtype", "torch_dtype", "classifier_dropout", "_attn_implementation_autoset",
})
"""config.json fields a task's fine-tune may change freely: its head and labels, and bookkeeping."""

TRAINING_FIELDS = frozenset({
    "hidden_dropout_prob", "attention_probs_dropout_prob", "dropout", "attention_dropout", "activation_dropout",
    "embd_pdrop", "resid_pdrop", "attn_pdrop", "summary_first_dropout", "initializer_range",
    "gradient_checkpointing", "use_cache", "output_attentions", "output_hidden_states",
})
"""Fields that change only how a model trains (or what it returns), not what its weights compute: a
fine-tune that differs from the base here is merged, with a warning."""

POSITION_FIELDS = ("max_position_embeddings", "n_positions", "max_seq_len")


def model_config(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The parsed ``config.json`` of the model dir ``path`` belongs to (None when it has none)."""
    folder = config_dir(path)
    if folder is None:
        return None
    f = folder / "config.json"
    try:
        raw = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        size = f.stat().st_size
        raise CheckpointError(f"{f} is not a readable JSON model config ({'an empty file' if size == 0 else e}); "
                              "copy the model's config.json again") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{f} is not a JSON object; it is not a model config")
    return raw


def max_positions(base_config: Mapping[str, Any] | None) -> int | None:
    for name in POSITION_FIELDS:
        value = (base_config or {}).get(name)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def check_base(base: Checkpoint, config: Mapping[str, Any] | None, *, max_length: int) -> None:
    """Refuse the base (``config``: its parsed config.json, None for a bare weights file) when
    ``max_length`` exceeds its positions, or when a value of the base is NaN or Inf (reads the base once)."""
    positions = max_positions(config)
    if positions is not None and max_length > positions:
        raise ConfigError(f"max_length {max_length} is more than the base's {positions} positions "
                          f"(max_position_embeddings in {config_dir(base.path)}/config.json); set max_length <= {positions}")
    with base:
        try:
            check_finite(base)
        except TaskVectorError as e:
            raise TaskVectorError(f"{e}: it is the base, so every merged tensor would be NaN or Inf; restore "
                                  "the base from its source") from None


def _differences(base: Mapping[str, Any], tuned: Mapping[str, Any]) -> list[str]:
    """Fields both configs hold with different values (a field only one holds is a version default)."""
    return sorted(k for k in set(base) & set(tuned) if k not in LABEL_FIELDS and base[k] != tuned[k])


def check_model_config(base_config: Mapping[str, Any] | None, model: Path, tuned: Mapping[str, Any] | None) -> None:
    """A full fine-tune's config.json (``tuned``, parsed; None when it has none) against the base's:
    TaskVectorError when they differ in the architecture (anything but label and training-only
    fields), a warning for training-only fields."""
    if base_config is None or tuned is None:
        return
    differ = _differences(base_config, tuned)
    shown = ", ".join(f"{k} ({tuned[k]!r}, the base's {base_config[k]!r})" for k in differ)
    hard = [k for k in differ if k not in TRAINING_FIELDS]
    if hard:
        shown = ", ".join(f"{k} ({tuned[k]!r}, the base's {base_config[k]!r})" for k in hard)
        raise TaskVectorError(
            f"{config_dir(model)}/config.json differs from the base's in {shown}; it is not a fine-tune of this "
            "base's architecture, and a merge would compute neither: fine-tune it from the base")
    if differ:
        log.warning("%s/config.json differs from the base's in training-only field(s) %s; they change no "
                    "weight, so it is merged", config_dir(model), shown)


def head_classes(head: Mapping[str, Tensor | tuple[int, ...]]) -> int | None:
    """How many classes a task head outputs: the rows of its output layer (the only 2-D weight, or
    ``out_proj``'s / the prefix's own ``weight``); None when it cannot be told."""
    shapes = {n: tuple(t.shape) if isinstance(t, Tensor) else tuple(t) for n, t in head.items()}
    weights = {n: s for n, s in shapes.items() if n.endswith("weight") and len(s) == 2}
    if len(weights) == 1:
        return next(iter(weights.values()))[0]
    for n, s in sorted(weights.items()):
        if n.endswith("out_proj.weight") or n.count(".") == 1:
            return s[0]
    return None


def task_heads(base: Checkpoint, path: Path, name: str, head_prefixes: Sequence[str],
               tuned: Checkpoint | None = None) -> dict[str, dict[str, Any]]:
    """task -> {head tensor: shape} of a task model (a merged model: one head per task it serves), read
    from headers where the model is a checkpoint. Checks the model against the base as it goes: its
    tensor names, shapes and dtypes and its finite values (an adapter: its kind, targets and values).
    ``tuned``: the model's checkpoint, its header already read (opened here when None)."""
    from supermerge.merge_core.adapters import check_adapter, is_adapter_dir, load_adapter_task_vector

    if is_adapter_dir(path):
        check_adapter(path, base)
        head = load_adapter_task_vector(path, base).head
        return {name: {n: tuple(t.shape) for n, t in head.items()}} if head else {}
    with tuned if tuned is not None else open_checkpoint(path) as tuned:
        names = match_names(base, tuned, head_prefixes)
        check_finite(tuned)
        head = {n: tuned.shape(n) for n in names.head}
    stored = load_stored_heads(path)
    if stored:
        return {t: {n: tuple(x.shape) for n, x in h.items()} for t, h in stored.items()}
    return {name: head} if head else {}


def check_task_data(
    task: str, data: TaskData, head: Mapping[str, Any] | None, source: str, base_config: Mapping[str, Any] | None,
) -> None:
    """A task's data against its head (labels are its classes) and the model (token ids, positions)."""
    if len(data) == 0:
        raise DataError(f"{source} holds no examples")
    classes = head_classes(head) if head else None
    if classes is not None:
        check_labels(data, classes, source)
    vocab = (base_config or {}).get("vocab_size")
    check_inputs(data, vocab_size=vocab if isinstance(vocab, int) else None,
                 max_positions=max_positions(base_config), source=source)
