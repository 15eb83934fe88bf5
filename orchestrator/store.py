"""Content-addressed store of intermediate merged models, so a killed merge tree resumes where it stopped.

A node's key hashes everything its merged model depends on: its children's keys (in order), the base,
the method with its parameters and seed, the task kind, the head prefixes, and the bytes of the
validation data it trains on. A model's key hashes its path and the sha256 of every one of its files'
bytes (each file is read once per process, streamed; the digest is remembered only while the file's
device, inode, size, mtime and ctime are unchanged, and ctime cannot be set back by ``touch -r``,
``cp -p``, ``tar x`` or ``rsync -t``). Change any byte of any input and the key changes, so a stale
model is never reused. A model supermerge wrote (a store entry, a published merge) keeps its key
in ``supermerge.json``; that key is used only while every file still has the recorded checksum.

Each node is written with merge_core's atomic ``write_model_dir`` (a temporary sibling renamed into
place) to ``<root>/<key>/``, with its key and the sha256 of each of its files in ``supermerge.json``.
A node is finished only when that directory exists with a record naming the same key, whole weight
files, and every file matching its checksum; an interrupted write leaves only a ``.<key>.*.partial``
sibling, which never counts, and an entry damaged later (a flipped byte, a cut file) is reported by
``problem`` and merged again.

Several runs may share a store at once (two merges of overlapping trees, a flow's parallel nodes):
``lock`` is a per-key ``fcntl.flock`` on ``<root>/.locks/<key>.lock``, held exclusively while a node
is computed and written and shared while it is read back as an input, so a node is merged once, the
second run waits for it and then reuses it, and no entry is replaced while another run reads it.
The last holder removes the lock file (and the store folders when the store holds nothing else), so a
run that fails leaves nothing behind; a run that finds its lock file replaced while it waited locks
the new one instead.

Backends (``open_store``): a local path is this module's ``CheckpointStore``; a shared filesystem
(NFS, Lustre) mounted on every worker works the same way where it honours ``flock`` across machines
(NFSv4 does; an NFSv3 mount without lockd does not, so use S3 there). An ``s3://bucket/prefix`` URL is
``supermerge.orchestrator.object_store.ObjectStore``: the same keys, record and checksums, published by a
manifest object written last (S3 has no rename) and locked by a lease object created with a
conditional put (S3 has no flock); entries are read through a local cache, since safetensors mmaps a
local file.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import struct
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from supermerge.merge_core.checkpoint import (
    RECORD_FILE,
    SAFETENSORS_INDEX,
    SAFETENSORS_SINGLE,
    file_sha256,
    read_record,
    verify_checksums,
)
from supermerge.merge_core.data import TaskData
from supermerge.orchestrator.errors import StoreError

log = logging.getLogger(__name__)

STORE_FORMAT = 2
"""Bumped whenever what a key covers changes, so old entries are not mistaken for new ones."""

KEY_FIELD = "store_key"
"""The field of ``supermerge.json`` holding the node's key."""

LOCKS_DIR = ".locks"
"""Folder of the store holding one lock file per key that has been computed or read."""

_FINGERPRINTED = (".safetensors", ".bin", ".json", ".pt", ".pth")


def _digest(obj: Any) -> str:
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()


def file_fingerprint(f: Path) -> dict[str, Any]:
    """Size and sha256 of a file's bytes (``supermerge.merge_core.checkpoint.file_sha256``: once per process)."""
    return {"size": f.stat().st_size, "sha256": file_sha256(f)}


def model_key(path: str | os.PathLike[str]) -> str:
    """Key of a task model (a file, a model dir, an adapter dir, or a stored intermediate model)."""
    path = Path(path).resolve()
    if not path.exists():
        raise StoreError(f"{path} does not exist; cannot fingerprint it")
    record = read_record(path) if path.is_dir() else None
    if record is not None and KEY_FIELD in record and verify_checksums(path, record) is None:
        return record[KEY_FIELD]
    if path.is_file():
        files = {path.name: file_fingerprint(path)}
    else:
        files = {
            str(f.relative_to(path)): file_fingerprint(f)
            for f in sorted(path.rglob("*"))
            if f.is_file() and f.suffix in _FINGERPRINTED and not any(p.startswith(".") for p in f.parts)
        }
    return _digest({"format": STORE_FORMAT, "path": str(path), "files": files})


def data_digest(data: Mapping[str, TaskData]) -> str:
    """sha256 of validation data: every task's tensors (name, dtype, shape and bytes), by task name."""
    h = hashlib.sha256()
    for task in sorted(data):
        h.update(f"task:{task}\n".encode())
        for name, t in sorted(data[task].tensors().items()):
            t = t.detach().cpu().contiguous()
            h.update(f"{name}:{t.dtype}:{tuple(t.shape)}\n".encode())
            h.update(t.numpy().tobytes())
    return h.hexdigest()


def node_key(
    children: Sequence[str],
    *,
    base: str,
    method: str,
    params: Mapping[str, Any],
    seed: int,
    kind: str,
    head_prefixes: Sequence[str],
    data: str,
) -> str:
    """Key of a merge node: its children's keys in order, the base's key, how it merges, its data."""
    return _digest({
        "format": STORE_FORMAT,
        "children": list(children),
        "base": base,
        "method": method,
        "params": dict(params),
        "seed": seed,
        "kind": kind,
        "head_prefixes": list(head_prefixes),
        "data": data,
    })


@dataclass(frozen=True)
class CheckpointStore:
    """Finished merge nodes under ``root``, one model dir per key."""

    root: Path

    @property
    def location(self) -> str:
        """Where the store is, as ``open_store`` takes it (and a worker on this filesystem reaches it)."""
        return str(self.root)

    def path(self, key: str) -> Path:
        if not key or any(c not in "0123456789abcdef" for c in key):
            raise StoreError(f"store key {key!r} is not a hex digest")
        return self.root / key

    def _examine(self, key: str) -> tuple[dict[str, Any] | None, str | None]:
        """(the finished node's record, None), or (None, why what is at the key is not finished), or
        (None, None) when nothing is there."""
        folder = self.path(key)
        if not folder.exists():
            return None, None
        if not folder.is_dir():
            return None, f"{folder} is not a directory"
        try:
            record = read_record(folder)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            return None, f"{folder / RECORD_FILE} cannot be read ({e})"
        if not isinstance(record, dict):
            return None, f"{folder} has no readable {RECORD_FILE}"
        if record.get(KEY_FIELD) != key:
            return None, f"{folder / RECORD_FILE} names the key {record.get(KEY_FIELD)!r}, not its folder's"
        problem = _weights_problem(folder) or verify_checksums(folder, record)
        if problem is not None:
            return None, problem
        return record, None

    def record(self, key: str) -> dict[str, Any] | None:
        """The finished node's ``supermerge.json``, or None when it is not finished (absent, partial,
        or damaged: see ``problem``). Its files' checksums are verified, once per process while they
        are unchanged."""
        return self._examine(key)[0]

    def problem(self, key: str) -> str | None:
        """Why the entry at the key is not a finished node (naming the file at fault), or None when
        it is finished or absent."""
        return self._examine(key)[1]

    def is_finished(self, key: str) -> bool:
        return self.record(key) is not None

    def occupied(self, key: str) -> bool:
        """Something is at the key's path that is not a finished node (to be replaced)."""
        return self.path(key).exists() and not self.is_finished(key)

    def publish(self, key: str) -> None:
        """Make the node written at ``path(key)`` visible to other runs: here the atomic rename that
        wrote it did so already, so this only checks it is finished (an object store uploads it)."""
        problem = self.problem(key) if self.path(key).exists() else f"{self.path(key)} does not exist"
        if problem is not None:
            raise StoreError(f"the node {key} was not written whole: {problem}")

    @contextlib.contextmanager
    def lock(self, key: str, *, shared: bool = False) -> Iterator[None]:
        """Hold the key's lock: exclusive (computing and writing the node) or ``shared`` (reading it
        as an input). Waits while another process or thread holds it in a conflicting mode."""
        self.path(key)  # a key that is not a digest names no file
        folder = self.root / LOCKS_DIR
        lock_file = folder / f"{key}.lock"
        mode = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
        while True:
            folder.mkdir(parents=True, exist_ok=True)
            try:
                fh = open(lock_file, "a+b")  # noqa: SIM115 - closed below, after the lock is released
            except FileNotFoundError:
                continue  # the last holder of another key removed the folder meanwhile
            try:
                fcntl.flock(fh, mode | fcntl.LOCK_NB)
            except BlockingIOError:
                log.info("waiting for %s: another run is %s it", self.path(key),
                         "writing" if shared else "writing or reading")
                fcntl.flock(fh, mode)
            if _same_file(fh, lock_file):
                break
            fh.close()  # its last holder removed it while this run waited: lock the file there now
        try:
            yield
        finally:
            try:
                if not shared or _last_holder(fh):
                    lock_file.unlink(missing_ok=True)
                    self._remove_if_empty()
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)
                fh.close()

    def _remove_if_empty(self) -> None:
        """Remove the locks folder and the store folder when the store holds no entry: a failed
        first run leaves nothing. A folder another run writes into is never empty (its lock is there)."""
        with contextlib.suppress(OSError):
            if all(p.name == LOCKS_DIR for p in self.root.iterdir()):
                (self.root / LOCKS_DIR).rmdir()
                self.root.rmdir()


class Store(Protocol):
    """What the node runner, executor and flow use: ``CheckpointStore`` (a folder) and
    ``supermerge.orchestrator.object_store.ObjectStore`` (S3) both are one. ``root`` is a local folder (an object
    store's cache); ``path(key)`` a local model dir to load or write; ``location`` what a worker opens."""

    @property
    def root(self) -> Path: ...
    @property
    def location(self) -> str: ...
    def path(self, key: str) -> Path: ...
    def record(self, key: str) -> dict[str, Any] | None: ...
    def problem(self, key: str) -> str | None: ...
    def is_finished(self, key: str) -> bool: ...
    def occupied(self, key: str) -> bool: ...
    def lock(self, key: str, *, shared: bool = False) -> contextlib.AbstractContextManager[None]: ...
    def publish(self, key: str) -> None: ...


def _same_file(fh: Any, path: Path) -> bool:
    """The open lock file is still the one at ``path`` (not unlinked by its last holder)."""
    try:
        return os.stat(path).st_ino == os.fstat(fh.fileno()).st_ino
    except FileNotFoundError:
        return False


def _last_holder(fh: Any) -> bool:
    """Whether this shared holder is the lock's only holder (it takes the lock exclusively, without
    waiting; flock drops the shared lock either way, and the caller releases it next)."""
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _weights_problem(folder: Path) -> str | None:
    """Why the dir's weight files are not all there and whole (see ``safetensors_complete``)."""
    if (folder / SAFETENSORS_SINGLE).is_file():
        f = folder / SAFETENSORS_SINGLE
        return None if safetensors_complete(f) else f"{f} is not a whole safetensors file"
    index = folder / SAFETENSORS_INDEX
    if not index.is_file():
        return f"{folder} has no {SAFETENSORS_SINGLE} or {SAFETENSORS_INDEX}"
    try:
        shards = set(json.loads(index.read_text())["weight_map"].values())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        return f"{index} is not a readable shard index ({e})"
    if not shards:
        return f"{index} lists no shards"
    for shard in sorted(shards):
        if not safetensors_complete(folder / shard):
            return f"{folder / shard} is missing or not a whole safetensors file"
    return None


def safetensors_complete(f: Path) -> bool:
    """The file holds its whole header and exactly the bytes the header's offsets end at.

    Writes into the store are atomic, so a short file there means something outside supermerge cut
    it (a full disk while copying the store, a crashed sync); it must not count as finished."""
    try:
        with f.open("rb") as fh:
            size_bytes = fh.read(8)
            if len(size_bytes) < 8:
                return False
            (n,) = struct.unpack("<Q", size_bytes)
            if n > f.stat().st_size - 8:
                return False
            header = json.loads(fh.read(n))
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError):
        return False
    return f.stat().st_size == 8 + n + end

