"""Checkpoint reading (lazy, every layout, never unpickling) and atomic, checksummed writing."""

from __future__ import annotations

import hashlib
import json
import pickle
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModel

from supermerge.merge_core.checkpoint import (
    CHECKSUMS_FIELD,
    RECORD_FILE,
    config_dir,
    open_checkpoint,
    read_record,
    verify_checksums,
    write_model_dir,
)
from supermerge.merge_core.errors import CheckpointError


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(4, 3, generator=g),
        "a.bias": torch.randn(4, generator=g).to(torch.float16),
        "ids": torch.arange(5),
    }


def test_reads_single_file_lazily_with_shapes_and_dtypes(tmp_path: Path) -> None:
    t = _tensors()
    save_file(t, tmp_path / "m.safetensors")
    with open_checkpoint(tmp_path / "m.safetensors") as ck:
        assert sorted(ck.keys()) == sorted(t)
        assert ck.shape("a.weight") == (4, 3)
        assert ck.dtype("a.bias") == torch.float16
        assert ck.dtype("ids") == torch.int64
        assert torch.equal(ck.get("a.weight"), t["a.weight"])
        assert ck.numel() == 12 + 4 + 5
        with pytest.raises(CheckpointError, match="no tensor 'nope'"):
            ck.get("nope")


def test_reads_sharded_dir_via_index(tmp_path: Path) -> None:
    t = _tensors()
    save_file({"a.weight": t["a.weight"]}, tmp_path / "s1.safetensors")
    save_file({"a.bias": t["a.bias"], "ids": t["ids"]}, tmp_path / "s2.safetensors")
    index = {"weight_map": {"a.weight": "s1.safetensors", "a.bias": "s2.safetensors", "ids": "s2.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with open_checkpoint(tmp_path) as ck:
        assert ck.file_of("a.bias").name == "s2.safetensors"
        for n, x in t.items():
            assert torch.equal(ck.get(n), x)


def test_index_naming_a_missing_shard_is_refused(tmp_path: Path) -> None:
    save_file({"x": torch.zeros(2)}, tmp_path / "s1.safetensors")
    index = {"weight_map": {"x": "s1.safetensors", "y": "s9.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="s9.safetensors does not exist"):
        open_checkpoint(tmp_path)


def test_reads_hf_model_dir(tiny_base_dir: Path) -> None:
    model = AutoModel.from_pretrained(tiny_base_dir)
    with open_checkpoint(tiny_base_dir) as ck:
        for n, p in model.state_dict().items():
            assert torch.equal(ck.get(n), p), n
    assert config_dir(tiny_base_dir) == tiny_base_dir
    assert config_dir(tiny_base_dir / "model.safetensors") == tiny_base_dir


def test_missing_path_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        open_checkpoint(tmp_path / "absent")


def test_truncated_safetensors_is_a_clear_error(tmp_path: Path) -> None:
    f = tmp_path / "m.safetensors"
    save_file({"w": torch.randn(64, 64)}, f)
    f.write_bytes(f.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="truncated"):
        with open_checkpoint(f) as ck:
            ck.get("w")


def test_dir_without_weights_lists_what_it_has(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(CheckpointError, match="holds no model weights.*notes.txt"):
        open_checkpoint(tmp_path)


def test_bin_state_dict_is_read_weights_only(tmp_path: Path) -> None:
    t = _tensors()
    torch.save(t, tmp_path / "pytorch_model.bin")
    with open_checkpoint(tmp_path) as ck:
        assert torch.equal(ck.get("a.weight"), t["a.weight"])


class _Evil:
    def __reduce__(self):
        return (Path("/tmp/supermerge-pwned").touch, ())


def test_bin_with_pickled_code_is_refused_not_run(tmp_path: Path) -> None:
    f = tmp_path / "pytorch_model.bin"
    with open(f, "wb") as fh:
        pickle.dump({"w": torch.zeros(1), "x": _Evil()}, fh)
    Path("/tmp/supermerge-pwned").unlink(missing_ok=True)
    with pytest.raises(CheckpointError, match="never unpickles"):
        open_checkpoint(tmp_path)
    assert not Path("/tmp/supermerge-pwned").exists()


def test_write_model_dir_shards_and_loads_with_transformers(tiny_base_dir: Path, tmp_path: Path) -> None:
    with open_checkpoint(tiny_base_dir) as ck:
        tensors = {n: ck.get(n) for n in ck.keys()}
    out = write_model_dir(
        tmp_path / "out",
        iter(tensors.items()),
        config_from=tiny_base_dir,
        record={"method": "test", "tasks": ["a"]},
        max_shard_bytes=20_000,
        extra_files={"heads/a.safetensors": b"x"},
    )
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 1 and (out / "model.safetensors.index.json").is_file()
    assert (out / "heads/a.safetensors").read_bytes() == b"x"
    record = read_record(out)
    sums = record.pop(CHECKSUMS_FIELD)
    assert record == {"method": "test", "tasks": ["a"]}
    files = sorted(f.relative_to(out).as_posix() for f in out.rglob("*") if f.is_file() and f.name != RECORD_FILE)
    assert sorted(sums) == files and "heads/a.safetensors" in files
    assert all(sums[f] == hashlib.sha256((out / f).read_bytes()).hexdigest() for f in files)
    assert verify_checksums(out, read_record(out)) is None
    assert (out / "vocab.txt").is_file() and (out / "config.json").is_file()
    loaded = AutoModel.from_pretrained(out)
    for n, p in loaded.state_dict().items():
        assert torch.equal(p, tensors[n]), n
    assert not list(tmp_path.glob(".out.*")), "no temp dir left behind"


def test_write_refuses_existing_output_unless_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "out"
    write_model_dir(out, iter({"w": torch.ones(2)}.items()), config_from=None, record={"v": 1})
    with pytest.raises(CheckpointError, match="already exists.*--overwrite"):
        write_model_dir(out, iter({"w": torch.ones(2)}.items()), config_from=None, record={"v": 2})
    write_model_dir(out, iter({"w": torch.zeros(2)}.items()), config_from=None, record={"v": 2}, overwrite=True)
    assert read_record(out)["v"] == 2
    with open_checkpoint(out) as ck:
        assert torch.equal(ck.get("w"), torch.zeros(2))


def test_failed_write_leaves_nothing(tmp_path: Path) -> None:
    def broken():
        yield "w", torch.ones(2)
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        write_model_dir(tmp_path / "out", broken(), config_from=None, record={})
    assert list(tmp_path.iterdir()) == []


def test_tied_tensors_are_written(tmp_path: Path) -> None:
    w = torch.randn(3, 3)
    out = write_model_dir(tmp_path / "o", iter({"a": w, "b": w}.items()), config_from=None, record={})
    with open_checkpoint(out) as ck:
        assert torch.equal(ck.get("a"), ck.get("b"))


@pytest.mark.parametrize("damage", ["flip", "cut", "missing", "no_checksums", "escaping_name"])
def test_checksums_catch_a_file_changed_after_writing(tmp_path: Path, damage: str) -> None:
    out = write_model_dir(tmp_path / "o", iter({"w": torch.arange(64.0)}.items()), config_from=None,
                          record={"v": 1}, extra_files={"heads/t.safetensors": b"head"})
    weights = out / "model.safetensors"
    record = read_record(out)
    assert verify_checksums(out, record) is None
    time.sleep(0.02)  # file times tick in jiffies; digests are remembered per (inode, size, times)
    if damage == "flip":  # one value's byte, the header untouched: safetensors still reads the file
        blob = bytearray(weights.read_bytes())
        blob[-3] ^= 0x01
        weights.write_bytes(bytes(blob))
        with open_checkpoint(out) as ck:
            assert ck.get("w").shape == (64,)
        expected = "model.safetensors does not have the sha256 recorded"
    elif damage == "cut":
        (out / "heads/t.safetensors").write_bytes(b"he")
        expected = "heads/t.safetensors does not have the sha256"
    elif damage == "missing":
        (out / "README.md").unlink()
        expected = "README.md is missing"
    elif damage == "no_checksums":
        del record[CHECKSUMS_FIELD]
        expected = "records no checksums"
    else:
        record[CHECKSUMS_FIELD]["../o/model.safetensors"] = record[CHECKSUMS_FIELD]["model.safetensors"]
        expected = "not a file inside the model dir"
    assert expected in (verify_checksums(out, record) or "")


def test_a_file_name_leaving_the_model_dir_is_refused_and_nothing_is_written(tmp_path: Path) -> None:
    for name in ("../escaped.safetensors", "heads/../../escaped.safetensors", str(tmp_path / "abs.safetensors")):
        with pytest.raises(CheckpointError, match="outside the model dir"):
            write_model_dir(tmp_path / "out" / "m", iter({"w": torch.ones(2)}.items()), config_from=None,
                            record={}, extra_files={name: b"x"})
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["out"]
