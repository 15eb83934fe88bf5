"""Content-addressed store of intermediate merged models, so a killed merge tree resumes where it stopped.

A node's key hashes everything its merged model depends on: its children's keys (in order), the base,
the method with its parameters and seed, the task kind, the head prefixes, and the bytes of the
validation data it trains on. A model's key hashes its path and a fingerprint of its files (size,
mtime, and the safetensors header, which lists every tensor's dtype, shape and offsets). Change any
input and the key changes, so a stale model is never reused.

Each node is written with merge_core's atomic ``write_model_dir`` (a temporary sibling renamed into
place) to ``<root>/<key>/``, with its key in ``supermerge.json``. A node is finished only when that
directory exists with a record naming the same key and the weights it lists; an interrupted write
leaves only a ``.<key>.*.partial`` sibling, which never counts.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from merge_core.checkpoint import SAFETENSORS_INDEX, SAFETENSORS_SINGLE, read_record
from merge_core.data import TaskData
from orchestrator.errors import StoreError

STORE_FORMAT = 1
"""Bumped whenever what a key covers changes, so old entries are not mistaken for new ones."""

KEY_FIELD = "store_key"
"""The field of ``supermerge.json`` holding the node's key."""

_FINGERPRINTED = (".safetensors", ".bin", ".json", ".pt", ".pth")


def _digest(obj: Any) -> str:
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()


def _safetensors_header(f: Path) -> str:
    """sha256 of a safetensors file's JSON header (names, dtypes, shapes, offsets); cheap to read."""
    with f.open("rb") as fh:
        size_bytes = fh.read(8)
        if len(size_bytes) < 8:
            return "truncated"
        (n,) = struct.unpack("<Q", size_bytes)
        return hashlib.sha256(fh.read(min(n, 100 * 1024**2))).hexdigest()


def file_fingerprint(f: Path) -> dict[str, Any]:
    st = f.stat()
    out: dict[str, Any] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    if f.suffix == ".safetensors":
        out["header"] = _safetensors_header(f)
    return out


def model_key(path: str | os.PathLike[str]) -> str:
    """Key of a task model (a file, a model dir, an adapter dir, or a stored intermediate model)."""
    path = Path(path).resolve()
    if not path.exists():
        raise StoreError(f"{path} does not exist; cannot fingerprint it")
    record = read_record(path) if path.is_dir() else None
    if record is not None and KEY_FIELD in record:
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

    def path(self, key: str) -> Path:
        if not key or any(c not in "0123456789abcdef" for c in key):
            raise StoreError(f"store key {key!r} is not a hex digest")
        return self.root / key

    def record(self, key: str) -> dict[str, Any] | None:
        """The finished node's ``supermerge.json``, or None when it is not finished."""
        folder = self.path(key)
        if not folder.is_dir():
            return None
        try:
            record = read_record(folder)
        except (OSError, json.JSONDecodeError):
            return None
        if record is None or record.get(KEY_FIELD) != key:
            return None
        if not _weights_present(folder):
            return None
        return record

    def is_finished(self, key: str) -> bool:
        return self.record(key) is not None

    def occupied(self, key: str) -> bool:
        """Something is at the key's path that is not a finished node (to be replaced)."""
        return self.path(key).exists() and not self.is_finished(key)


def _weights_present(folder: Path) -> bool:
    """Every weight file the dir names is there and whole (see ``safetensors_complete``)."""
    if (folder / SAFETENSORS_SINGLE).is_file():
        return safetensors_complete(folder / SAFETENSORS_SINGLE)
    index = folder / SAFETENSORS_INDEX
    if not index.is_file():
        return False
    try:
        shards = set(json.loads(index.read_text())["weight_map"].values())
    except (OSError, json.JSONDecodeError, KeyError, TypeError, AttributeError):
        return False
    return bool(shards) and all(safetensors_complete(folder / s) for s in shards)


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

