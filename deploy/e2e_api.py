"""The Prefect server's REST API (PREFECT_API_URL) as the end-to-end checkers call it, and how they fail
(shared by deploy/e2e_check.py and deploy/e2e_distributed_check.py, which run as scripts from deploy/)."""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import httpx

API = os.environ["PREFECT_API_URL"].rstrip("/")


def fail(why: str) -> None:
    print(f"[e2e] CHECK FAILED: {why}", file=sys.stderr)
    sys.exit(1)


def api(method: str, path: str, body: Any = None, attempts: int = 6) -> Any:
    """One REST call; a busy server's 429/5xx or a dropped connection is tried again (as Prefect's own
    client does: its SQLite server answered 503 under load here)."""
    for attempt in range(attempts):
        try:
            response = httpx.request(method, f"{API}{path}", json=body, timeout=30)
            if response.status_code != 429 and response.status_code < 500:
                response.raise_for_status()
                return response.json() if response.content else None
        except httpx.TransportError:
            if attempt == attempts - 1:
                raise
        time.sleep(1 + 2 * attempt)
    response.raise_for_status()
    raise AssertionError
