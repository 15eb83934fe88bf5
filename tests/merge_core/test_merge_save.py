"""A merge saved to disk is the merge in memory: it loads with transformers and gives the same outputs."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModel, AutoModelForSequenceClassification

from supermerge.merge_core.checkpoint import open_checkpoint
from supermerge.merge_core.merge import merge, save_result
from supermerge.merge_core.model import FunctionalModel
from supermerge.merge_core.task_vectors import load_task_vector
from tests.tiny import make_task_data

TASKS = ("alpha", "beta")


@pytest.fixture(scope="module")
def vectors(tiny_base_dir, tiny_finetuned):
    with open_checkpoint(tiny_base_dir) as base:
        return [load_task_vector(base, tiny_finetuned[t], name=t) for t in TASKS]


@pytest.fixture(scope="module")
def val():
    return {t: make_task_data(t, 32, seed=10 + i) for i, t in enumerate(TASKS)}


def test_saved_supermerge_loads_with_transformers_and_matches_in_memory(tiny_base_dir, vectors, val, tmp_path):
    result = merge(tiny_base_dir, vectors, "supermerge", params={"steps": 5}, val=val)
    out = save_result(result, tmp_path / "merged", base_path=tiny_base_dir, models={t: t for t in TASKS})

    encoder = AutoModel.from_pretrained(out)
    for n, p in encoder.state_dict().items():
        assert torch.equal(p, result.tensors[n]), n

    fm = FunctionalModel(tiny_base_dir)
    params = {n: t for n, t in result.tensors.items() if t.is_floating_point()}
    batch = val["alpha"].take(torch.arange(8))
    for task in TASKS:
        head = load_file(out / "heads" / f"{task}.safetensors")
        clf = AutoModelForSequenceClassification.from_pretrained(out, num_labels=2)
        clf.load_state_dict(head, strict=False)
        clf.eval()
        with torch.no_grad():
            from_disk = clf(**batch.inputs).logits
            in_memory = fm.logits(params, result.heads[task], batch.inputs)
        assert torch.allclose(from_disk, in_memory, atol=1e-5), task

    record = json.loads((out / "supermerge.json").read_text())
    assert record["method"] == "supermerge" and record["tasks"] == list(TASKS)
    assert record["params"]["steps"] == 5 and record["params"]["transform"] == "tanh"
    w = load_file(out / "merge_weights.safetensors")
    assert w["weights"].shape == (2, len(params)) and torch.allclose(w["coefficients"], torch.tanh(w["weights"]))


def test_merged_model_can_be_merged_again_with_its_heads(tiny_base_dir, vectors, tmp_path):
    result = merge(tiny_base_dir, vectors, "task_arithmetic", params={"lam": 0.5})
    out = save_result(result, tmp_path / "m", base_path=tiny_base_dir, models={t: t for t in TASKS})
    with open_checkpoint(tiny_base_dir) as base:
        again = load_task_vector(base, out, name="node")
    assert again.tasks == list(TASKS)
    n = "encoder.layer.0.output.dense.weight"
    expected = 0.5 * (vectors[0].deltas[n] + vectors[1].deltas[n])
    assert torch.allclose(again.deltas[n], expected, atol=1e-6)
    for t in TASKS:
        assert torch.equal(again.heads[t]["classifier.weight"], result.heads[t]["classifier.weight"])


def test_grid_search_picks_the_best_lambda_on_validation(tiny_base_dir, vectors, val):
    result = merge(tiny_base_dir, vectors, "task_arithmetic", params={"search": True}, val=val)
    assert len(result.search) == 10
    best = max(result.search, key=lambda r: (r["val_accuracy"], -r["val_loss"]))
    assert result.params["lam"] == best["lam"]
    assert result.val_accuracy and set(result.val_accuracy) == set(TASKS)


def test_integer_buffers_are_copied_from_the_base(tiny_base_dir, vectors):
    result = merge(tiny_base_dir, vectors, "average")
    with open_checkpoint(tiny_base_dir) as base:
        for n in base.keys():
            assert result.tensors[n].dtype == base.dtype(n)
            if not base.dtype(n).is_floating_point:
                assert torch.equal(result.tensors[n], base.get(n))


@pytest.mark.parametrize(("method", "grid"), [
    ("task_arithmetic", {"lam": [0.3, 0.7]}),
    ("ties", {"density": [0.2, 0.5], "lam": [0.8, 1.5]}),
    ("dare_ta", {"density": [0.5, 0.1], "lam": [0.3, 1.0]}),
    ("dare_ties", {"density": [0.5], "lam": [0.5, 1.0]}),
])
def test_grid_search_result_is_bit_identical_to_merging_with_the_chosen_parameters(
    tiny_base_dir, vectors, val, method, grid
):
    """The grid computes trims/masks once per non-scale setting and rescales; that shortcut must give
    exactly the tensors the method gives when called with the winning parameters."""
    searched = merge(tiny_base_dir, vectors, method, params=grid, val=val, seed=3)
    assert len(searched.search) == math.prod(len(v) for v in grid.values())
    fixed = merge(tiny_base_dir, vectors, method, params=searched.params, seed=3)
    for name, tensor in fixed.tensors.items():
        assert torch.equal(searched.tensors[name], tensor), name


def test_a_left_out_parameter_takes_the_default_and_never_searches(tiny_base_dir, vectors, val):
    # no silent grid search: TIES with only density takes lambda = 1 (as mergekit), even with validation data
    result = merge(tiny_base_dir, vectors, "ties", params={"density": 0.5}, val=val)
    assert result.search == [] and result.params == {"density": 0.5, "lam": 1.0}
    listed = merge(tiny_base_dir, vectors, "ties", params={"density": 0.5, "lambda": [0.5, 1.0]}, val=val)
    assert [c["lam"] for c in listed.search] == [0.5, 1.0]
