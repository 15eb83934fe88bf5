"""Streaming task-vector similarity: equals the dense cosine, holds one tensor per model at a time."""

from __future__ import annotations

import weakref
from pathlib import Path

import numpy as np
import pytest
import torch

from supermerge.merge_core.checkpoint import Checkpoint, open_checkpoint
from supermerge.merge_core.errors import ConfigError, TaskVectorError
from supermerge.merge_core.task_vectors import load_task_vector, match_names, mergeable_names
from supermerge.orchestrator.similarity import (
    CheckpointDeltas,
    approximation_error,
    similarity_from_sources,
    task_vector_similarity,
)
from tests.tiny import make_finetuned

TASKS = ("pa", "pb", "qa")
"""Two of one family and one of another (conftest), so the cosines are not all alike."""


@pytest.fixture()
def task_models(family_models) -> dict[str, Path]:
    return {t: family_models[t]["path"] for t in TASKS}


def _dense_cosine(base_dir: Path, paths: dict[str, Path]) -> np.ndarray:
    """The reference: whole task vectors flattened and concatenated, cosine in float64."""
    with open_checkpoint(base_dir) as base:
        names = mergeable_names(base)
        flat = []
        for t, p in paths.items():
            tv = load_task_vector(base, p, name=t)
            flat.append(torch.cat([tv.deltas[n].reshape(-1) if isinstance(tv.deltas.get(n), torch.Tensor)
                                   else tv.deltas[n].dense(base.get(n)).reshape(-1) if n in tv.deltas
                                   else torch.zeros(base.get(n).numel()) for n in names]).double())
    x = torch.stack(flat)
    x = x / x.norm(dim=1, keepdim=True)
    return (x @ x.T).numpy()


def test_streaming_cosine_equals_dense_cosine(tiny_base_dir, task_models):
    paths = {t: task_models[t] for t in TASKS}
    sim = task_vector_similarity(tiny_base_dir, paths)
    assert sim.names == list(TASKS) and sim.fraction == 1.0
    np.testing.assert_allclose(sim.cosine, _dense_cosine(tiny_base_dir, paths), atol=1e-9)
    np.testing.assert_allclose(np.diag(sim.cosine), 1.0, atol=1e-12)
    with open_checkpoint(tiny_base_dir) as base:
        assert sim.tensors == len(mergeable_names(base))


def test_adapter_similarity_uses_its_dense_delta(tiny_base_dir, task_models, tmp_path):
    lora = make_finetuned(tiny_base_dir, "beta", tmp_path / "lora", lora_rank=4, seed=3, epochs=4.0)
    paths = {"pa": task_models["pa"], "lora": lora}
    sim = task_vector_similarity(tiny_base_dir, paths)
    np.testing.assert_allclose(sim.cosine, _dense_cosine(tiny_base_dir, paths), atol=1e-9)


class _WatchedCheckpoint:
    """Delegates to a real checkpoint and records how many tensors it handed out are still alive
    whenever another one is asked for."""

    def __init__(self, inner: Checkpoint) -> None:
        self.inner = inner
        self.path = inner.path
        self.alive: list[weakref.ref] = []
        self.most_alive = 0
        self.reads = 0

    def keys(self):
        return self.inner.keys()

    def __contains__(self, name):
        return name in self.inner

    def shape(self, name):
        return self.inner.shape(name)

    def dtype(self, name):
        return self.inner.dtype(name)

    def get(self, name):
        self.alive = [r for r in self.alive if r() is not None]
        tensor = self.inner.get(name)
        self.alive.append(weakref.ref(tensor))
        self.most_alive = max(self.most_alive, len(self.alive))
        self.reads += 1
        return tensor


def test_streaming_holds_one_tensor_per_model_at_a_time(tiny_base_dir, task_models):
    with open_checkpoint(tiny_base_dir) as raw_base:
        base = _WatchedCheckpoint(raw_base)
        models = {t: _WatchedCheckpoint(open_checkpoint(task_models[t])) for t in TASKS}
        sources = {t: CheckpointDeltas(m, match_names(raw_base, m.inner)) for t, m in models.items()}
        sim = similarity_from_sources(base, sources)
        n_tensors = len(mergeable_names(raw_base))
    assert base.most_alive == 1 and base.reads == n_tensors
    for m in models.values():
        assert m.most_alive == 1, "a model's previous tensor was still held when the next was read"
        assert m.reads == n_tensors
    np.testing.assert_allclose(sim.cosine, task_vector_similarity(tiny_base_dir, {t: task_models[t] for t in TASKS}).cosine)


def test_subsampling_and_tensor_subset_are_measured_against_exact(tiny_base_dir, task_models):
    paths = {t: task_models[t] for t in TASKS}
    exact = task_vector_similarity(tiny_base_dir, paths)
    sampled = task_vector_similarity(tiny_base_dir, paths, fraction=0.3, seed=1)
    error = approximation_error(exact, sampled)
    assert 0 < error < 0.1
    assert approximation_error(exact, task_vector_similarity(tiny_base_dir, paths, fraction=0.3, seed=1)) == error
    assert approximation_error(exact, exact) == 0.0
    subset = task_vector_similarity(tiny_base_dir, paths, include=r"encoder\.layer\.0\.")
    assert subset.tensors < exact.tensors
    assert approximation_error(exact, subset) > 0


def test_bad_options_and_a_zero_task_vector_are_refused(tiny_base_dir, task_models):
    paths = {t: task_models[t] for t in TASKS[:2]}
    with pytest.raises(ConfigError, match="fraction"):
        task_vector_similarity(tiny_base_dir, paths, fraction=0.0)
    with pytest.raises(ConfigError, match="matches none"):
        task_vector_similarity(tiny_base_dir, paths, include="no-such-tensor")
    with pytest.raises(TaskVectorError, match=r"\['same'\] is zero"):
        task_vector_similarity(tiny_base_dir, {**paths, "same": tiny_base_dir})
