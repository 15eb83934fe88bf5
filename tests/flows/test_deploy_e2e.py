"""deploy/e2e.sh: a real Prefect server, work pool, deployment, worker and event trigger (minutes; slow)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_the_deployment_merges_and_an_arriving_model_triggers_a_re_merge() -> None:
    done = subprocess.run(["bash", str(REPO / "deploy" / "e2e.sh")], cwd=REPO, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "run 2 (triggered by the event)" in done.stdout
