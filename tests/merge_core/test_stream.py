"""Streaming merges write what merge() + save_result write, bit for bit, holding one tensor's worth."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.profiler import ProfilerActivity, profile
from transformers import AutoModel, AutoModelForSequenceClassification
from transformers.utils import logging as hf_logging

from supermerge.merge_core.checkpoint import (
    SAFETENSORS_INDEX,
    TensorMeta,
    open_checkpoint,
    plan_shards,
    write_shards_streaming,
)
from supermerge.merge_core.errors import CheckpointError, ConfigError, TaskVectorError
from supermerge.merge_core import stream
from supermerge.merge_core.merge import merge, save_result
from supermerge.merge_core.stream import stream_merge, streamable
from supermerge.merge_core.task_vectors import load_task_vector

TASKS = ("alpha", "beta", "gamma")
FIXED = {
    "average": {},
    "task_arithmetic": {"lam": 0.7},
    "ties": {"density": 0.3, "lam": 1.2},
    "dare_ta": {"density": 0.5, "lam": 0.8},
    "dare_ties": {"density": 0.5, "lam": 1.0},
    "tsv": {"alpha": 1.2},
    "iso_c": {"alpha": 1.0},
    "iso_cts": {"alpha": 1.0, "common_space_fraction": 0.8},
    "wudi": {"alpha": 1.0, "solver": "closed_form"},
}


def _merge_and_save(base: Path, models: dict[str, Path], method: str, params: dict, out: Path, seed: int) -> Path:
    with open_checkpoint(base) as ck:
        vectors = [load_task_vector(ck, p, name=n) for n, p in models.items()]
    result = merge(base, vectors, method, params=params, seed=seed)
    return save_result(result, out, base_path=base, models={n: str(p) for n, p in models.items()})


def _assert_same_model_dir(expected: Path, got: Path) -> None:
    with open_checkpoint(expected) as a, open_checkpoint(got) as b:
        assert a.keys() == b.keys()
        for n in a.keys():
            x, y = a.get(n), b.get(n)
            assert x.dtype == y.dtype and torch.equal(x, y), n
    heads = sorted(p.name for p in (expected / "heads").iterdir())
    assert heads and heads == sorted(p.name for p in (got / "heads").iterdir())
    for h in heads:
        assert (expected / "heads" / h).read_bytes() == (got / "heads" / h).read_bytes(), h
    rec_a, rec_b = (json.loads((d / "supermerge.json").read_text()) for d in (expected, got))
    assert rec_a.pop("seconds") >= 0 and rec_b.pop("seconds") >= 0
    assert rec_a == rec_b
    for f in ("config.json", "vocab.txt", "README.md"):
        assert (expected / f).read_bytes() == (got / f).read_bytes(), f


@pytest.mark.parametrize("method", list(FIXED))
def test_stream_is_bit_identical_to_merge_and_save(tiny_base_dir, tiny_finetuned, tmp_path, method):
    models = {t: tiny_finetuned[t] for t in TASKS}
    expected = _merge_and_save(tiny_base_dir, models, method, FIXED[method], tmp_path / "a", seed=3)
    got = stream_merge(tiny_base_dir, list(models.items()), method, FIXED[method], tmp_path / "b", seed=3)
    _assert_same_model_dir(expected, got)


def _to_bf16(src: Path, out: Path) -> Path:
    out.mkdir()
    for f in src.iterdir():
        if f.suffix == ".safetensors":
            tensors = load_file(f)
            narrowed = {n: t.to(torch.bfloat16) if t.is_floating_point() else t for n, t in tensors.items()}
            save_file(narrowed, out / f.name)
        elif f.is_file():
            shutil.copy2(f, out / f.name)
    return out


def test_bf16_in_bf16_out_bit_identical(tiny_base_dir, tiny_finetuned, tmp_path):
    base = _to_bf16(tiny_base_dir, tmp_path / "base")
    models = {t: _to_bf16(tiny_finetuned[t], tmp_path / t) for t in TASKS[:2]}
    expected = _merge_and_save(base, models, "ties", {"lam": 1.0}, tmp_path / "a", seed=0)
    got = stream_merge(base, list(models.items()), "ties", {"lam": 1.0}, tmp_path / "b")
    _assert_same_model_dir(expected, got)
    with open_checkpoint(got) as ck:
        assert ck.dtype("encoder.layer.0.attention.self.query.weight") == torch.bfloat16


def test_lora_adapter_and_full_model_together(tiny_base_dir, tiny_finetuned, tmp_path):
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        torch.manual_seed(1)
        model = AutoModelForSequenceClassification.from_pretrained(tiny_base_dir, num_labels=2)
    finally:
        hf_logging.set_verbosity(level)
    peft_model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8,
                                                  target_modules=["query", "value"]))
    with torch.no_grad():
        for p in peft_model.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn_like(p))
    peft_model.save_pretrained(tmp_path / "lora")
    models = {"alpha": tiny_finetuned["alpha"], "lora": tmp_path / "lora"}
    expected = _merge_and_save(tiny_base_dir, models, "task_arithmetic", {"lam": 0.5}, tmp_path / "a", seed=0)
    got = stream_merge(tiny_base_dir, list(models.items()), "task_arithmetic", {"lam": 0.5}, tmp_path / "b")
    _assert_same_model_dir(expected, got)


def test_sharded_output_has_a_correct_index_and_loads_with_transformers(
    tiny_base_dir, tiny_finetuned, tmp_path, monkeypatch
):
    monkeypatch.setattr(stream, "UNMAP_BYTES", 1)  # unmap after every tensor: still the same bits
    models = [(t, tiny_finetuned[t]) for t in TASKS[:2]]
    out = stream_merge(tiny_base_dir, models, "task_arithmetic", {"lam": 0.5}, tmp_path / "m", shard_bytes=20_000)
    index = json.loads((out / SAFETENSORS_INDEX).read_text())
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 1
    assert [s.name for s in shards] == [f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                                        for i in range(1, len(shards) + 1)]
    held = {}
    for s in shards:
        assert s.stat().st_size <= 20_000 + 4096 or len(load_file(s)) == 1, s.name
        with safe_open(str(s), "pt") as f:
            held.update({n: s.name for n in f.keys()})
    assert index["weight_map"] == held
    with open_checkpoint(tiny_base_dir) as base:
        assert set(held) == set(base.keys())
        assert index["metadata"]["total_size"] == sum(
            base.get(n).numel() * base.get(n).element_size() for n in base.keys())
    expected = _merge_and_save(tiny_base_dir, dict(models), "task_arithmetic", {"lam": 0.5}, tmp_path / "a", 0)
    loaded = AutoModel.from_pretrained(out)
    reference = AutoModel.from_pretrained(expected)
    for n, p in reference.state_dict().items():
        assert torch.equal(loaded.state_dict()[n], p), n
    with open_checkpoint(tiny_base_dir) as base:
        again = load_task_vector(base, out, name="node")
    assert again.tasks == ["alpha", "beta"]


def _with_nan(src: Path, out: Path) -> Path:
    shutil.copytree(src, out)
    tensors = load_file(out / "model.safetensors")
    last = [n for n in tensors if n.startswith("bert.") and tensors[n].is_floating_point()][-1]
    tensors[last] = tensors[last].clone()
    tensors[last].view(-1)[0] = float("nan")
    save_file(tensors, out / "model.safetensors")
    return out


def test_failure_mid_way_leaves_nothing_and_keeps_the_old_output(tiny_base_dir, tiny_finetuned, tmp_path):
    broken = _with_nan(tiny_finetuned["beta"], tmp_path / "inputs" / "beta")
    models = [("alpha", tiny_finetuned["alpha"]), ("beta", broken)]
    root = tmp_path / "outputs"
    with pytest.raises(TaskVectorError, match="NaN or Inf"):
        stream_merge(tiny_base_dir, models, "ties", {"lam": 1.0}, root / "m", shard_bytes=20_000)
    assert list(root.iterdir()) == []

    good = [("alpha", tiny_finetuned["alpha"]), ("beta", tiny_finetuned["beta"])]
    out = stream_merge(tiny_base_dir, good, "ties", {"lam": 1.0}, root / "m")
    before = {f.name: f.read_bytes() for f in out.iterdir() if f.is_file()}
    with pytest.raises(CheckpointError, match="already exists"):
        stream_merge(tiny_base_dir, good, "ties", {"lam": 1.0}, root / "m")
    with pytest.raises(TaskVectorError, match="NaN or Inf"):
        stream_merge(tiny_base_dir, models, "ties", {"lam": 1.0}, root / "m", overwrite=True)
    assert [p.name for p in root.iterdir()] == ["m"]
    assert {f.name: f.read_bytes() for f in out.iterdir() if f.is_file()} == before


def test_what_cannot_stream_is_refused_before_any_work(tiny_base_dir, tiny_finetuned, tmp_path):
    models = [(t, tiny_finetuned[t]) for t in TASKS[:2]]
    assert streamable("ties", {"lam": 1.0}) and streamable("average")
    assert streamable("ties")  # a parameter left out takes its default: nothing to search
    assert not streamable("ties", {"search": True}) and not streamable("task_arithmetic", {"lam": [0.3, 0.5]})
    assert not streamable("supermerge", {"steps": 5})
    with pytest.raises(ConfigError, match=r"\['lam'\] have several values"):
        stream_merge(tiny_base_dir, models, "ties", {"search": True}, tmp_path / "o")
    with pytest.raises(ConfigError, match="cannot stream"):
        stream_merge(tiny_base_dir, models, "supermerge", {"steps": 5}, tmp_path / "o")
    with pytest.raises(ConfigError, match="at least 2"):
        stream_merge(tiny_base_dir, models[:1], "average", None, tmp_path / "o")
    with pytest.raises(ConfigError, match="no parameter"):
        stream_merge(tiny_base_dir, models, "average", {"lam": 1.0}, tmp_path / "o")
    assert list(tmp_path.iterdir()) == []


def test_streaming_writer_checks_the_planned_order(tmp_path):
    metas = [TensorMeta("a", (2,), torch.float32), TensorMeta("b", (3,), torch.float16)]
    assert [[m.name for m in s] for s in plan_shards(metas, 8)] == [["a"], ["b"]]
    assert [[m.name for m in s] for s in plan_shards(metas, 14)] == [["a", "b"]]
    with pytest.raises(CheckpointError, match="expected tensor 'a'"):
        write_shards_streaming(tmp_path, metas, iter([("b", torch.zeros(3, dtype=torch.float16))]))
    with pytest.raises(CheckpointError, match="ran out before 'b'"):
        write_shards_streaming(tmp_path, metas, iter([("a", torch.zeros(2))]))
    files = write_shards_streaming(tmp_path, metas, iter([("a", torch.ones(2)), ("b", torch.ones(3).half())]))
    assert [f.name for f in files] == ["model.safetensors"]
    assert torch.equal(load_file(files[0])["b"], torch.ones(3).half())


# --- peak memory: what torch allocates, seen by its profiler -------------------------------------

N_TENSORS, K = 32, 3
SMALL, LARGEST = (64, 64), (96, 64)
LARGEST_BYTES = 4 * LARGEST[0] * LARGEST[1]


def _synthetic_models(root: Path) -> tuple[Path, list[tuple[str, Path]]]:
    """A base of N_TENSORS small tensors and one twice as large, and K perturbed copies (fp32)."""
    g = torch.Generator().manual_seed(0)
    base = {f"layer.{i}.weight": torch.randn(*SMALL, generator=g) for i in range(N_TENSORS)}
    base["embed.weight"] = torch.randn(*LARGEST, generator=g)
    root.mkdir()
    save_file(base, root / "base.safetensors")
    models = []
    for i in range(K):
        save_file({n: t + 0.1 * torch.randn(t.shape, generator=g) for n, t in base.items()},
                  root / f"ft{i}.safetensors")
        models.append((f"ft{i}", root / f"ft{i}.safetensors"))
    return root / "base.safetensors", models


def _peak_allocated_bytes(fn, mapped_files: list[Path]) -> int:
    """Highest sum of live bytes torch handed out while ``fn`` ran. safetensors memory-maps each
    file it opens, which the profiler reports as an allocation of the file's size: that is address
    space, paged in only as read, so events of exactly a mapped file's size are left out."""
    mapped = {f.stat().st_size for f in mapped_files}
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    live = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        if event.name == "[memory]" and abs(event.cpu_memory_usage) in mapped:
            continue
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    return peak


@pytest.mark.parametrize(("method", "params", "factor"), [("task_arithmetic", {"lam": 0.5}, 1.1),
                                                          ("ties", {"lam": 1.0}, 3)])
def test_peak_memory_is_a_few_tensors_not_the_model(tmp_path, method, params, factor):
    """Live bytes stay within a few times (k + 2) of the largest fp32 tensor: Task Arithmetic holds
    k + 2 of them, TIES (trim, sign election, disjoint mean) about 4k + 2."""
    base, models = _synthetic_models(tmp_path / "in")
    files = [base] + [p for _, p in models]
    peak = _peak_allocated_bytes(
        lambda: stream_merge(base, models, method, params, tmp_path / "out", head_prefixes=()), files)
    assert peak <= factor * (K + 2) * LARGEST_BYTES, peak / LARGEST_BYTES


def test_the_peak_probe_sees_a_load_everything_merge(tmp_path):
    """The same probe on merge(), which holds k fp32 task vectors of the whole model, reads far more
    than the bound above: so the bound would catch a stream that loaded everything."""
    base, models = _synthetic_models(tmp_path / "in")

    def load_everything() -> None:
        with open_checkpoint(base) as ck:
            vectors = [load_task_vector(ck, p, name=n, head_prefixes=()) for n, p in models]
        merge(base, vectors, "task_arithmetic", params={"lam": 0.5})

    model_bytes = 4 * N_TENSORS * SMALL[0] * SMALL[1] + LARGEST_BYTES
    peak = _peak_allocated_bytes(load_everything, [base] + [p for _, p in models])
    assert peak >= K * model_bytes > 2 * 3 * (K + 2) * LARGEST_BYTES
