"""Adapter task vectors against PEFT's own merge: what ``merge_and_unload`` adds to the base is
exactly the dense form of every delta we read, and nothing else changes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import IA3Config, LoKrConfig, LoraConfig, PeftConfig, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForSequenceClassification, BertModel, GPT2Config, GPT2Model
from transformers.utils import logging as hf_logging

from supermerge.merge_core.adapters import AdapterTaskVector, is_adapter_dir, load_adapter_task_vector
from supermerge.merge_core.checkpoint import open_checkpoint
from supermerge.merge_core.deltas import LowRankDelta, ScaleDelta, dense_delta
from supermerge.merge_core.errors import TaskVectorError
from supermerge.merge_core.task_vectors import load_task_vector
from tests.tiny import tiny_config

ADAPTER_FILE = "adapter_model.safetensors"


pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


@pytest.fixture(autouse=True, scope="module")
def _quiet():
    """Loading a headless base into a classifier reports the fresh head; that is expected here."""
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    yield
    hf_logging.set_verbosity(level)


def make_adapter(
    base_dir: Path, out: Path, config: PeftConfig, seed: int = 1, model_cls=AutoModelForSequenceClassification
) -> dict[str, torch.Tensor]:
    """Train-like random adapter on ``base_dir`` saved to ``out``; returns PEFT's merged state dict.

    Every trainable tensor (LoRA factors, IA3 vectors, the modules_to_save copies) is moved away from
    its init, since a zero LoRA B or a unit IA3 vector would make every comparison trivially pass.
    """
    torch.manual_seed(seed)
    kwargs = {"num_labels": 2} if model_cls is AutoModelForSequenceClassification else {}
    model = model_cls.from_pretrained(base_dir, **kwargs)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn_like(p))
    peft_model.save_pretrained(out)
    return {k: v.detach().clone() for k, v in peft_model.merge_and_unload().state_dict().items()}


def assert_matches_peft_merge(
    base_dir: Path, adapter_dir: Path, merged: dict[str, torch.Tensor], prefix: str
) -> AdapterTaskVector:
    """Every base tensor: ours dense == merged - base where we have a delta, merged == base elsewhere."""
    with open_checkpoint(base_dir) as base:
        adapter = load_adapter_task_vector(adapter_dir, base)
        changed = []
        for n in base.keys():
            base_tensor = base.get(n)
            if n in adapter.deltas:
                expected = merged[prefix + n].float() - base_tensor.float()
                ours = dense_delta(adapter.deltas[n], base_tensor)
                assert ours.dtype == torch.float32
                torch.testing.assert_close(ours, expected, rtol=0, atol=2e-6, msg=n)
                changed.append(n)
            else:
                assert torch.equal(merged[prefix + n], base_tensor), f"{n} changed but has no delta"
    assert changed, "the adapter changed nothing?"
    return adapter


@pytest.fixture(scope="module")
def lora_adapter(tiny_base_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("lora") / "adapter"
    config = LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["query", "value"])
    return out, make_adapter(tiny_base_dir, out, config)


LORA_CONFIGS = {
    "rslora+all-linear+embeddings": dict(
        r=4, lora_alpha=8, use_rslora=True, target_modules=["query", "key", "dense", "word_embeddings"]
    ),
    "rank-and-alpha-pattern": dict(
        r=4, lora_alpha=8, target_modules=["query", "value"],
        rank_pattern={"layer.0.attention.self.query": 2, "value": 6}, alpha_pattern={"value": 3},
    ),
}


@pytest.mark.parametrize("options", LORA_CONFIGS.values(), ids=LORA_CONFIGS.keys())
def test_lora_delta_equals_peft_merge(tiny_base_dir, tmp_path, options):
    merged = make_adapter(tiny_base_dir, tmp_path / "a", LoraConfig(task_type="SEQ_CLS", **options))
    adapter = assert_matches_peft_merge(tiny_base_dir, tmp_path / "a", merged, "bert.")
    assert adapter.kind == "lora"
    assert all(isinstance(d, LowRankDelta) for d in adapter.deltas.values())
    if "rank_pattern" in options:
        ranks = {n: d.A.shape[0] for n, d in adapter.deltas.items()}
        assert ranks["encoder.layer.0.attention.self.query.weight"] == 2
        assert ranks["encoder.layer.1.attention.self.query.weight"] == 4
        assert ranks["encoder.layer.1.attention.self.value.weight"] == 6
        assert adapter.deltas["encoder.layer.1.attention.self.value.weight"].scale == pytest.approx(3 / 6)
    else:
        assert "embeddings.word_embeddings.weight" in adapter.deltas
        assert adapter.deltas["encoder.layer.0.attention.self.key.weight"].scale == pytest.approx(8 / 2)


def test_adapter_made_on_the_headless_base_needs_no_prefix(tiny_base_dir, tmp_path):
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["query"])
    merged = make_adapter(tiny_base_dir, tmp_path / "a", config, model_cls=BertModel)
    adapter = assert_matches_peft_merge(tiny_base_dir, tmp_path / "a", merged, "")
    assert len(adapter.deltas) == 2 and adapter.head == {}


def test_lora_targets_only_and_head_is_the_trained_classifier(tiny_base_dir, lora_adapter):
    adapter_dir, merged = lora_adapter
    adapter = assert_matches_peft_merge(tiny_base_dir, adapter_dir, merged, "bert.")
    assert set(adapter.deltas) == {
        f"encoder.layer.{i}.attention.self.{m}.weight" for i in range(2) for m in ("query", "value")
    }
    assert set(adapter.head) == {"classifier.weight", "classifier.bias"}
    for n, t in adapter.head.items():
        assert t.dtype == torch.float32
        assert torch.equal(t, merged[n])
    assert adapter.config["r"] == 4


def test_ia3_delta_equals_peft_merge_with_feedforward_modules(tiny_base_dir, tmp_path):
    config = IA3Config(
        task_type="SEQ_CLS",
        target_modules=["query", "value", "output.dense"],  # also matches attention.output.dense
        feedforward_modules=["output.dense"],
    )
    merged = make_adapter(tiny_base_dir, tmp_path / "ia3", config)
    adapter = assert_matches_peft_merge(tiny_base_dir, tmp_path / "ia3", merged, "bert.")
    assert adapter.kind == "ia3"
    d = adapter.deltas
    assert all(isinstance(x, ScaleDelta) for x in d.values())
    assert d["encoder.layer.0.output.dense.weight"].axis == 1  # (32, 64): scales the 64 inputs
    assert d["encoder.layer.0.attention.self.query.weight"].axis == 0
    assert "encoder.layer.0.attention.self.query.bias" in d  # output scaling reaches the bias
    assert "encoder.layer.0.output.dense.bias" not in d  # input scaling does not
    assert set(adapter.head) == {"classifier.weight", "classifier.bias"}


def test_modules_to_save_on_a_base_module_is_a_dense_delta(tiny_base_dir, tmp_path):
    config = LoraConfig(
        task_type="SEQ_CLS", r=2, lora_alpha=4, target_modules=["query"], modules_to_save=["pooler"]
    )
    merged = make_adapter(tiny_base_dir, tmp_path / "a", config)
    adapter = assert_matches_peft_merge(tiny_base_dir, tmp_path / "a", merged, "bert.")
    assert isinstance(adapter.deltas["pooler.dense.weight"], torch.Tensor)
    assert set(adapter.head) == {"classifier.weight", "classifier.bias"}


@pytest.fixture(scope="module")
def tiny_gpt2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """GPT-2 keeps its linear weights as Conv1D (in, out): PEFT sets ``fan_in_fan_out`` for it."""
    out = tmp_path_factory.mktemp("gpt2")
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=64, n_positions=32, n_embd=16, n_layer=2, n_head=2, pad_token_id=0)
    model = GPT2Model(config)
    with torch.no_grad():  # GPT-2 starts with zero biases, which would hide a missed IA3 bias scaling
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    model.save_pretrained(out)
    return out


@pytest.mark.parametrize("kind", ["lora", "ia3"])
def test_fan_in_fan_out_weights_match_peft_merge(tiny_gpt2_dir, tmp_path, kind):
    if kind == "lora":
        config = LoraConfig(
            task_type="SEQ_CLS", r=3, lora_alpha=6, target_modules=["c_attn"], fan_in_fan_out=True
        )
    else:
        config = IA3Config(
            task_type="SEQ_CLS", target_modules=["c_attn", "mlp.c_proj"], feedforward_modules=["mlp.c_proj"],
            fan_in_fan_out=True,
        )
    merged = make_adapter(tiny_gpt2_dir, tmp_path / "a", config)
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["fan_in_fan_out"]
    adapter = assert_matches_peft_merge(tiny_gpt2_dir, tmp_path / "a", merged, "transformer.")
    assert "h.0.attn.c_attn.weight" in adapter.deltas  # (16, 48): not square, so a missed transpose fails
    assert set(adapter.head) == {"score.weight"}


def test_adapter_for_another_base_lists_every_mismatch(tiny_base_dir, tmp_path):
    other = tmp_path / "other-base"
    torch.manual_seed(0)
    BertModel(tiny_config(hidden_size=48)).save_pretrained(other)
    make_adapter(other, tmp_path / "a", LoraConfig(task_type="SEQ_CLS", r=2, target_modules=["query"]))
    with open_checkpoint(tiny_base_dir) as base, pytest.raises(TaskVectorError) as e:
        load_adapter_task_vector(tmp_path / "a", base)
    msg = str(e.value)
    assert str(tmp_path / "a" / ADAPTER_FILE) in msg
    assert "2 problems" in msg
    for i in range(2):
        assert f"encoder.layer.{i}.attention.self.query.weight" in msg
    assert "(48, 48)" in msg and "(32, 32)" in msg


REFUSED = {
    "dora": (LoraConfig(r=2, target_modules=["query"], use_dora=True), "DoRA"),
    "bias": (LoraConfig(r=2, target_modules=["query"], bias="lora_only"), "bias='lora_only'"),
    "lokr": (LoKrConfig(r=2, target_modules=["query"]), "LOKR"),
}


@pytest.mark.parametrize(("config", "says"), REFUSED.values(), ids=REFUSED.keys())
def test_unsupported_adapters_are_refused_by_name(tiny_base_dir, tmp_path, config, says):
    make_adapter(tiny_base_dir, tmp_path / "a", config)
    with open_checkpoint(tiny_base_dir) as base, pytest.raises(TaskVectorError) as e:
        load_adapter_task_vector(tmp_path / "a", base)
    assert says in str(e.value) and str(tmp_path / "a") in str(e.value) and "merge_and_unload" in str(e.value)


def test_nan_in_adapter_is_refused(tiny_base_dir, lora_adapter, tmp_path):
    src, _ = lora_adapter
    dst = tmp_path / "broken"
    dst.mkdir()
    (dst / "adapter_config.json").write_text((src / "adapter_config.json").read_text())
    tensors = load_file(src / ADAPTER_FILE)
    key = "base_model.model.bert.encoder.layer.1.attention.self.value.lora_B.weight"
    tensors[key][3, 1] = float("nan")
    save_file(tensors, dst / ADAPTER_FILE)
    with open_checkpoint(tiny_base_dir) as base, pytest.raises(TaskVectorError) as e:
        load_adapter_task_vector(dst, base)
    assert str(dst / ADAPTER_FILE) in str(e.value) and key in str(e.value)


def test_load_task_vector_reads_adapter_dirs(tiny_base_dir, lora_adapter):
    adapter_dir, _ = lora_adapter
    assert is_adapter_dir(adapter_dir) and not is_adapter_dir(tiny_base_dir)
    with open_checkpoint(tiny_base_dir) as base:
        direct = load_adapter_task_vector(adapter_dir, base)
        tv = load_task_vector(base, adapter_dir, name="t")
    assert tv.name == "t" and tv.tasks == ["t"]
    assert set(tv.deltas) == set(direct.deltas)
    for n, d in tv.deltas.items():
        assert torch.equal(d.B, direct.deltas[n].B) and torch.equal(d.A, direct.deltas[n].A)
    assert set(tv.heads["t"]) == set(direct.head)
    assert all(torch.equal(tv.heads["t"][k], direct.head[k]) for k in direct.head)
