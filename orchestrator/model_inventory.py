"""Every model one plan reads, each read once: headers, ``config.json`` and label names.

Planning asks many questions of the same files: the base's tensor names and shapes (the memory
planner's ``ModelShape``), each fine-tune's names against the base's, each config.json against the
base's, each task's class names, the weight files' sizes (a streamed node's reads). A
``ModelInventory`` answers them all from one read of each file's header and config.json, and is
passed down through the plan. A checkpoint's file handle, opened for its header, serves the first
pass over its tensors (the finite check), which closes it; ``close`` lets go of the rest before the
plan reads what memory is free, so the plan maps no more of the models than it did. The headers stay
known, and a later pass (the similarity) opens the files again.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from supermerge.merge_core.adapters import adapter_weights_file, is_adapter_dir
from supermerge.merge_core.checkpoint import Checkpoint, config_dir, open_checkpoint
from supermerge.merge_core.errors import ConfigError
from supermerge.merge_core.labels import read_labels
from supermerge.merge_core.peak import ModelShape
from supermerge.merge_core.preflight import model_config
from supermerge.merge_core.task_vectors import mergeable_names

Kind = Literal["classification", "causal_lm"]


class ModelInventory:
    """The headers and configs of a plan's inputs (the base and every task model), read on first use
    and kept for the plan. Paths are told apart by their resolved form."""

    def __init__(self, base: str | os.PathLike[str], kind: Kind = "classification") -> None:
        self.base = Path(base)
        self.kind: Kind = kind
        self._checkpoints: dict[Path, Checkpoint] = {}
        self._configs: dict[Path, dict[str, Any] | None] = {}
        self._auto_config: Any = None
        self._shape: ModelShape | None = None

    def checkpoint(self, path: str | os.PathLike[str]) -> Checkpoint:
        """The checkpoint at ``path`` (a full model, or an adapter's weights file), its header read once."""
        key = Path(path).resolve()
        if key not in self._checkpoints:
            self._checkpoints[key] = open_checkpoint(path)
        return self._checkpoints[key]

    def close(self) -> None:
        """Let go of the files' handles (and their mapped pages); the headers stay known, and a later
        read of a tensor opens its file again."""
        for ckpt in self._checkpoints.values():
            ckpt.close()

    def adapter(self, path: str | os.PathLike[str]) -> Checkpoint:
        """An adapter dir's weights file, its header read once."""
        return self.checkpoint(adapter_weights_file(Path(path)))

    def config(self, path: str | os.PathLike[str]) -> dict[str, Any] | None:
        """The parsed ``config.json`` of the model dir ``path`` belongs to (None without one), read once."""
        folder = config_dir(path)
        key = (folder or Path(path)).resolve()
        if key not in self._configs:
            self._configs[key] = model_config(path)
        return self._configs[key]

    def label_ids(self, path: str | os.PathLike[str], name: str) -> dict[str, int] | None:
        """label name -> class id for task ``name`` (``supermerge.merge_core.labels.label_ids``), from
        the config read once."""
        names = read_labels(path, name, config=self.config(path)).get(name)
        return {label: int(i) for i, label in names.items()} if names else None

    def base_auto_config(self) -> Any:
        """The base's transformers config (``AutoConfig``), built once; the memory planner sizes the
        activations from it and ``load_model_code`` builds the model's code from it."""
        if self._auto_config is None:
            from transformers import AutoConfig

            folder = config_dir(self.base)
            if folder is None:
                raise ConfigError(
                    f"{self.base}: the memory planner needs the model's config.json beside the weights (layers, "
                    "hidden size, heads) to predict activation memory"
                )
            self._auto_config = AutoConfig.from_pretrained(folder)
        return self._auto_config

    def shape(self) -> ModelShape:
        """The base's tensor sizes (header) and its layers/hidden/heads (``config.json``)."""
        if self._shape is None:
            self._shape = _model_shape(self.checkpoint(self.base), self.base_auto_config(), self.kind,
                                       config_dir(self.base) or self.base)
        return self._shape

    def loaded_values(self, path: str | os.PathLike[str]) -> int:
        """fp32 values a model's loaded task vector holds: N for a full model, the stored size of an
        adapter (from its header)."""
        return self.adapter(path).numel() if is_adapter_dir(path) else self.shape().n_params

    def weight_file_bytes(self, path: str | os.PathLike[str]) -> int:
        """Bytes of a model's weight files (an adapter's adapter file), from the file system."""
        if is_adapter_dir(path):
            return adapter_weights_file(Path(path)).stat().st_size
        ckpt = self.checkpoint(path)
        return sum(f.stat().st_size for f in {ckpt.file_of(n) for n in ckpt.keys()})

    def largest_tensor_bytes(self, path: str | os.PathLike[str]) -> int:
        """Bytes of a checkpoint's largest tensor as stored (its dtype, not fp32)."""
        ckpt = self.checkpoint(path)
        return max(math.prod(ckpt.shape(n)) * ckpt.dtype(n).itemsize for n in ckpt.keys())

    def load_model_code(self) -> None:
        """Import the model's code now, while planning, by building it on the meta device (no weights).

        The first model a process builds imports transformers' modeling code for it, which holds 75-130 MB
        for the rest of the process (BERT, transformers 5). Done here, before the inventory is read, that
        memory is part of what the process already uses when the budget is set, and no merge node's
        measured peak carries it (otherwise only the first node in each process would)."""
        import torch
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

        from supermerge.merge_core.model import _quiet_transformers

        if config_dir(self.base) is None:
            return
        auto = AutoModelForSequenceClassification if self.kind == "classification" else AutoModelForCausalLM
        with torch.device("meta"), _quiet_transformers():
            auto.from_config(self.base_auto_config())


def _config_value(config: Any, names: Sequence[str], what: str, folder: Path) -> int:
    for n in names:
        value = getattr(config, n, None)
        if isinstance(value, int) and value > 0:
            return value
    raise ConfigError(
        f"{folder}/config.json gives no {what} (looked for {list(names)}); the memory planner needs it "
        "to size the activations"
    )


def _model_shape(ckpt: Checkpoint, config: Any, kind: Kind, folder: Path) -> ModelShape:
    names = tuple(mergeable_names(ckpt))
    shapes = tuple(tuple(ckpt.shape(n)) for n in names)
    sizes = [math.prod(shape) for shape in shapes]
    text = getattr(config, "text_config", None) or config
    hidden = _config_value(text, ("hidden_size", "d_model", "n_embd"), "hidden size", folder)
    intermediate_names = ("intermediate_size", "d_ff", "n_inner", "ffn_dim")
    has_intermediate = any(isinstance(getattr(text, n, None), int) for n in intermediate_names)
    return ModelShape(
        n_params=sum(sizes),
        largest_tensor=max(sizes),
        tensor_names=names,
        layers=_config_value(text, ("num_hidden_layers", "num_layers", "n_layer"), "layer count", folder),
        hidden=hidden,
        heads=_config_value(text, ("num_attention_heads", "num_heads", "n_head"), "head count", folder),
        intermediate=(_config_value(text, intermediate_names, "intermediate size", folder)
                      if has_intermediate else 4 * hidden),
        vocab=_config_value(text, ("vocab_size",), "vocabulary size", folder),
        kind=kind,
        tensor_shapes=shapes,
        # transformers' own reading of config.json (its default is True where the file is silent)
        tied_embeddings=kind == "causal_lm" and bool(getattr(config, "tie_word_embeddings", False)),
    )
