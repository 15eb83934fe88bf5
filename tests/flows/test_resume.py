"""Kill and resume, and two runs sharing one store, with real processes and SIGKILL.

A merge node killed while writing its checkpoint leaves nothing under its key, and the next run merges
it again. ``supermerge merge`` and the ``hierarchical-merge`` flow killed between two nodes or in the
middle of one resume on the next run: finished nodes are reused (counted), and the published model is
byte for byte the one an uninterrupted run publishes. Two merges of overlapping trees started at once
on one store merge their common node once: the second waits for the first, then reuses its checkpoint.

The killed runs are subprocesses of ``tests.flows.pausing``, which holds still at the chosen point so
the kill lands there every time; the reference and the resumed runs run here, on one torch thread.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from supermerge.flows.cli import main
from supermerge.orchestrator.publish import REPORT_FILE
from supermerge.orchestrator.stores import STORE_DIR
from supermerge.orchestrator.node import run_node
from supermerge.orchestrator.plan import plan
from supermerge.orchestrator.store import LOCKS_DIR, CheckpointStore
from tests.orchestrator.families import FamilyModels, config_dict, make_config, one_thread

REPO = Path(__file__).resolve().parents[2]

KILLED_WHILE_WRITING = """
import json, os, signal, sys
from pathlib import Path
import supermerge.merge_core.checkpoint as checkpoint
from supermerge.orchestrator.node import NodeTask, run_node
from supermerge.orchestrator.store import CheckpointStore

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
    left = [p.name for p in store.root.iterdir() if p.name != LOCKS_DIR]
    assert [n.startswith(f".{node.key}.") and n.endswith(".partial") for n in left] == [True]

    with one_thread():
        again = run_node(node, store)
        assert not again.cached and store.is_finished(node.key)
        assert run_node(node, store).cached


# --- kill and resume --------------------------------------------------------------------------------

TREE = ["pa", "pb", "qa", "qb"]
"""Merged at fan-in 2: two family nodes (planned first and second), then the root."""
COMPARED = ("model.safetensors", "merge_weights.safetensors", *(f"heads/{t}.safetensors" for t in TREE))
WAIT_SECONDS = 240


@dataclass(frozen=True)
class Reference:
    """An uninterrupted ``supermerge merge`` of TREE: where it published, and its nodes in plan order."""

    output: Path
    nodes: list[dict[str, Any]]


def _write_config(folder: Path, base: Path, models: FamilyModels, names: list[str]) -> Path:
    """A config merging ``names`` at fan-in 2 into ``<folder>/out/merged`` (the store: ``out/.supermerge-store``)."""
    folder.mkdir(parents=True, exist_ok=True)
    raw = config_dict(base, models, Path("out/merged"), names, tree={"max_fan_in": 2})
    raw["output"] = "out/merged"
    (folder / "config.yaml").write_text(yaml.safe_dump(raw))
    return folder / "config.yaml"


@pytest.fixture(scope="module")
def reference(tiny_base_dir: Path, family_models: FamilyModels, tmp_path_factory: pytest.TempPathFactory) -> Reference:
    config = _write_config(tmp_path_factory.mktemp("reference"), tiny_base_dir, family_models, TREE)
    with one_thread():
        assert main(["merge", str(config)]) == 0
    output = config.parent / "out" / "merged"
    nodes = json.loads((output / REPORT_FILE).read_text())["plan"]["nodes"]
    assert [len(n["children"]) for n in nodes] == [2, 2, 2]
    return Reference(output, nodes)


def _same_bytes(output: Path, reference: Reference) -> None:
    for name in COMPARED:
        assert (output / name).read_bytes() == (reference.output / name).read_bytes(), name


def _finished(store: CheckpointStore, reference: Reference) -> list[str]:
    return [n["id"] for n in reference.nodes if store.is_finished(n["key"])]


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **extra}


def _start_paused(key: str, where: str, work: Path, what: str, config: Path, *rest: str,
                  until: Path | None = None, env: dict[str, str] | None = None) -> tuple[subprocess.Popen[bytes], Path]:
    """A ``tests.flows.pausing`` process that holds at ``where`` in the node ``key``; returns it and
    the marker it writes when it gets there."""
    marker = work / f"at-{where}-{key[:8]}"
    held = ["--until", str(until)] if until else []
    args = [sys.executable, "-m", "tests.flows.pausing", key, where, str(marker), *held, what, str(config), *rest]
    log = (work / f"{marker.name}.log").open("wb")
    return subprocess.Popen(args, cwd=REPO, env=env or _env(), stdout=log, stderr=subprocess.STDOUT), marker


def _wait_for(path: Path, process: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + WAIT_SECONDS
    while not path.exists():
        if process.poll() is not None:
            log = Path(str(path) + ".log")
            raise AssertionError(f"the process ended ({process.returncode}) before {what}:\n"
                                 f"{log.read_text()[-4000:] if log.exists() else ''}")
        assert time.monotonic() < deadline, f"no {what} within {WAIT_SECONDS} s"
        time.sleep(0.05)


def _kill_at(key: str, where: str, work: Path, what: str, config: Path, *rest: str,
             env: dict[str, str] | None = None) -> None:
    process, marker = _start_paused(key, where, work, what, config, *rest, env=env)
    try:
        _wait_for(marker, process, f"reaching {where} in node {key[:8]}")
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.kill()
        process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL


def test_supermerge_merge_killed_between_nodes_then_mid_node_resumes_reusing_finished_nodes(
    reference: Reference, tiny_base_dir: Path, family_models: FamilyModels, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    config = _write_config(tmp_path, tiny_base_dir, family_models, TREE)
    output, store = tmp_path / "out" / "merged", CheckpointStore(tmp_path / "out" / STORE_DIR)
    first, second, root = reference.nodes

    # killed between nodes: the first node's checkpoint is written, the second has not started
    _kill_at(first["key"], "saved", tmp_path, "merge", str(config))
    assert _finished(store, reference) == [first["id"]] and not output.exists()

    # killed in the middle of the second node (merged in memory, nothing written); the first is reused
    _kill_at(second["key"], "merging", tmp_path, "merge", str(config))
    assert _finished(store, reference) == [first["id"]] and not output.exists()
    assert not store.path(second["key"]).exists()

    with one_thread():
        assert main(["merge", str(config)]) == 0
    assert "1 reused from the store" in capsys.readouterr().out
    report = json.loads((output / REPORT_FILE).read_text())
    assert [(n["id"], n["cached"]) for n in report["nodes"]] == [(first["id"], True), (second["id"], False),
                                                                 (root["id"], False)]
    _same_bytes(output, reference)
    assert sorted(p.name for p in store.root.iterdir()) == sorted([LOCKS_DIR, *(n["key"] for n in reference.nodes)])


def test_the_flow_killed_mid_node_resumes_reusing_finished_nodes(
    reference: Reference, tiny_base_dir: Path, family_models: FamilyModels, tmp_path: Path, prefect_api: None,
) -> None:
    """One node at a time (max_parallel=1), so the kill finds the first node finished and the second
    one merging, as with the plain executor; the flow's resumed run reuses the first."""
    from prefect.settings import PREFECT_API_URL

    from supermerge.flows.hierarchical import hierarchical_merge

    config = _write_config(tmp_path, tiny_base_dir, family_models, TREE)
    output, store = tmp_path / "out" / "merged", CheckpointStore(tmp_path / "out" / STORE_DIR)
    first, second, root = reference.nodes
    _kill_at(second["key"], "merging", tmp_path, "flow", str(config), json.dumps({"max_parallel": 1}),
             env=_env(PREFECT_API_URL=str(PREFECT_API_URL.value())))
    assert _finished(store, reference) == [first["id"]] and not output.exists()

    with one_thread():
        state = hierarchical_merge(config=str(config), max_parallel=1, return_state=True)
    assert state.is_completed(), state.message
    result = state.result()
    assert result["merged"] == 2 and result["from_store"] == 1
    cached = {n["id"]: n["cached"] for n in result["nodes"]}
    assert cached == {first["id"]: True, second["id"]: False, root["id"]: False}
    _same_bytes(output, reference)


# --- two runs sharing a store -----------------------------------------------------------------------


def test_two_overlapping_merges_at_once_merge_their_common_node_once(
    reference: Reference, tiny_base_dir: Path, family_models: FamilyModels, tmp_path: Path,
) -> None:
    """Run A (pa pb: one node) holds in that node, merged but not written, with the node's lock. Run B
    (pa pb qa: pa+pb, then the root) starts on the same store, reaches pa+pb and waits for that lock;
    then A goes on. B must reuse A's checkpoint (not merge it again, not trip over A's rename), and no
    file may be torn: every entry verifies against its checksums and holds the reference's bytes."""
    shared = tmp_path / "out"
    config_a = _write_config(tmp_path / "a", tiny_base_dir, family_models, ["pa", "pb"])
    config_b = _write_config(tmp_path / "b", tiny_base_dir, family_models, ["pa", "pb", "qa"])
    outputs = {"a": shared / "a", "b": shared / "b"}
    common = reference.nodes[0]
    assert common["tasks"] == ["pa", "pb"]
    go = tmp_path / "go"

    a, marker = _start_paused(common["key"], "merging", tmp_path, "merge", str(config_a), "--output", str(outputs["a"]),
                              until=go)
    b = None
    try:
        _wait_for(marker, a, "run A merging pa+pb")
        b_log = tmp_path / "b.log"
        with b_log.open("wb") as log:
            b = subprocess.Popen([sys.executable, "-m", "supermerge.flows.cli", "-v", "merge", str(config_b), "--output",
                                  str(outputs["b"])], cwd=REPO, env=_env(), stdout=log, stderr=subprocess.STDOUT)
        waiting = f"waiting for {shared / STORE_DIR / common['key']}"
        deadline = time.monotonic() + WAIT_SECONDS
        while waiting not in b_log.read_text():
            assert b.poll() is None, f"run B ended ({b.returncode}) without waiting:\n{b_log.read_text()[-4000:]}"
            assert time.monotonic() < deadline, "run B never waited for the node run A holds"
            time.sleep(0.05)
        go.write_text("go")
        assert a.wait(timeout=WAIT_SECONDS) == 0, Path(str(marker) + ".log").read_text()[-4000:]
        assert b.wait(timeout=WAIT_SECONDS) == 0, b_log.read_text()[-4000:]
    finally:
        for process in (a, b):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait()

    reports = {run: json.loads((out / REPORT_FILE).read_text()) for run, out in outputs.items()}
    by_key = {run: {n["key"]: n for n in r["nodes"]} for run, r in reports.items()}
    assert list(by_key["a"]) == [common["key"]] and not by_key["a"][common["key"]]["cached"]
    assert len(by_key["b"]) == 2 and by_key["b"][common["key"]]["cached"]  # B waited, then reused it
    store = CheckpointStore(shared / STORE_DIR)
    keys = set(by_key["b"])
    assert all(store.is_finished(k) for k in keys)
    assert sorted(p.name for p in store.root.iterdir()) == sorted([LOCKS_DIR, *keys])  # no partial left
    weights = (reference.output.parent / STORE_DIR / common["key"] / "model.safetensors").read_bytes()
    assert (outputs["a"] / "model.safetensors").read_bytes() == weights
    assert (store.path(common["key"]) / "model.safetensors").read_bytes() == weights
