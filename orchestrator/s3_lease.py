"""A lock on S3, where there is no flock: a lease object created with a conditional put.

S3 has no locks and no rename, but it has conditional writes: ``PutObject`` with ``If-None-Match: *``
succeeds only when no object is at the key, and ``If-Match: <etag>`` only when the object is still
the one read (S3 since 2024; MinIO and moto's server as well). A lease is one small JSON object,
``{"owner": ..., "expires": <unix seconds>}``:

- **take**: create it with ``If-None-Match: *``; exactly one of any number of racing workers wins.
- **wait**: the others read it and poll (``poll_seconds``) until it is gone or expired.
- **take over** an expired lease (its holder died, or stalled past ``ttl_seconds``): overwrite it with
  ``If-Match`` on the ETag that was read, so of two workers taking over the same stale lease one wins.
- **renew**: the holder's heartbeat thread rewrites it every ``ttl_seconds / 3`` with ``If-Match`` on
  its own last ETag; a failed renewal means another worker took it over, and ``lost`` is set.
- **release**: delete it with ``If-Match`` on its own ETag (a lease another worker took over is not
  deleted).

Expiry compares the holder's clock with the reader's: the machines' clocks must agree to well within
``ttl_seconds`` (NTP does). A lease is a lease, not a fence: a holder frozen past its expiry may still
write after losing it; callers check ``lost`` before they publish, and the store's entries are keyed
by content, so two writers of one key write the same bytes and the worst case is work done twice.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Any

from fsspec.asyn import sync

from supermerge.orchestrator.errors import StoreError

log = logging.getLogger(__name__)

DEFAULT_TTL_SECONDS = 60.0
"""How long a lease lasts unless renewed; a dead holder's lease is taken over this long after its last renewal."""

DEFAULT_POLL_SECONDS = 0.5
"""How often a waiting worker looks at a lease another worker holds."""


def _condition_failed(e: BaseException) -> bool:
    """``e`` (an s3fs error) is S3 refusing a conditional write: 412 Precondition Failed, or 409
    ConditionalRequestConflict (two conditional writes to one key at the same instant)."""
    seen: BaseException | None = e
    while seen is not None:
        response = getattr(seen, "response", None)
        if isinstance(response, dict):
            code = str(response.get("Error", {}).get("Code", ""))
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            return code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412)
        seen = seen.__cause__
    return False


class S3Lease:
    """The lease on one S3 key (``bucket/key`` in fsspec's spelling), for one holder at a time.

    Use as a context manager: entering waits until this holder has the lease, and keeps it renewed
    until exit, which releases it."""

    def __init__(self, fs: Any, path: str, *, ttl_seconds: float = DEFAULT_TTL_SECONDS,
                 poll_seconds: float = DEFAULT_POLL_SECONDS) -> None:
        if ttl_seconds <= 0 or poll_seconds <= 0:
            raise StoreError(f"lease on {path}: ttl_seconds and poll_seconds must be positive "
                             f"(got {ttl_seconds}, {poll_seconds})")
        self.fs = fs
        self.path = path
        self.bucket, self.key, _ = fs.split_path(path)
        self.ttl_seconds = ttl_seconds
        self.poll_seconds = poll_seconds
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{threading.get_ident()}:{uuid.uuid4().hex[:8]}"
        self.lost = False
        self._etag: str | None = None
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None

    def _body(self) -> bytes:
        return json.dumps({"owner": self.owner, "expires": time.time() + self.ttl_seconds}).encode()

    def _put(self, **condition: str) -> str:
        out = self.fs.call_s3("put_object", Bucket=self.bucket, Key=self.key, Body=self._body(), **condition)
        return str(out["ETag"])

    def _read(self) -> tuple[dict[str, Any] | None, str] | None:
        """(the lease's body, or None when it is not JSON, and its ETag), or None when there is none."""

        async def get() -> tuple[bytes, str]:
            resp = await self.fs._call_s3("get_object", Bucket=self.bucket, Key=self.key)
            try:
                return await resp["Body"].read(), str(resp["ETag"])
            finally:
                resp["Body"].close()

        try:
            raw, etag = sync(self.fs.loop, get)
        except FileNotFoundError:
            return None
        try:
            body = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError):
            return None, etag
        return (body if isinstance(body, dict) else None), etag

    def try_acquire(self) -> bool:
        """Take the lease if it is free or expired; False when another holder has it."""
        try:
            self._etag = self._put(IfNoneMatch="*")
            return True
        except FileExistsError:
            pass
        except OSError as e:
            if not _condition_failed(e):
                raise
            return False
        seen = self._read()
        if seen is None:
            return False  # released meanwhile: the next try creates it
        body, etag = seen
        expires = body.get("expires") if body is not None else None
        if isinstance(expires, (int, float)) and expires > time.time():
            return False
        try:
            self._etag = self._put(IfMatch=etag)
        except OSError as e:
            if not _condition_failed(e):
                raise
            return False  # another worker took it over first
        log.warning("took over the expired lease %s (held by %s)", self.path,
                    body.get("owner") if body is not None else "an unreadable body")
        return True

    def acquire(self) -> None:
        """Wait until this holder has the lease."""
        waited = False
        while not self.try_acquire():
            if not waited:
                log.info("waiting for the lease %s: another worker holds it", self.path)
                waited = True
            time.sleep(self.poll_seconds)
        self.lost = False
        self._stop.clear()
        self._heartbeat = threading.Thread(target=self._renew_until_stopped, name=f"lease {self.key}", daemon=True)
        self._heartbeat.start()

    def renew(self) -> bool:
        """Extend the lease by ``ttl_seconds``; False (and ``lost`` set) when another worker has taken
        it over. An S3 error other than a failed condition is raised (the heartbeat tries again)."""
        try:
            self._etag = self._put(IfMatch=str(self._etag))
            return True
        except OSError as e:
            if not _condition_failed(e):
                raise
        self.lost = True
        log.error("lost the lease %s: another worker took it over (this one stalled past its %.0f s expiry)",
                  self.path, self.ttl_seconds)
        return False

    def _renew_until_stopped(self) -> None:
        while not self._stop.wait(self.ttl_seconds / 3):
            try:
                if not self.renew():
                    return
            except OSError as e:
                log.warning("could not renew the lease %s (%s); trying again", self.path, e)

    def release(self) -> None:
        """Stop renewing and delete the lease, unless another worker has taken it over."""
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join()
            self._heartbeat = None
        if self.lost or self._etag is None:
            return
        try:
            self.fs.call_s3("delete_object", Bucket=self.bucket, Key=self.key, IfMatch=self._etag)
        except FileNotFoundError:
            pass
        except OSError as e:
            if not _condition_failed(e):
                raise
        self._etag = None

    def __enter__(self) -> S3Lease:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
