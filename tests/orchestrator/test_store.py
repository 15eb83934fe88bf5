"""The content-addressed checkpoint store: what a key covers, and what counts as finished."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time

import pytest
import torch

from supermerge.merge_core.checkpoint import write_model_dir
from supermerge.orchestrator.errors import StoreError
from supermerge.orchestrator.store import (
    KEY_FIELD,
    CheckpointStore,
    data_digest,
    model_key,
    node_key,
    safetensors_complete,
)
from tests.orchestrator.families import family_data

BASE_ARGS = dict(base="b" * 64, method="supermerge", params={"steps": 3, "lr": 0.05}, seed=0,
                 kind="classification", head_prefixes=["classifier."], data="d" * 64)


def test_node_key_changes_with_each_input_and_only_then():
    key = node_key(["a", "b"], **BASE_ARGS)
    assert key == node_key(["a", "b"], **{**BASE_ARGS, "params": {"lr": 0.05, "steps": 3}})
    changed = [
        node_key(["a", "c"], **BASE_ARGS),
        node_key(["b", "a"], **BASE_ARGS),
        node_key(["a", "b", "c"], **BASE_ARGS),
        node_key(["a", "b"], **{**BASE_ARGS, "method": "adamerging"}),
        node_key(["a", "b"], **{**BASE_ARGS, "params": {"steps": 4, "lr": 0.05}}),
        node_key(["a", "b"], **{**BASE_ARGS, "params": {"steps": 3}}),
        node_key(["a", "b"], **{**BASE_ARGS, "seed": 1}),
        node_key(["a", "b"], **{**BASE_ARGS, "data": "e" * 64}),
        node_key(["a", "b"], **{**BASE_ARGS, "base": "c" * 64}),
        node_key(["a", "b"], **{**BASE_ARGS, "kind": "causal_lm"}),
    ]
    assert len({key, *changed}) == len(changed) + 1


def test_data_digest_sees_one_flipped_label_and_which_task_holds_the_data():
    data = family_data("pa", 32, seed=1)
    same = family_data("pa", 32, seed=1)
    flipped = family_data("pa", 32, seed=1)
    flipped.labels[5] = 1 - flipped.labels[5]
    assert data_digest({"pa": data}) == data_digest({"pa": same})
    assert data_digest({"pa": data}) != data_digest({"pa": flipped})
    assert data_digest({"pa": data}) != data_digest({"pb": data})
    assert data_digest({"pa": data, "pb": same}) != data_digest({"pa": data})


def test_model_key_changes_when_a_file_is_rewritten_or_reshaped(tmp_path, family_models):
    """A model's key is its path and each file's size, mtime and safetensors header (cheap on
    multi-GB models): rewriting a tensor's bytes, or adding a file, gives a new key."""
    model = tmp_path / "model"
    shutil.copytree(family_models["pa"]["path"], model)
    key = model_key(model)
    assert key == model_key(model)
    weights = model / "model.safetensors"
    stat = weights.stat()
    blob = bytearray(weights.read_bytes())
    blob[-1] ^= 0xFF  # one byte of one tensor
    weights.write_bytes(bytes(blob))
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
    rewritten = model_key(model)
    assert rewritten != key
    (model / "extra.json").write_text("{}")
    assert model_key(model) not in (key, rewritten)
    with pytest.raises(StoreError, match="does not exist"):
        model_key(tmp_path / "gone")


def _write_node(store: CheckpointStore, key: str, *, record_key: str | None = None) -> None:
    tensors = {"w": torch.arange(6.0).reshape(2, 3), "b": torch.ones(3)}
    write_model_dir(store.path(key), iter(tensors.items()), config_from=None,
                    record={KEY_FIELD: record_key or key, "method": "supermerge"})


def test_a_written_node_is_finished_and_its_stored_model_keeps_its_key(tmp_path):
    store = CheckpointStore(tmp_path / "store")
    key = "ab" * 32
    assert not store.is_finished(key) and not store.occupied(key)
    _write_node(store, key)
    assert store.is_finished(key) and not store.occupied(key)
    assert store.record(key)[KEY_FIELD] == key
    assert model_key(store.path(key)) == key


@pytest.mark.parametrize(
    ("damage", "why"),
    [("no_record", "has no readable supermerge.json"), ("other_key", "names the key 'efef"),
     ("truncated", "model.safetensors is not a whole safetensors file"),
     ("no_weights", "has no model.safetensors or model.safetensors.index.json"),
     ("bad_json", "supermerge.json cannot be read"),
     ("missing_shard", "model-00002-of-00002.safetensors is missing or not a whole"),
     ("flipped_byte", "model.safetensors does not have the sha256 recorded when it was written"),
     ("no_checksums", "records no checksums")],
)
def test_a_partial_or_damaged_node_is_not_finished_and_says_why(tmp_path, damage, why):
    store = CheckpointStore(tmp_path / "store")
    key = "cd" * 32
    _write_node(store, key, record_key="ef" * 32 if damage == "other_key" else None)
    assert damage == "other_key" or store.is_finished(key)
    folder = store.path(key)
    weights = folder / "model.safetensors"
    time.sleep(0.02)  # file times tick in jiffies; digests are remembered per (inode, size, times)
    if damage == "no_record":
        (folder / "supermerge.json").unlink()
    elif damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:-4])
    elif damage == "no_weights":
        weights.unlink()
    elif damage == "bad_json":
        (folder / "supermerge.json").write_text("{\"store_key\": ")
    elif damage == "missing_shard":
        weights.rename(folder / "model-00001-of-00002.safetensors")
        index = {"weight_map": {"w": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    elif damage == "flipped_byte":  # a value's byte: the header and the size are as written
        blob = bytearray(weights.read_bytes())
        blob[-1] ^= 0x01
        weights.write_bytes(bytes(blob))
        assert safetensors_complete(weights)
    elif damage == "no_checksums":
        record = json.loads((folder / "supermerge.json").read_text())
        del record["checksums"]
        (folder / "supermerge.json").write_text(json.dumps(record))
    assert not store.is_finished(key) and store.record(key) is None
    assert store.occupied(key), "a damaged node must be rewritten, not skipped"
    assert why in (store.problem(key) or "")


def test_an_absent_or_finished_node_has_no_problem(tmp_path):
    store = CheckpointStore(tmp_path / "store")
    key = "ce" * 32
    assert store.problem(key) is None
    _write_node(store, key)
    assert store.problem(key) is None


def test_the_exclusive_lock_makes_a_second_holder_wait_and_a_shared_one_does_not(tmp_path):
    store = CheckpointStore(tmp_path / "store")
    key = "ab" * 32
    events: list[str] = []

    def take(name: str, shared: bool) -> None:
        with store.lock(key, shared=shared):
            events.append(f"{name} in")
            time.sleep(0.2)
            events.append(f"{name} out")

    first = threading.Thread(target=take, args=("writer", False))
    first.start()
    time.sleep(0.05)
    second = threading.Thread(target=take, args=("reader", True))
    second.start()
    first.join()
    second.join()
    assert events == ["writer in", "writer out", "reader in", "reader out"]

    events.clear()
    readers = [threading.Thread(target=take, args=(f"r{i}", True)) for i in range(2)]
    for t in readers:
        t.start()
    for t in readers:
        t.join()
    assert events[:2] in (["r0 in", "r1 in"], ["r1 in", "r0 in"])  # both held it at once
    assert not store.root.exists()  # the last holder removed the lock file, and the store held nothing else
    with pytest.raises(StoreError, match="not a hex digest"):
        with store.lock("../../etc/passwd"):
            pass


def test_lock_files_are_removed_by_their_last_holder_and_writers_still_exclude_each_other(tmp_path):
    """Many threads take one key's lock, exclusive and shared, while each last holder removes the
    lock file: never two writers at once, never a writer beside a reader; nothing is left after."""
    store = CheckpointStore(tmp_path / "store")
    (store.root / "entry").mkdir(parents=True)  # a store holding an entry keeps its folders
    key = "cd" * 32
    inside = {"writers": 0, "readers": 0}
    overlaps: list[str] = []
    guard = threading.Lock()

    def take(shared: bool) -> None:
        for _ in range(20):
            with store.lock(key, shared=shared):
                with guard:
                    inside["readers" if shared else "writers"] += 1
                    if inside["writers"] > 1 or (inside["writers"] and inside["readers"]):
                        overlaps.append(str(inside))
                time.sleep(0.001)
                with guard:
                    inside["readers" if shared else "writers"] -= 1

    threads = [threading.Thread(target=take, args=(i % 3 == 0,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert overlaps == []
    assert sorted(p.name for p in store.root.iterdir()) == [".locks", "entry"]
    assert list((store.root / ".locks").iterdir()) == []


def test_an_interrupted_write_leaves_nothing_finished(tmp_path):
    store = CheckpointStore(tmp_path / "store")
    key = "12" * 32

    def tensors_then_crash():
        yield "w", torch.ones(4)
        raise RuntimeError("killed while writing")

    with pytest.raises(RuntimeError, match="killed"):
        write_model_dir(store.path(key), tensors_then_crash(), config_from=None, record={KEY_FIELD: key})
    assert not store.path(key).exists() and not store.is_finished(key)
    assert list(store.root.iterdir()) == []  # the temporary sibling is gone too
    # a kill -9 leaves the temporary sibling behind: complete inside, but never under the key's name
    _write_node(store, key)
    shutil.move(store.path(key), store.root / f".{key}.x1y2.partial")
    assert not store.is_finished(key) and not store.occupied(key)


def test_safetensors_completeness_check(tmp_path):
    from safetensors.torch import save_file

    f = tmp_path / "t.safetensors"
    save_file({"a": torch.ones(10)}, str(f))
    assert safetensors_complete(f)
    whole = f.read_bytes()
    for cut in (4, len(whole) // 2, len(whole) - 1):
        f.write_bytes(whole[:cut])
        assert not safetensors_complete(f)
    f.write_bytes(whole + b"\0")
    assert not safetensors_complete(f)


def test_store_refuses_keys_that_are_not_digests(tmp_path):
    store = CheckpointStore(tmp_path)
    for bad in ("", "../escape", "ABC", "a/b"):
        with pytest.raises(StoreError, match="not a hex digest"):
            store.path(bad)


def test_open_store_takes_a_folder_or_an_s3_url_and_the_config_says_which(tmp_path, tiny_base_dir):
    from supermerge.merge_core.config import parse_config
    from supermerge.merge_core.errors import ConfigError
    from supermerge.orchestrator.stores import open_store

    local = open_store(tmp_path / "store")
    assert local == CheckpointStore(tmp_path / "store") and local.location == str(tmp_path / "store")
    for bad in ("gs://bucket/prefix", "s3://", "file:///tmp/x"):
        with pytest.raises(StoreError, match="s3://bucket/prefix"):
            open_store(bad)
    raw = {"base": str(tiny_base_dir), "output": "out/merged", "method": "task_arithmetic",
           "models": [{"name": "a", "path": str(tiny_base_dir)}, {"name": "b", "path": str(tiny_base_dir)}]}
    assert parse_config({**raw, "store": "shared/store"}, root=tmp_path).store == str(tmp_path / "shared/store")
    assert parse_config({**raw, "store": "s3://bucket/merges"}, root=tmp_path).store == "s3://bucket/merges"
    with pytest.raises(ConfigError, match="not a folder or an s3://bucket/prefix URL"):
        parse_config({**raw, "store": "gs://bucket/merges"}, root=tmp_path)


def test_publish_on_a_local_store_refuses_a_node_not_written_whole(tmp_path):
    store = CheckpointStore(tmp_path / "store")
    key = "9a" * 32
    with pytest.raises(StoreError, match="does not exist"):
        store.publish(key)
    _write_node(store, key)
    store.publish(key)
    (store.path(key) / "model.safetensors").unlink()
    with pytest.raises(StoreError, match="not written whole"):
        store.publish(key)
