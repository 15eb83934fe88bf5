"""hierarchical-merge with ``pools``: refused before any node runs when a node fits no pool or a pool
cannot take nodes (no merge-node deployment, no online worker); a node's run on a pool read back from
the store, a crashed run failing the node's task (so its retries start another). The runs on real
workers are deploy/e2e_distributed.sh's (tests/flows/test_deploy_e2e.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml

from supermerge.flows import pools as pool_flows
from supermerge.flows.hierarchical import hierarchical_merge
from supermerge.flows.node_flow import FROM_STORE_STATE, merge_node_flow
from supermerge.merge_core.config import load_config
from supermerge.orchestrator.errors import PlacementError, RemoteNodeError
from supermerge.orchestrator.node import run_node
from supermerge.orchestrator.plan import plan
from supermerge.orchestrator.stores import open_store
from tests.orchestrator.families import FamilyModels, one_thread

pytestmark = pytest.mark.usefixtures("prefect_api")
ROOMY = [{"name": "test-cpu", "device": "cpu", "memory": "64GB"}]


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    with one_thread():
        yield


@pytest.fixture
def config(tmp_path: Path, tiny_base_dir: Path, family_models: FamilyModels) -> Path:
    """pa, pb, qa (two merge nodes, fan-in 2), a short SuperMerge, its store in tmp_path, no retries."""
    models = family_models
    config = {
        "base": str(tiny_base_dir), "output": str(tmp_path / "out"), "method": "supermerge",
        "parameters": {"steps": 2, "lr": 0.05}, "device": "cpu", "store": str(tmp_path / "store"),
        "models": [{"name": n, "path": str(models[n]["path"]), "validation": str(models[n]["validation"])}
                   for n in ("pa", "pb", "qa")],
        "tree": {"max_fan_in": 2}, "retry": {"retries": 0, "retry_delay_seconds": 0},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _refused(config: Path, pools: list[dict[str, Any]]) -> str:
    state = hierarchical_merge(config=str(config), pools=pools, return_state=True)
    assert state.is_failed()
    with pytest.raises(PlacementError) as caught:
        state.result()
    assert not (config.parent / "out").exists()
    store = config.parent / "store"
    assert not store.exists() or not [p for p in store.iterdir() if not p.name.startswith(".")], \
        "a node ran although the plan was refused"
    return str(caught.value)


def test_a_node_no_pool_holds_is_refused_before_any_node_runs(config: Path) -> None:
    why = _refused(config, [{"name": "small", "device": "cpu", "memory": "1kB"}])
    assert "2 merge node(s) fit no work pool" in why and "small (cpu, 1.00 kB)" in why


def test_a_pool_without_a_deployment_or_an_online_worker_is_refused(config: Path) -> None:
    from prefect import get_client
    from prefect.client.schemas.actions import WorkPoolCreate

    why = _refused(config, ROOMY)
    assert "no deployment merge-node/test-cpu (python -m supermerge.flows.pools deploy --pool test-cpu)" in why

    with get_client(sync_client=True) as client:
        client.create_work_pool(WorkPoolCreate(name="test-cpu", type="process"), overwrite=True)
    merge_node_flow.from_source(source=str(Path(pool_flows.__file__).resolve().parents[1]),
                                entrypoint="flows/node_flow.py:merge_node_flow").deploy(
        name="test-cpu", work_pool_name="test-cpu", print_next_steps=False)
    why = _refused(config, ROOMY)
    assert "test-cpu: no online worker" in why and "no deployment" not in why


def _leaf(config: Path) -> tuple[dict[str, Any], Any]:
    """A leaf node of the plan, and the store, in which it is finished."""
    merged = plan(load_config(config))
    node = next(n for n in merged.nodes if all(c.path is not None for c in n.children))
    store = open_store(config.parent / "store")
    run_node(node, store)
    return node.to_dict(), store


def _fake_run(state: Any) -> Any:
    return lambda *args, **kwargs: SimpleNamespace(name="fake-run", id="0000", state=state)


def test_a_node_run_on_a_pool_is_read_back_from_the_store(config: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from prefect.states import Completed, Crashed

    node, store = _leaf(config)
    monkeypatch.setattr(pool_flows, "run_deployment", _fake_run(Completed()))
    record = pool_flows.run_on_pool.fn(node, "merge-node/x", store.location, [])
    assert record["key"] == node["key"] and record["cached"] is False and record["measured_peak_bytes"] > 0

    monkeypatch.setattr(pool_flows, "run_deployment", _fake_run(Completed(name=FROM_STORE_STATE)))
    state = pool_flows.run_on_pool.fn(node, "merge-node/x", store.location, [])
    assert state.name == FROM_STORE_STATE and state.result()["cached"] is True

    monkeypatch.setattr(pool_flows, "run_deployment", _fake_run(Crashed(message="no heartbeat for 40 s")))
    with pytest.raises(RemoteNodeError, match="ended Crashed: no heartbeat for 40 s"):
        pool_flows.run_on_pool.fn(node, "merge-node/x", store.location, [])


def test_a_completed_run_whose_node_is_not_in_this_flows_store_fails(config: Path, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from prefect.states import Completed

    node, _ = _leaf(config)
    monkeypatch.setattr(pool_flows, "run_deployment", _fake_run(Completed()))
    with pytest.raises(Exception, match="must reach the same store"):
        pool_flows.run_on_pool.fn(node, "merge-node/x", str(tmp_path / "another-store"), [])
