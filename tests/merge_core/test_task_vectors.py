"""Task vectors of full fine-tunes: the difference itself, and every way a model can fail to fit."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import BertForSequenceClassification

from supermerge.merge_core.checkpoint import open_checkpoint
from supermerge.merge_core.errors import CheckpointError, TaskVectorError
from supermerge.merge_core.task_vectors import load_task_vector, mergeable_names, stack_deltas
from tests.tiny import tiny_config


def _copy_ft(src: Path, dst: Path, edit) -> Path:
    """A copy of a fine-tuned model dir whose tensors went through ``edit``."""
    dst.mkdir()
    tensors = load_file(src / "model.safetensors")
    edit(tensors)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    (dst / "config.json").write_text((src / "config.json").read_text())
    return dst


def test_task_vector_is_finetuned_minus_base_with_prefix_and_head(tiny_base_dir, tiny_finetuned):
    ft_tensors = load_file(tiny_finetuned["alpha"] / "model.safetensors")
    with open_checkpoint(tiny_base_dir) as base:
        tv = load_task_vector(base, tiny_finetuned["alpha"], name="alpha")
        names = mergeable_names(base)
        assert set(tv.deltas) == set(names)
        assert "embeddings.position_ids" not in names or base.dtype("embeddings.position_ids").is_floating_point
        for n in names:
            expected = ft_tensors["bert." + n].float() - base.get(n).float()
            assert torch.equal(tv.deltas[n], expected), n
        assert sum(float(d.abs().sum()) for d in tv.deltas.values()) > 0, "fine-tuning changed nothing?"
    assert tv.tasks == ["alpha"]
    assert set(tv.heads["alpha"]) == {"classifier.weight", "classifier.bias"}
    assert torch.equal(tv.heads["alpha"]["classifier.weight"], ft_tensors["classifier.weight"])


def test_stack_deltas_puts_models_on_the_first_axis(tiny_base_dir, tiny_finetuned):
    with open_checkpoint(tiny_base_dir) as base:
        tvs = [load_task_vector(base, tiny_finetuned[t], name=t) for t in ("alpha", "beta")]
        n = "encoder.layer.0.attention.self.query.weight"
        stacked = stack_deltas(base.get(n), tvs, n)
    assert stacked.shape == (2, 32, 32)
    assert torch.equal(stacked[1], tvs[1].deltas[n])


def test_shape_mismatch_names_file_and_tensor(tiny_base_dir, tmp_path):
    other = BertForSequenceClassification(tiny_config(intermediate_size=48), )
    other.save_pretrained(tmp_path / "other")
    with open_checkpoint(tiny_base_dir) as base, pytest.raises(TaskVectorError) as e:
        load_task_vector(base, tmp_path / "other", name="x")
    msg = str(e.value)
    assert str(tmp_path / "other") in msg and "intermediate.dense.weight" in msg and "(48, 32)" in msg


def test_nan_names_the_tensor(tiny_base_dir, tiny_finetuned, tmp_path):
    def poison(t):
        t["bert.encoder.layer.1.output.dense.weight"][0, 0] = float("nan")

    bad = _copy_ft(tiny_finetuned["alpha"], tmp_path / "nan", poison)
    with open_checkpoint(tiny_base_dir) as base, pytest.raises(TaskVectorError, match="output.dense.weight.*NaN"):
        load_task_vector(base, bad, name="x")


def test_unknown_extra_tensor_is_reported_with_the_fix(tiny_base_dir, tiny_finetuned, tmp_path):
    bad = _copy_ft(tiny_finetuned["alpha"], tmp_path / "extra", lambda t: t.update(extra_proj=torch.zeros(2)))
    with open_checkpoint(tiny_base_dir) as base, pytest.raises(TaskVectorError, match="extra_proj.*head_prefixes"):
        load_task_vector(base, bad, name="x")


def test_missing_tensor_and_dtype_mismatch_are_listed_together(tiny_base_dir, tiny_finetuned, tmp_path):
    def edit(t):
        del t["bert.pooler.dense.bias"]
        t["bert.embeddings.LayerNorm.weight"] = t["bert.embeddings.LayerNorm.weight"].half()

    bad = _copy_ft(tiny_finetuned["alpha"], tmp_path / "two", edit)
    with open_checkpoint(tiny_base_dir) as base, pytest.raises(TaskVectorError) as e:
        load_task_vector(base, bad, name="x")
    assert "2 problems" in str(e.value) and "pooler.dense.bias" in str(e.value) and "float16" in str(e.value)


def test_missing_model_is_a_checkpoint_error(tiny_base_dir, tmp_path):
    with open_checkpoint(tiny_base_dir) as base, pytest.raises(CheckpointError, match="does not exist"):
        load_task_vector(base, tmp_path / "nowhere", name="x")
