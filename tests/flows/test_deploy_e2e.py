"""deploy/e2e.sh: a real Prefect server, work pool, deployment, worker, event trigger, versions and a
SIGKILL mid-run; deploy/e2e_distributed.sh: merge nodes on two workers through an S3 store (moto),
one worker killed mid-node (minutes each; slow)."""

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


@pytest.mark.slow
def test_nodes_on_two_workers_overlap_survive_a_killed_worker_and_give_the_single_process_bytes() -> None:
    done = subprocess.run(["bash", str(REPO / "deploy" / "e2e_distributed.sh")], cwd=REPO, capture_output=True,
                          text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    for step in ("siblings: {", "distributed vs reference: {\"identical_files\"", "retried: {",
                 "killed-and-retried vs reference: {\"identical_files\"", "peaks, siblings at once vs alone: {",
                 "passed; stopping servers and workers"):
        assert step in done.stdout, step
