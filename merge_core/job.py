"""The I/O around a merge: tokenizer, validation/test data, task vectors, model parameters, scoring.

The node runner (supermerge.orchestrator.node) loads a node's inputs with these, and ``supermerge evaluate`` and
the benchmark score models with them; no orchestration here.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from supermerge.merge_core.checkpoint import Checkpoint, config_dir, file_sha256, open_checkpoint
from supermerge.merge_core.config import MergeConfig, ModelEntry
from supermerge.merge_core.data import TaskData, load_task_data
from supermerge.merge_core.deltas import dense_delta
from supermerge.merge_core.devices import resolve_device
from supermerge.merge_core.errors import DataError
from supermerge.merge_core.evaluate import evaluate
from supermerge.merge_core.labels import label_ids
from supermerge.merge_core.merge import MergeResult
from supermerge.merge_core.model import FunctionalModel
from supermerge.merge_core.task_vectors import TaskVector, load_task_vector, match_names, mergeable_names

log = logging.getLogger(__name__)


def load_tokenizer(base: str | os.PathLike[str]):
    """The base model's tokenizer, needed only when data is given as text (JSONL)."""
    from transformers import AutoTokenizer

    folder = config_dir(base)
    if folder is None:
        return None
    has_tokenizer = any((folder / f).is_file() for f in ("tokenizer.json", "vocab.txt", "tokenizer.model"))
    return AutoTokenizer.from_pretrained(folder) if has_tokenizer else None


def load_split(
    entries: Sequence[ModelEntry], split: str, tokenizer, max_length: int
) -> dict[str, TaskData]:
    """``validation`` or ``test`` data of every model that has it, keyed by model (task) name; labels
    given by name are mapped through that model's ``id2label`` (``supermerge.merge_core.labels``)."""
    out = {}
    for m in entries:
        path = getattr(m, split)
        if path is not None:
            out[m.name] = load_task_data(path, tokenizer, max_length, label_ids(m.path, m.name))
    return out


class DataCache:
    """The data files of one run, each read and tokenised once: planning reads every task's validation
    and test data to check it, each merge node trains on its subtree's validation data, and the run
    scores the root on the test data. Kept by (file, its sha256, the base whose tokenizer reads it,
    max_length, label ids), so a file changed during the run is read again (and the node's data
    digest refuses it). Thread-safe: the parallel executor's nodes share one."""

    def __init__(self) -> None:
        self._data: dict[tuple[Any, ...], TaskData] = {}
        self._tokenizers: dict[Path, Any] = {}
        self._lock = threading.Lock()

    def tokenizer(self, base: str | os.PathLike[str]):
        """``load_tokenizer(base)``, loaded once per base folder."""
        key = Path(base).resolve()
        with self._lock:
            if key not in self._tokenizers:
                self._tokenizers[key] = load_tokenizer(base)
            return self._tokenizers[key]

    def load(self, path: str | os.PathLike[str], base: str | os.PathLike[str], max_length: int,
             label_ids: Mapping[str, int] | None = None) -> TaskData:
        """``load_task_data(path, base's tokenizer, max_length, label_ids)``, read once per run."""
        f = Path(path)
        try:
            digest = file_sha256(f) if f.is_file() else None
        except OSError:
            digest = None  # unreadable: load_task_data below says why, naming the file
        key = (str(f.resolve()), digest, str(Path(base).resolve()), max_length, tuple(sorted((label_ids or {}).items())))
        with self._lock:
            known = self._data.get(key)
        if known is not None:
            return known
        data = load_task_data(path, self.tokenizer(base), max_length, label_ids)
        with self._lock:
            return self._data.setdefault(key, data)

    def split(self, entries: Sequence[ModelEntry], split: str, base: str | os.PathLike[str], max_length: int,
              labels: Mapping[str, Mapping[str, int] | None] | None = None) -> dict[str, TaskData]:
        """``validation`` or ``test`` data of every model that has it (``load_split``); ``labels``: each
        task's label ids when the caller read them already (else read from the model)."""
        out = {}
        for m in entries:
            path = getattr(m, split)
            if path is not None:
                ids = labels[m.name] if labels is not None and m.name in labels else label_ids(m.path, m.name)
                out[m.name] = self.load(path, base, max_length, ids)
        return out


def load_task_vectors(
    base: Checkpoint,
    entries: Sequence[ModelEntry],
    *,
    head_prefixes: Sequence[str],
    progress: bool = False,
    each: Callable[[TaskVector], TaskVector] | None = None,
) -> list[TaskVector]:
    """Task vectors of every model; headers of all of them are checked before any tensor is read.
    ``each`` turns every task vector into the form it is kept in as soon as it is loaded (e.g.
    compressed, ``merge.input_compressor``), so the dense form of only one is held at a time."""
    from supermerge.merge_core.adapters import is_adapter_dir

    for m in entries:
        if not is_adapter_dir(m.path):
            with open_checkpoint(m.path) as ft:
                match_names(base, ft, head_prefixes)
    bar = tqdm(entries, desc="loading task vectors", disable=not progress, leave=False, unit="model")
    out = []
    for m in bar:
        vector = load_task_vector(base, m.path, name=m.name, head_prefixes=head_prefixes)
        out.append(vector if each is None else each(vector))
        del vector
    return out


def model_params(base: Checkpoint, vector: TaskVector | None, names: Sequence[str]) -> dict[str, Tensor]:
    """``theta_p + tau`` for one model (the base itself when ``vector`` is None), fp32."""
    out = {}
    for n in names:
        b = base.get(n).to(torch.float32)
        delta = None if vector is None else vector.deltas.get(n)
        out[n] = b if delta is None else b + dense_delta(delta, b)
    return out


def score_result(model: FunctionalModel, result: MergeResult, data: Mapping[str, TaskData]) -> dict[str, float]:
    """Accuracy of an in-memory merge on each task's data, each task with its own head."""
    names = [n for n, t in result.tensors.items() if t.is_floating_point()]
    params = {n: result.tensors[n].to(model.device, torch.float32) for n in names}
    heads = {t: {n: x.to(model.device) for n, x in h.items()} for t, h in result.heads.items()}
    return evaluate(model, params, heads, {t: d for t, d in data.items() if t in heads})


def score_models(
    config: MergeConfig,
    models: Mapping[str, str | os.PathLike[str] | None],
    *,
    progress: bool = False,
    data: DataCache | None = None,
) -> dict[str, dict[str, float]]:
    """Test accuracy of each named model on every task it has a head for (``data``: the run's data
    files, when they were read already).

    ``models`` maps a row name to a model path (a merged dir, a fine-tuned model, an adapter) or None
    for the pretrained base, which is scored with each task's own fine-tuned head. The special row
    ``individual`` scores every task's own fine-tuned model on its task (the upper bound).
    """
    device = resolve_device(config.device)
    test = (data if data is not None else DataCache()).split(config.models, "test", config.base, config.max_length)
    if not test:
        raise DataError("no model in the config has test data; add 'test:' files to score models")
    model = FunctionalModel(config.base, config.kind, device)
    results: dict[str, dict[str, float]] = {}
    with open_checkpoint(config.base) as base:
        names = mergeable_names(base)
        own = {m.name: load_task_vector(base, m.path, name=m.name, head_prefixes=config.head_prefixes)
               for m in config.models if m.name in test}
        rows = tqdm(models.items(), desc="evaluating", disable=not progress, leave=False, unit="model")
        for row, path in rows:
            if row == "individual" and path is None:
                results[row] = {
                    t: _accuracy(model, model_params(base, tv, names), tv.heads, {t: test[t]})[t]
                    for t, tv in own.items()
                }
                continue
            vector = None if path is None else load_task_vector(
                base, path, name=row, head_prefixes=config.head_prefixes
            )
            heads = {t: h for tv in own.values() for t, h in tv.heads.items()}
            if vector is not None and vector.heads:
                heads.update({t: h for t, h in vector.heads.items() if t in test})
            results[row] = _accuracy(model, model_params(base, vector, names), heads, test)
    return results


def _accuracy(
    model: FunctionalModel,
    params: Mapping[str, Tensor],
    heads: Mapping[str, Mapping[str, Tensor]],
    data: Mapping[str, TaskData],
) -> dict[str, float]:
    on_device = {n: t.to(model.device) for n, t in params.items()}
    heads_dev = {t: {n: x.to(model.device) for n, x in h.items()} for t, h in heads.items() if t in data}
    return evaluate(model, on_device, heads_dev, {t: d for t, d in data.items() if t in heads_dev})
