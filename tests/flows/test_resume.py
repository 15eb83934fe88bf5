"""A merge node killed (SIGKILL) while writing its checkpoint leaves nothing under its key, and the
next run merges it again: what the flow's resume relies on (run_node skips only finished nodes)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from orchestrator.node import run_node
from orchestrator.plan import plan
from orchestrator.store import CheckpointStore
from tests.orchestrator.families import FamilyModels, make_config, one_thread

REPO = Path(__file__).resolve().parents[2]

KILLED_WHILE_WRITING = """
import json, os, signal, sys
from pathlib import Path
import merge_core.checkpoint as checkpoint
from orchestrator.node import NodeTask, run_node
from orchestrator.store import CheckpointStore

write = checkpoint._write_shards

def write_then_die(*args, **kwargs):
    write(*args, **kwargs)  # the weights are on disk, in the temporary sibling
    os.kill(os.getpid(), signal.SIGKILL)

checkpoint._write_shards = write_then_die
run_node(NodeTask.from_dict(json.loads(sys.argv[1])), CheckpointStore(Path(sys.argv[2])))
"""


def test_a_node_killed_mid_write_leaves_no_checkpoint_and_is_merged_again(
    tiny_base_dir: Path, family_models: FamilyModels, tmp_path: Path
) -> None:
    with one_thread():
        node = plan(make_config(tiny_base_dir, family_models, tmp_path / "out", ["pa", "pb"])).root
    store = CheckpointStore(tmp_path / "store")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    killed = subprocess.run([sys.executable, "-c", KILLED_WHILE_WRITING, json.dumps(node.to_dict()), str(store.root)],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not store.path(node.key).exists() and not store.is_finished(node.key)
    assert [p.name.startswith(f".{node.key}.") and p.name.endswith(".partial") for p in store.root.iterdir()] == [True]

    with one_thread():
        again = run_node(node, store)
        assert not again.cached and store.is_finished(node.key)
        assert run_node(node, store).cached
