"""The checkpoint store on S3, against moto's S3 server on 127.0.0.1: publish, manifests, leases, a merge."""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from pathlib import Path

import pytest
import torch

pytest.importorskip("s3fs", reason="the s3:// store needs s3fs: pip install 'supermerge[distributed]'")
moto_server = pytest.importorskip("moto.server", reason="moto's S3 server is missing: pip install 'supermerge[distributed]'")

from supermerge.merge_core.checkpoint import write_model_dir  # noqa: E402
from supermerge.merge_core.config import parse_config  # noqa: E402
from supermerge.orchestrator.errors import StoreError  # noqa: E402
from supermerge.orchestrator.executor import execute  # noqa: E402
from supermerge.orchestrator.hardware import MemoryInventory  # noqa: E402
from supermerge.orchestrator.object_store import MANIFEST, ObjectStore  # noqa: E402
from supermerge.orchestrator.plan import plan  # noqa: E402
from supermerge.orchestrator.s3_lease import S3Lease  # noqa: E402
from supermerge.orchestrator.store import KEY_FIELD  # noqa: E402
from supermerge.orchestrator.stores import open_store  # noqa: E402

PLENTY = MemoryInventory(ram_available_bytes=10**12, ram_total_bytes=10**12, process_bytes=0)


@pytest.fixture(scope="module")
def s3_endpoint():
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def bucket(s3_endpoint, monkeypatch) -> str:
    """A new bucket on the moto server, and the AWS settings that point s3fs at it."""
    for name, value in {"AWS_ENDPOINT_URL": s3_endpoint, "AWS_ACCESS_KEY_ID": "test",
                        "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(name, value)
    import boto3

    name = f"merges-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(Bucket=name)
    return name


def _store(bucket: str, cache: Path, **options: float) -> ObjectStore:
    """A worker's view of the store: its own local cache, as on its own machine."""
    store = open_store(f"s3://{bucket}/store", cache_dir=cache)
    assert isinstance(store, ObjectStore)
    return ObjectStore(store.url, store.cache, store.fs, **options) if options else store


def _write_and_publish(store: ObjectStore, key: str) -> None:
    tensors = {"w": torch.arange(6.0).reshape(2, 3), "b": torch.ones(3)}
    with store.lock(key):
        write_model_dir(store.path(key), iter(tensors.items()), config_from=None,
                        record={KEY_FIELD: key, "method": "supermerge"}, extra_files={"heads/t.json": b"{}"})
        store.publish(key)


def _files(folder: Path) -> dict[str, bytes]:
    return {str(f.relative_to(folder)): f.read_bytes() for f in sorted(folder.rglob("*")) if f.is_file()}


def test_a_published_entry_comes_back_byte_identical_on_another_worker(bucket, tmp_path):
    writer, reader = _store(bucket, tmp_path / "a"), _store(bucket, tmp_path / "b")
    key = "ab" * 32
    assert not reader.is_finished(key) and reader.problem(key) is None
    _write_and_publish(writer, key)
    assert reader.is_finished(key) and reader.record(key)[KEY_FIELD] == key
    assert _files(reader.path(key)) == _files(writer.path(key)) and "heads/t.json" in _files(reader.path(key))
    manifest = json.loads(reader.fs.cat_file(f"{bucket}/store/{key}/{MANIFEST}"))
    assert set(manifest["files"]) == set(_files(writer.path(key)))
    assert list((writer.root / ".locks").iterdir()) == [] and not reader.fs.exists(f"{bucket}/store/.locks/{key}.lock")
    with pytest.raises(StoreError, match="without holding its lock"):
        writer.publish(key)


@pytest.mark.parametrize(("damage", "why"), [
    ("no_manifest", None),
    ("bad_json", "is not readable JSON"),
    ("other_key", "names the key 'cdcd"),
    ("flipped_object", "does not have the sha256 its manifest.json records"),
    ("missing_object", "is missing (listed in the entry's manifest.json)"),
])
def test_an_entry_without_a_whole_manifest_or_matching_objects_is_not_served(bucket, tmp_path, damage, why):
    key = "ef" * 32
    _write_and_publish(_store(bucket, tmp_path / "writer"), key)
    store = _store(bucket, tmp_path / "reader")
    fs, where = store.fs, f"{bucket}/store/{key}"
    manifest = json.loads(fs.cat_file(f"{where}/{MANIFEST}"))
    weights = f"{where}/{manifest['token']}/model.safetensors"
    if damage == "no_manifest":  # a writer killed before its last PUT: the objects are there, unlisted
        fs.rm_file(f"{where}/{MANIFEST}")
    elif damage == "bad_json":
        fs.pipe_file(f"{where}/{MANIFEST}", json.dumps(manifest).encode()[:-7])
    elif damage == "other_key":
        fs.pipe_file(f"{where}/{MANIFEST}", json.dumps({**manifest, KEY_FIELD: "cd" * 32}).encode())
    elif damage == "flipped_object":
        blob = bytearray(fs.cat_file(weights))
        blob[-1] ^= 0x01
        fs.pipe_file(weights, bytes(blob))
    elif damage == "missing_object":
        fs.rm_file(weights)
    assert not store.is_finished(key) and store.record(key) is None
    assert store.problem(key) == why or why in (store.problem(key) or "")
    assert not store.path(key).exists(), "nothing unverified is put in the cache"


def test_two_workers_lock_one_key_exactly_one_at_a_time(bucket, tmp_path):
    """Separate stores with separate caches (two machines): the S3 lease alone keeps them apart."""
    key = "12" * 32
    events: list[str] = []
    stores = [_store(bucket, tmp_path / f"w{i}", poll_seconds=0.05) for i in range(2)]

    def take(i: int) -> None:
        with stores[i].lock(key):
            events.append(f"{i} in")
            time.sleep(0.3)
            events.append(f"{i} out")

    threads = [threading.Thread(target=take, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    first = events[0][0]
    second = "1" if first == "0" else "0"
    assert events == [f"{first} in", f"{first} out", f"{second} in", f"{second} out"]


def test_of_many_racing_workers_exactly_one_creates_or_takes_over_a_lease(bucket, tmp_path):
    fs = _store(bucket, tmp_path).fs
    path = f"{bucket}/store/.locks/{'34' * 32}.lock"
    for stale in (False, True):
        if stale:  # a dead holder's lease, expired a second ago
            fs.pipe_file(path, json.dumps({"owner": "dead:1", "expires": time.time() - 1}).encode())
        leases = [S3Lease(fs, path) for _ in range(6)]
        won: list[bool] = [False] * len(leases)
        start = threading.Barrier(len(leases))

        def race(i: int) -> None:
            start.wait()
            won[i] = leases[i].try_acquire()

        threads = [threading.Thread(target=race, args=(i,)) for i in range(len(leases))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sum(won) == 1, (stale, won)
        winner = leases[won.index(True)]
        assert json.loads(fs.cat_file(path))["owner"] == winner.owner
        winner.release()
        assert not fs.exists(path)


def test_an_expired_lease_is_taken_over_and_its_old_holder_may_not_publish(bucket, tmp_path):
    key = "56" * 32
    holder = _store(bucket, tmp_path / "old", lease_seconds=2.0, poll_seconds=0.05)
    other = _store(bucket, tmp_path / "new", lease_seconds=30, poll_seconds=0.05)
    lock_path = f"{bucket}/store/.locks/{key}.lock"
    with holder.lock(key):
        lease = holder._leases[key]
        lease._stop.set()  # the holder stalls (a long GC pause, a frozen VM): no more renewals
        lease._heartbeat.join()
        assert not S3Lease(holder.fs, lock_path).try_acquire()  # not expired yet: not taken over
        waiting = time.perf_counter()
        with other.lock(key):  # waits until the stalled lease expires, then takes it over
            assert time.perf_counter() - waiting < 10
            assert json.loads(holder.fs.cat_file(lock_path))["owner"] != lease.owner
            assert not lease.renew() and lease.lost  # the holder wakes: its If-Match on its ETag fails
            write_model_dir(holder.path(key), iter({"w": torch.ones(2)}.items()), config_from=None,
                            record={KEY_FIELD: key})
            with pytest.raises(StoreError, match="lost the lock"):
                holder.publish(key)
            assert not other.is_finished(key)
            assert not holder.fs.exists(f"{bucket}/store/{key}"), "its uploaded objects are removed"
        assert not holder.fs.exists(lock_path)  # released by its new holder
    assert not holder.fs.exists(lock_path)  # and the old holder deleted nothing


def test_a_renewal_that_finds_the_lease_taken_over_marks_it_lost(bucket, tmp_path):
    fs = _store(bucket, tmp_path).fs
    path = f"{bucket}/store/.locks/{'78' * 32}.lock"
    with S3Lease(fs, path, ttl_seconds=0.3) as lease:
        fs.pipe_file(path, json.dumps({"owner": "someone-else", "expires": time.time() + 60}).encode())
        deadline = time.time() + 5
        while not lease.lost and time.time() < deadline:
            time.sleep(0.05)
        assert lease.lost
    assert json.loads(fs.cat_file(path))["owner"] == "someone-else"  # not deleted by the lease that lost it


def test_a_merge_through_the_s3_store_gives_the_local_stores_bytes(
    bucket, tmp_path, monkeypatch, tiny_base_dir, tiny_finetuned
):
    def merged(output: Path, store: str | None) -> tuple[dict[str, bytes], list[bool]]:
        raw = {"base": str(tiny_base_dir), "output": str(output), "method": "task_arithmetic",
               "parameters": {"lambda": 0.4}, "device": "cpu", "store": store,
               "models": [{"name": t, "path": str(p)} for t, p in sorted(tiny_finetuned.items())]}
        report = execute(plan(parse_config(raw), inventory=PLENTY))
        assert report.to_dict()["store"] == (store or str(output.parent / ".supermerge-store"))
        files = {k: v for k, v in _files(output).items() if k not in ("supermerge.json", "merge_report.json")}
        return files, [r.cached for r in report.nodes]

    local, _ = merged(tmp_path / "local" / "out", None)
    url = f"s3://{bucket}/store"
    monkeypatch.setenv("SUPERMERGE_STORE_CACHE", str(tmp_path / "worker-1"))
    on_s3, cached = merged(tmp_path / "s3" / "out", url)
    assert on_s3 == local and "model.safetensors" in on_s3 and cached == [False]
    # another worker, its cache empty: the published root is downloaded, checked, and not merged again
    monkeypatch.setenv("SUPERMERGE_STORE_CACHE", str(tmp_path / "worker-2"))
    again, cached = merged(tmp_path / "s3-again" / "out", url)
    assert again == local and cached == [True]
    assert len(list((tmp_path / "worker-2").iterdir())) == 1
