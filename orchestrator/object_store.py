"""The checkpoint store on S3 (``s3://bucket/prefix``), for workers on several machines.

Keys and what counts as finished are ``supermerge.orchestrator.store``'s; only publishing and locking change,
because S3 has neither rename nor flock. Layout under the prefix:

``<key>/<token>/<file>``  the entry's files, uploaded under a fresh random ``token`` (the temporary key)
``<key>/manifest.json``   written last, in one PUT: the key, the token, and every file's size and sha256
``.locks/<key>.lock``     the writer's lease (``supermerge.orchestrator.s3_lease``)

**Atomic publish**: a reader treats an entry as present only when its manifest exists, names its key,
and every file it lists downloads with the recorded size and sha256; the manifest is the one object
that makes an entry appear, and a PUT is atomic, so a writer killed mid-upload leaves only unlisted
objects under a token (ignored). A damaged entry is rewritten under a new token, and its old token's
objects are deleted once the new manifest is in place (a reader of the damaged entry would have
failed its checksums anyway).

**Locking**: ``lock(key)`` (exclusive, computing a node) holds the key's flock in the local cache (other
processes on this machine) and then the S3 lease (other machines); a lease taken over after expiry is
noticed by ``publish``, which then refuses to write the manifest. ``lock(key, shared=True)`` (reading an
input) is only the local cache's shared flock: a published entry never changes in place, and what a
reader loads is its verified local copy, so no S3 object is needed to keep it steady.

**Local cache**: safetensors needs a local file to mmap, so ``path(key)`` is the entry's folder in a local
cache (``cache_dir``, by default under ``$SUPERMERGE_STORE_CACHE`` or ``~/.cache/supermerge/stores``); ``record`` / ``is_finished`` bring a published entry into it (downloaded into a
temporary sibling, checked against the manifest, renamed into place) and reuse a cached copy whose
files match the manifest. A node is written into the cache as on a local store, then ``publish``
uploads it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from supermerge.merge_core.checkpoint import file_sha256, move_into_place
from supermerge.orchestrator.errors import StoreError
from supermerge.orchestrator.s3_lease import DEFAULT_POLL_SECONDS, DEFAULT_TTL_SECONDS, S3Lease
from supermerge.orchestrator.store import KEY_FIELD, LOCKS_DIR, CheckpointStore

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1


CACHE_ENV = "SUPERMERGE_STORE_CACHE"
"""Environment variable naming the folder under which each S3 store's local cache is kept (a disk
with room for the largest node's inputs and output); default ``~/.cache/supermerge/stores``."""


def default_cache_dir(url: str) -> Path:
    """``<cache root>/<sha256 of the URL, 16 hex>``: one cache per store per machine."""
    root = Path(os.environ[CACHE_ENV]) if os.environ.get(CACHE_ENV) else Path.home() / ".cache" / "supermerge" / "stores"
    return root / hashlib.sha256(url.encode()).hexdigest()[:16]


def s3_filesystem(endpoint_url: str | None = None) -> Any:
    """An s3fs filesystem; credentials and region come from the usual AWS settings (environment,
    ``~/.aws``); ``endpoint_url`` (or ``AWS_ENDPOINT_URL``) for an S3-compatible server."""
    try:
        import s3fs
    except ImportError:
        raise StoreError("an s3:// store needs s3fs: pip install 'supermerge[distributed]'") from None
    client_kwargs = {"endpoint_url": endpoint_url} if endpoint_url else {}
    return s3fs.S3FileSystem(client_kwargs=client_kwargs, skip_instance_cache=True, use_listings_cache=False)


@dataclass(frozen=True)
class ObjectStore:
    """Finished merge nodes under ``url`` (``s3://bucket/prefix``), read and written through ``cache``.

    The same API as ``CheckpointStore``: ``path``, ``record``, ``problem``, ``is_finished``,
    ``occupied``, ``lock``, ``publish``, ``root`` (the local cache folder) and ``location`` (the URL)."""

    url: str
    cache: CheckpointStore
    fs: Any = field(compare=False, repr=False)
    lease_seconds: float = DEFAULT_TTL_SECONDS
    poll_seconds: float = DEFAULT_POLL_SECONDS
    _leases: dict[str, S3Lease] = field(default_factory=dict, compare=False, repr=False)
    _guard: threading.Lock = field(default_factory=threading.Lock, compare=False, repr=False)

    @property
    def root(self) -> Path:
        return self.cache.root

    @property
    def location(self) -> str:
        return self.url

    @property
    def _prefix(self) -> str:
        return self.url.removeprefix("s3://").rstrip("/")

    def _remote(self, key: str, *parts: str) -> str:
        self.cache.path(key)  # a key that is not a digest names no object
        return "/".join([self._prefix, key, *parts])

    def path(self, key: str) -> Path:
        return self.cache.path(key)

    def _manifest(self, key: str) -> tuple[dict[str, Any] | None, str | None]:
        """(the manifest, None), or (None, why it is not usable), or (None, None) when there is none."""
        where = f"s3://{self._remote(key, MANIFEST)}"
        try:
            raw = self.fs.cat_file(self._remote(key, MANIFEST))
        except FileNotFoundError:
            return None, None
        try:
            manifest = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            return None, f"{where} is not readable JSON ({e})"
        if not isinstance(manifest, dict) or manifest.get(KEY_FIELD) != key:
            named = manifest.get(KEY_FIELD) if isinstance(manifest, dict) else None
            return None, f"{where} names the key {named!r}, not its own"
        files, token = manifest.get("files"), manifest.get("token")
        if not isinstance(token, str) or not token.isalnum() or not isinstance(files, dict) or not files:
            return None, f"{where} lists no token or no files"
        for rel, meta in files.items():
            if (not isinstance(rel, str) or rel.startswith("/") or ".." in rel.split("/")
                    or not isinstance(meta, dict) or not isinstance(meta.get("sha256"), str)):
                return None, f"{where} lists {rel!r}, which is not a file of the entry with its sha256"
        return manifest, None

    def _cached_matches(self, key: str, manifest: dict[str, Any]) -> bool:
        """The local copy holds exactly the manifest's files with their checksums."""
        folder = self.cache.path(key)
        if not folder.is_dir():
            return False
        here = {str(f.relative_to(folder)) for f in folder.rglob("*") if f.is_file()}
        if here != set(manifest["files"]):
            return False
        return all(file_sha256(folder / rel) == meta["sha256"] for rel, meta in manifest["files"].items())

    def _download(self, key: str, manifest: dict[str, Any]) -> str | None:
        """Bring the entry into the cache; why it could not be (a file missing or not as recorded)."""
        folder = self.cache.path(key)
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = folder.parent / f".{key}.{uuid.uuid4().hex[:8]}.download"
        try:
            for rel, meta in sorted(manifest["files"].items()):
                remote = self._remote(key, manifest["token"], rel)
                local = tmp / rel
                local.parent.mkdir(parents=True, exist_ok=True)
                try:
                    self.fs.get_file(remote, str(local))
                except FileNotFoundError:
                    return f"s3://{remote} is missing (listed in the entry's {MANIFEST})"
                if file_sha256(local) != meta["sha256"]:
                    return f"s3://{remote} does not have the sha256 its {MANIFEST} records"
            if self._cached_matches(key, manifest):
                return None  # another process on this machine brought it in meanwhile
            move_into_place(tmp, folder)
            log.info("downloaded s3://%s into %s", self._remote(key), folder)
            return None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _examine(self, key: str) -> tuple[dict[str, Any] | None, str | None]:
        manifest, problem = self._manifest(key)
        if manifest is None:
            return None, problem
        if not self._cached_matches(key, manifest):
            problem = self._download(key, manifest)
            if problem is not None:
                return None, problem
        record, problem = self.cache._examine(key)
        return record, (f"s3://{self._remote(key)}: {problem}" if problem else None)

    def record(self, key: str) -> dict[str, Any] | None:
        """The published node's ``supermerge.json`` (its entry brought into the local cache), or None
        when it is not published or not whole (see ``problem``)."""
        return self._examine(key)[0]

    def problem(self, key: str) -> str | None:
        """Why the published entry at the key is not a finished node, or None when it is finished or
        not published (files without a manifest are an unfinished write: absent)."""
        return self._examine(key)[1]

    def is_finished(self, key: str) -> bool:
        return self.record(key) is not None

    def occupied(self, key: str) -> bool:
        """The local cache holds something at the key (a copy to replace when the node is rewritten)."""
        return self.cache.path(key).exists()

    @contextlib.contextmanager
    def lock(self, key: str, *, shared: bool = False) -> Iterator[None]:
        """Exclusive: the local cache's flock, then the key's S3 lease; shared: the local flock only."""
        with self.cache.lock(key, shared=shared):
            if shared:
                yield
                return
            lease = S3Lease(self.fs, f"{self._prefix}/{LOCKS_DIR}/{key}.lock",
                            ttl_seconds=self.lease_seconds, poll_seconds=self.poll_seconds)
            with lease:
                with self._guard:
                    self._leases[key] = lease
                try:
                    yield
                finally:
                    with self._guard:
                        self._leases.pop(key, None)

    def publish(self, key: str) -> None:
        """Upload the node written at ``path(key)`` under a new token, then its manifest, last.

        Call under ``lock(key)``; refused when the lease was lost (another worker took it over)."""
        with self._guard:
            lease = self._leases.get(key)
        if lease is None:
            raise StoreError(f"publishing {key} to {self.url} without holding its lock; take store.lock(key) first")
        folder = self.cache.path(key)
        problem = self.cache.problem(key) or (None if folder.is_dir() else f"{folder} does not exist")
        if problem is not None:
            raise StoreError(f"cannot publish {folder} to {self.url}: {problem}; the node was not written whole")
        files = {str(f.relative_to(folder)): {"size": f.stat().st_size, "sha256": file_sha256(f)}
                 for f in sorted(folder.rglob("*")) if f.is_file()}
        token = uuid.uuid4().hex
        for rel in files:
            self.fs.put_file(str(folder / rel), self._remote(key, token, rel))
        old, _ = self._manifest(key)
        if lease.lost:
            self.fs.rm(self._remote(key, token), recursive=True)
            raise StoreError(f"lost the lock on {key} in {self.url} while writing it (another worker took it "
                             "over after its lease expired); not published: run the node again")
        manifest = {"format": MANIFEST_FORMAT, KEY_FIELD: key, "token": token, "files": files}
        self.fs.pipe_file(self._remote(key, MANIFEST), json.dumps(manifest, indent=1, sort_keys=True).encode())
        if old is not None and old["token"] != token:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm(self._remote(key, old["token"]), recursive=True)
        log.info("published %s to s3://%s (%d files)", folder, self._remote(key), len(files))
