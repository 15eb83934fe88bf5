"""Pairwise cosine similarity of task vectors, streamed tensor by tensor.

``cos(i, j) = <tau_i, tau_j> / (|tau_i| |tau_j|)`` over every mergeable tensor of the base. The dot
products and squared norms are sums over tensors, so they are accumulated one tensor at a time: at any
moment only one tensor of each model (k tensors) is in memory, never two whole task vectors. That keeps
the similarity pass cheap next to the merge itself (the paper clusters 11 T5-3B models this way).

For speed, each tensor can be subsampled (``fraction``: a seeded random subset of its coordinates,
reweighted so each tensor counts by its full size) or restricted to tensors whose name matches
``include``; ``approximation_error`` measures what either costs against the exact matrix.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from supermerge.merge_core.adapters import AdapterTaskVector, is_adapter_dir, load_adapter_task_vector
from supermerge.merge_core.checkpoint import Checkpoint, open_checkpoint
from supermerge.merge_core.deltas import dense_delta
from supermerge.merge_core.errors import ConfigError, TaskVectorError
from supermerge.merge_core.merge import tensor_seed
from supermerge.merge_core.task_vectors import DEFAULT_HEAD_PREFIXES, NameMap, match_names, mergeable_names

log = logging.getLogger(__name__)

CHUNK_VALUES = 1 << 22
"""Values per row multiplied at once in float64 (k * 4M * 8 bytes), so a huge embedding matrix never
needs a float64 copy of all k rows."""


class DeltaSource(Protocol):
    """One model's task vector, read one base tensor at a time."""

    def delta(self, name: str, base_tensor: Tensor) -> Tensor | None:
        """fp32 delta for base tensor ``name`` (shape of ``base_tensor``), or None where it is zero."""
        ...


@dataclass
class CheckpointDeltas:
    """A full fine-tune: ``theta_f - theta_p`` read from its checkpoint when asked."""

    checkpoint: Checkpoint
    names: NameMap

    def delta(self, name: str, base_tensor: Tensor) -> Tensor | None:
        ft_name = self.names.prefix + name
        tuned = self.checkpoint.get(ft_name).to(torch.float32)
        if not torch.isfinite(tuned).all():
            raise TaskVectorError(f"{self.checkpoint.path}: tensor {ft_name!r} holds NaN or Inf; the model is broken")
        return tuned - base_tensor


@dataclass
class AdapterDeltas:
    """A PEFT adapter: compact deltas held whole (they are small), made dense one tensor at a time."""

    adapter: AdapterTaskVector

    def delta(self, name: str, base_tensor: Tensor) -> Tensor | None:
        d = self.adapter.deltas.get(name)
        return None if d is None else dense_delta(d, base_tensor)


@dataclass(frozen=True)
class Similarity:
    """Cosine similarity of k task vectors.

    ``cosine``: (k, k), rows in the order of ``names``; ``norms``: (k,) L2 norm of each task vector
    over the tensors compared; ``tensors``: how many base tensors were compared; ``fraction``: share
    of each tensor's coordinates used (1.0: exact).
    """

    names: list[str]
    cosine: np.ndarray
    norms: np.ndarray
    tensors: int
    fraction: float

    def distance(self) -> np.ndarray:
        """``1 - cosine``, symmetric with a zero diagonal (what the clustering takes)."""
        d = 1.0 - (self.cosine + self.cosine.T) / 2.0
        np.fill_diagonal(d, 0.0)
        return np.clip(d, 0.0, 2.0)

    def to_dict(self) -> dict[str, object]:
        return {
            "names": list(self.names),
            "cosine": np.round(self.cosine, 6).tolist(),
            "norms": np.round(self.norms, 6).tolist(),
            "tensors": self.tensors,
            "fraction": self.fraction,
        }


def _selected(base: Checkpoint, include: str | None) -> list[str]:
    names = mergeable_names(base)
    if include is None:
        return names
    try:
        pattern = re.compile(include)
    except re.error as e:
        raise ConfigError(f"similarity include pattern {include!r} is not a valid regex: {e}") from None
    chosen = [n for n in names if pattern.search(n)]
    if not chosen:
        raise ConfigError(
            f"similarity include pattern {include!r} matches none of the base's {len(names)} tensors "
            f"(e.g. {names[:3]})"
        )
    return chosen


def _sample_index(name: str, numel: int, fraction: float, seed: int) -> Tensor | None:
    """Seeded coordinates of one tensor (with replacement), or None to use all of them."""
    if fraction >= 1.0:
        return None
    m = max(1, math.ceil(fraction * numel))
    g = torch.Generator().manual_seed(tensor_seed(seed, name))
    return torch.randint(0, numel, (m,), generator=g)


def similarity_from_sources(
    base: Checkpoint,
    sources: Mapping[str, DeltaSource],
    *,
    fraction: float = 1.0,
    include: str | None = None,
    seed: int = 0,
    progress: bool = False,
) -> Similarity:
    """Cosine similarity of the task vectors ``sources`` give, streaming over ``base``'s tensors.

    Per base tensor, each source's delta is read once (k tensors held), flattened, optionally
    subsampled, and its Gram matrix added in float64, chunk by chunk.
    """
    if not 0.0 < fraction <= 1.0:
        raise ConfigError(f"similarity fraction must lie in (0, 1], got {fraction}")
    names = list(sources)
    if len(names) < 2:
        raise ConfigError(f"similarity needs at least 2 models, got {len(names)}")
    k = len(names)
    gram = torch.zeros(k, k, dtype=torch.float64)
    tensor_names = _selected(base, include)
    for tensor_name in tqdm(tensor_names, desc="task-vector similarity", disable=not progress, leave=False):
        base_tensor = base.get(tensor_name).to(torch.float32)
        numel = base_tensor.numel()
        index = _sample_index(tensor_name, numel, fraction, seed)
        rows: list[Tensor | None] = []
        for model in names:
            delta = sources[model].delta(tensor_name, base_tensor)
            if delta is not None:
                delta = delta.reshape(-1)
                delta = delta if index is None else delta[index]
            rows.append(delta)
        width = numel if index is None else len(index)
        scale = 1.0 if index is None else numel / width
        for start in range(0, width, CHUNK_VALUES):
            stop = min(start + CHUNK_VALUES, width)
            chunk = torch.stack([
                torch.zeros(stop - start, dtype=torch.float64) if r is None else r[start:stop].to(torch.float64)
                for r in rows
            ])
            gram += (chunk @ chunk.T) * scale
            del chunk
        del rows, base_tensor
    norms = gram.diagonal().sqrt()
    zero = [names[i] for i in range(k) if norms[i] == 0]
    if zero:
        raise TaskVectorError(
            f"the task vector of {zero} is zero on the {len(tensor_names)} tensors compared: the model "
            "equals the base there; drop it from the config (merging it changes nothing)"
        )
    cosine = gram / torch.outer(norms, norms)
    return Similarity(names, cosine.clamp(-1.0, 1.0).numpy(), norms.numpy(), len(tensor_names), fraction)


def task_vector_similarity(
    base_path: str | os.PathLike[str],
    models: Mapping[str, str | os.PathLike[str]],
    *,
    head_prefixes: Sequence[str] = DEFAULT_HEAD_PREFIXES,
    fraction: float = 1.0,
    include: str | None = None,
    seed: int = 0,
    progress: bool = False,
    open_model: Callable[[str | os.PathLike[str]], Checkpoint] = open_checkpoint,
) -> Similarity:
    """Cosine similarity of the task vectors of ``models`` (name -> fine-tuned dir/file or adapter dir).

    Every model's headers are checked against the base first (one error listing all problems);
    adapters are loaded compact and made dense per tensor. ``open_model`` opens a checkpoint (a plan
    passes its ``ModelInventory.checkpoint``, whose headers are already read).
    """
    with open_model(base_path) as base:
        opened: list[Checkpoint] = []
        try:
            sources: dict[str, DeltaSource] = {}
            for name, path in models.items():
                if is_adapter_dir(path):
                    sources[name] = AdapterDeltas(load_adapter_task_vector(Path(path), base))
                    continue
                ckpt = open_model(path)
                opened.append(ckpt)
                sources[name] = CheckpointDeltas(ckpt, match_names(base, ckpt, head_prefixes))
            return similarity_from_sources(
                base, sources, fraction=fraction, include=include, seed=seed, progress=progress
            )
        finally:
            for ckpt in opened:
                ckpt.close()


def approximation_error(exact: Similarity, approx: Similarity) -> float:
    """Largest absolute difference between two similarity matrices of the same models."""
    if exact.names != approx.names:
        raise ConfigError(f"the two similarities cover different models: {exact.names} vs {approx.names}")
    return float(np.abs(exact.cosine - approx.cosine).max())
