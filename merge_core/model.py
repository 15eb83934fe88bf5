"""The functional merged forward: one model skeleton serves every task and every candidate merge.

The skeleton is the base model loaded once (its parameters ARE the base tensors, so the base is held
once: eq. 6's 4 * N_params). A forward substitutes the merged tensors and the task's own head with
``torch.func.functional_call``, so autograd reaches only what the caller made differentiable (the
merge weights W) and no copy of the model per task is made. Classification heads of different widths
share the skeleton because ``nn.Linear`` uses whatever weight it is handed.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call

from supermerge.merge_core.checkpoint import config_dir
from supermerge.merge_core.errors import ConfigError

log = logging.getLogger(__name__)

TaskKind = Literal["classification", "causal_lm"]


@contextlib.contextmanager
def _quiet_transformers():
    """The skeleton's classifier is always replaced by each task's head, so transformers' warning
    that it was newly initialised is noise here."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


class FunctionalModel:
    """A frozen Hugging Face model whose parameters are swapped in per call.

    ``base_names`` are the base checkpoint's tensor names; ``prefix`` is what the skeleton puts before
    them (``"bert."`` for a sequence classifier built on a headless BERT checkpoint).
    """

    def __init__(
        self, base_path: str | Path, kind: TaskKind = "classification", device: str = "cpu"
    ) -> None:
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

        folder = config_dir(base_path)
        if folder is None:
            raise ConfigError(
                f"{base_path}: methods that run the model (learned merges, grid searches, "
                "evaluation) need a Hugging Face model dir with config.json beside the weights"
            )
        auto = AutoModelForSequenceClassification if kind == "classification" else AutoModelForCausalLM
        with _quiet_transformers():
            module = auto.from_pretrained(folder, dtype=torch.float32)
        module.eval().requires_grad_(False).to(device)
        self.module = module
        self.kind: TaskKind = kind
        self.device = torch.device(device)
        self.folder = folder
        skeleton = dict(module.named_parameters())
        prefix = getattr(module, "base_model_prefix", "") + "."
        self._names = skeleton
        self.prefix = prefix if any(n.startswith(prefix) for n in skeleton) else ""

    def skeleton_name(self, base_name: str) -> str:
        """The skeleton's name for a base tensor: a headless checkpoint's names (BERT's ``embeddings...``)
        get the prefix the task model puts before them; a causal LM's checkpoint is the task model
        itself (``model.layers...``), whose names are the skeleton's already."""
        return base_name if base_name in self._names else self.prefix + base_name

    def base_tensor(self, base_name: str) -> Tensor:
        """The base's parameter as the skeleton holds it (no copy)."""
        full = self.skeleton_name(base_name)
        if full not in self._names:
            raise ConfigError(f"the model in {self.folder} has no parameter {full!r}")
        return self._names[full]

    def base_params(self, names: list[str]) -> dict[str, Tensor]:
        return {n: self.base_tensor(n) for n in names}

    def logits(
        self, params: Mapping[str, Tensor], head: Mapping[str, Tensor], inputs: Mapping[str, Tensor]
    ) -> Tensor:
        """Logits of the model with ``params`` (base names) and ``head`` (skeleton names) in place.

        Shapes: classification (batch, n_classes); causal_lm (batch, seq, vocab).
        """
        full = {self.skeleton_name(n): t for n, t in params.items()}
        full.update(head)
        out = functional_call(self.module, full, args=(), kwargs=dict(inputs), strict=False)
        return out.logits


def task_loss(kind: TaskKind, logits: Tensor, labels: Tensor) -> Tensor:
    """Each task's own loss: cross-entropy over classes, or over next tokens for generation."""
    if kind == "classification":
        return F.cross_entropy(logits, labels)
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100
    )


def correct(kind: TaskKind, logits: Tensor, labels: Tensor) -> tuple[int, int]:
    """(right, counted): whole examples for classification, labelled tokens for generation."""
    if kind == "classification":
        return int((logits.argmax(-1) == labels).sum()), len(labels)
    target = labels[:, 1:]
    mask = target != -100
    hits = (logits[:, :-1].argmax(-1) == target) & mask
    return int(hits.sum()), int(mask.sum())


def prediction_entropy(kind: TaskKind, logits: Tensor, inputs: Mapping[str, Tensor]) -> Tensor:
    """Mean Shannon entropy of the predictions (AdaMerging's unsupervised surrogate loss)."""
    logp = F.log_softmax(logits, dim=-1)
    ent = -(logp.exp() * logp).sum(-1)
    if kind == "causal_lm" and "attention_mask" in inputs:
        mask = inputs["attention_mask"].to(ent.dtype)
        return (ent * mask).sum() / mask.sum().clamp(min=1)
    return ent.mean()


def load_model_code(base_path: str | Path, kind: TaskKind = "classification") -> None:
    """Import the Hugging Face model code for ``base_path``'s architecture by building its skeleton on
    the meta device (no tensor memory). A fresh process that runs one merge node (a worker's) would
    otherwise load that code, some 160 MB of Python modules for a BERT, the first time the node builds
    its model: inside the node's measured peak, though it is no part of the node's work and the
    planner does not predict it. A base without config.json is left alone (``FunctionalModel`` says why)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    folder = config_dir(base_path)
    if folder is None:
        return
    auto = AutoModelForSequenceClassification if kind == "classification" else AutoModelForCausalLM
    with _quiet_transformers(), torch.device("meta"):
        auto.from_config(AutoConfig.from_pretrained(folder))
