"""deploy/e2e.sh: a real Prefect server, work pool, deployment, worker, event trigger, versions and a
SIGKILL mid-run (minutes; slow)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_the_deployment_merges_versions_re_merges_on_an_event_and_recovers_from_a_kill() -> None:
    done = subprocess.run(["bash", str(REPO / "deploy" / "e2e.sh")], cwd=REPO, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "run 4 (triggered by the event)" in done.stdout and "run 6 resumed from the store" in done.stdout
    assert "passed; stopping server and worker" in done.stdout
