"""The ``hierarchical-merge`` flow on the tiny family task models, checked through Prefect's own client.

One workspace (config, registry, output, store) is merged once for the module; a re-run and a
registration work on copies of it, so each test stands alone. The config names pa, pb, qa, qb and a
registry that holds ra; rb arrives later. Fan-in 2.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
import yaml

from supermerge.flows.hierarchical import PROGRESS_KEY, REPORT_KEY, hierarchical_merge
from supermerge.flows.node_flow import FROM_STORE_STATE, FROM_STORE_TAG
from supermerge.flows.registry import register
from supermerge.orchestrator.publish import REPORT_FILE
from supermerge.orchestrator.incremental import path_to_root
from supermerge.orchestrator.tree import MergeTree
from tests.orchestrator.families import one_thread

pytestmark = pytest.mark.usefixtures("prefect_api")


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    with one_thread():
        yield


IN_CONFIG = ["pa", "pb", "qa", "qb"]
REGISTERED = "ra"
ARRIVING = "rb"


def _write_config(root: Path, base: Path, models: dict[str, dict[str, Path]], names: list[str] = IN_CONFIG,
                  registry: str | None = "registry") -> Path:
    """A config with paths relative to its folder (so a copied workspace is self-contained)."""
    config = {
        "base": str(base),
        "output": "out/merged",
        "method": "supermerge",
        "parameters": {"steps": 3, "lr": 0.05},
        "device": "cpu",
        "models": [{"name": n, "path": str(models[n]["path"]), "validation": str(models[n]["validation"]),
                    "test": str(models[n]["validation"])} for n in names],
        "tree": {"max_fan_in": 2},
        "retry": {"retries": 1, "retry_delay_seconds": 0},
        **({"registry": registry} if registry else {}),
    }
    f = root / "config.yaml"
    f.write_text(yaml.safe_dump(config))
    return f


def _run(config: Path, **params: Any) -> tuple[dict[str, Any], UUID, float]:
    started = time.perf_counter()
    state = hierarchical_merge(config=str(config), return_state=True, **params)
    wall = time.perf_counter() - started
    assert state.is_completed(), state.message
    return state.result(), state.state_details.flow_run_id, wall


def _report(result: dict[str, Any]) -> dict[str, Any]:
    return json.loads((Path(result["output"]) / REPORT_FILE).read_text())


def _merge_task_runs(flow_run_id: UUID) -> list[Any]:
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import TaskRunSort

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
                                     sort=TaskRunSort.EXPECTED_START_TIME_ASC, limit=200)
    return [r for r in runs if r.name.startswith("merge-")]


def _artifact_versions(flow_run_id: UUID) -> list[Any]:
    """Every version of the flow run's artifacts, oldest first (by a plain filter request: the sync
    client's read_artifacts sends null filters this server refuses, and an empty task-run filter would
    drop the flow's own)."""
    from prefect import get_client
    from prefect.client.schemas.objects import Artifact

    with get_client(sync_client=True) as client:
        response = client.request("POST", "/artifacts/filter",
                                  json={"artifacts": {"flow_run_id": {"any_": [str(flow_run_id)]}}, "limit": 200,
                                        "sort": "CREATED_DESC"})
    return [Artifact.model_validate(a) for a in reversed(response.json())]


def _artifacts(flow_run_id: UUID) -> list[Any]:
    """The latest version of each of the flow run's artifacts."""
    return list({a.key: a for a in _artifact_versions(flow_run_id)}.values())


def _overhead(result: dict[str, Any], wall: float) -> str:
    """Prefect's overhead per node: (flow wall time - planning - publishing - the nodes' own run_node
    seconds) / nodes, which spreads the flow run's fixed cost over the nodes; and the same over the
    node phase only (submitting, running and collecting the task runs)."""
    merged = sum(n["seconds"] for n in result["nodes"] if not n["cached"])
    n = len(result["nodes"])
    whole = (wall - result["plan_seconds"] - result["finish_seconds"] - merged) / n
    return f"{whole:.2f} s per node over the flow run, {(result['nodes_seconds'] - merged) / n:.2f} s in the node phase"


@pytest.fixture(scope="module")
def workspace(tiny_base_dir: Path, family_models: dict[str, dict[str, Path]],
              tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("hierarchical")
    m = family_models[REGISTERED]
    register(m["path"], REGISTERED, m["validation"], root / "registry", base=tiny_base_dir)
    _write_config(root, tiny_base_dir, family_models)
    return root


@pytest.fixture(scope="module")
def first_run(workspace: Path) -> tuple[dict[str, Any], UUID, float]:
    """One node at a time (max_parallel=1), so the overhead below is not hidden by overlap."""
    with one_thread():
        return _run(workspace / "config.yaml", evaluate=True, max_parallel=1)


def _copy(workspace: Path, tmp_path: Path) -> Path:
    target = tmp_path / "ws"
    shutil.copytree(workspace, target, symlinks=True)
    return target / "config.yaml"


def test_one_completed_task_run_per_node_with_the_tree_as_edges(first_run: tuple[dict[str, Any], UUID, float]) -> None:
    result, flow_run_id, wall = first_run
    report = _report(result)
    nodes = report["plan"]["nodes"]
    tree = MergeTree.from_nested(report["plan"]["groups"])
    assert sorted(tree.models()) == sorted([*IN_CONFIG, REGISTERED])
    assert len(nodes) == len(tree.merges()) == 4 and result["merged"] == 4 and result["from_store"] == 0
    assert ["pa", "pb"] in _groups(tree) and ["qa", "qb"] in _groups(tree)  # families merge first

    runs = _merge_task_runs(flow_run_id)
    assert sorted(r.name for r in runs) == sorted(n["id"] for n in nodes)
    assert tree.root in {r.name for r in runs} and tree.root.startswith("merge-pa+pb+qa+qb+1 more")
    assert {"merge-pa+pb", "merge-qa+qb"} <= {r.name for r in runs}
    assert all(r.state is not None and r.state.is_completed() for r in runs)
    assert all(r.empirical_policy.retries == 1 for r in runs)  # the config's retry policy
    node_of_run = {r.id: r.name for r in runs}
    for n in nodes:
        run = next(r for r in runs if r.name == n["id"])
        upstream = {node_of_run[i.id] for i in run.task_inputs["children"]}
        assert upstream == {c["name"] for c in n["children"] if c["path"] is None}, n["id"]
        assert run.task_inputs["node"] == [] and run.task_inputs["store_dir"] == [], run.task_inputs  # no false edges

    by_key = {a.key: a for a in _artifacts(flow_run_id)}
    assert by_key[PROGRESS_KEY].type == "progress" and float(by_key[PROGRESS_KEY].data) == 100.0
    markdown = by_key[REPORT_KEY].data
    assert all(f"| {n['id']} |" in markdown for n in nodes) and "4 merged" in markdown
    assert "published" in markdown and "pending" not in markdown and "running" not in markdown
    # live: planning first, then the whole tree pending, then every start and end (4 nodes: 8 changes)
    live = [a.data for a in _artifact_versions(flow_run_id) if a.key == REPORT_KEY]
    assert live[0].startswith("## planning") and "4 pending" in live[1] and len(live) >= 2 + 2 * len(nodes)
    assert any("1 running" in m and "3 pending" in m for m in live)
    assert "Test accuracy" in markdown and "individual" in markdown
    assert set(result["test_accuracy"]) == set(IN_CONFIG)  # ra was registered without test data
    print("\n" + markdown)
    phases = f"plan {result['plan_seconds']:.1f} s, publish+evaluate {result['finish_seconds']:.1f} s"
    print(f"\nfresh run, one node at a time: {len(nodes)} nodes, wall {wall:.1f} s ({phases}); Prefect overhead "
          f"{_overhead(result, wall)} (the session's first flow run also pays Prefect's one-off warm-up)")


def _groups(tree: MergeTree) -> list[list[str]]:
    return [tree.children(n) for n in tree.merges()]


def test_rerun_merges_nothing(first_run: tuple[dict[str, Any], UUID, float], workspace: Path, tmp_path: Path) -> None:
    config = _copy(workspace, tmp_path)
    result, flow_run_id, wall = _run(config, overwrite=True)
    assert result["merged"] == 0 and result["from_store"] == 4
    runs = _merge_task_runs(flow_run_id)
    assert len(runs) == 4 and all(r.state.is_completed() for r in runs)
    assert all(r.state.name == FROM_STORE_STATE and FROM_STORE_TAG in r.tags for r in runs)
    assert _report(result)["plan"]["groups"] == _report(first_run[0])["plan"]["groups"]
    print(f"\nre-run, every node from the store: wall {wall:.1f} s; Prefect overhead {_overhead(result, wall)}")


def test_registered_model_merges_only_its_path_to_the_root(
    first_run: tuple[dict[str, Any], UUID, float], workspace: Path, tmp_path: Path, tiny_base_dir: Path,
    family_models: dict[str, dict[str, Path]],
) -> None:
    config = _copy(workspace, tmp_path)
    before = _report(first_run[0])
    m = family_models[ARRIVING]
    done = register(m["path"], ARRIVING, m["validation"], config.parent / "registry")
    assert done.event_id is not None  # a Prefect API is configured: the trigger's event went out

    result, _, wall = _run(config, overwrite=True)
    after = _report(result)
    old_tree, new_tree = MergeTree.from_nested(before["plan"]["groups"]), MergeTree.from_nested(after["plan"]["groups"])
    path = path_to_root(new_tree, ARRIVING)
    # rb joins ra (its family): ra's place becomes merge(ra, rb), then every node above it is new
    assert new_tree.children(path[0]) == [REGISTERED, ARRIVING]
    assert len(path) == len(path_to_root(old_tree, REGISTERED)) + 1
    merged = {n["id"] for n in result["nodes"] if not n["cached"]}
    assert merged == set(path) and len(merged) == len(path)
    assert result["from_store"] == len(new_tree.merges()) - len(path) == len(old_tree.merges()) - len(path) + 1
    old_nodes = {(n["id"], n["key"]) for n in before["plan"]["nodes"]}
    kept = {(n["id"], n["key"]) for n in after["plan"]["nodes"] if n["id"] not in path}
    assert kept and kept <= old_nodes  # the same subtrees, under the same names
    assert "merge-qa+qb" in {n for n, _ in kept} and "merge-ra+rb" in path
    print(f"\nregistered {ARRIVING}: Prefect overhead {_overhead(result, wall)}")
    print(f"registered {ARRIVING}: {len(merged)} of {len(new_tree.merges())} nodes merged ({sorted(merged)}), "
          f"{result['from_store']} from the store")


def test_a_failing_node_is_retried_then_fails_the_flow_and_its_parent_never_runs(
    tiny_base_dir: Path, family_models: dict[str, dict[str, Path]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    import supermerge.flows.hierarchical

    config = _write_config(tmp_path, tiny_base_dir, family_models, ["pa", "pb", "qa"], registry=None)
    calls: list[tuple[str, ...]] = []
    real = supermerge.flows.hierarchical.run_node

    def disk_gone_for_pa_pb(node: Any, store: Any, **kwargs: Any) -> Any:
        calls.append(node.tasks)
        if node.tasks == ("pa", "pb"):
            raise OSError("No space left on device")
        return real(node, store, **kwargs)

    monkeypatch.setattr(supermerge.flows.hierarchical, "run_node", disk_gone_for_pa_pb)
    state = hierarchical_merge(config=str(config), return_state=True)
    assert state.is_failed() and "No space left" in (state.message or "")
    assert calls == [("pa", "pb"), ("pa", "pb")]  # tried twice (retries: 1); the root never ran
    runs = {r.name: r for r in _merge_task_runs(state.state_details.flow_run_id)}
    failed = runs["merge-pa+pb"]
    assert failed.state.is_failed() and failed.run_count == 2
    assert "merge-pa+pb+qa" not in runs or not runs["merge-pa+pb+qa"].state.is_completed()
    markdown = {a.key: a for a in _artifacts(state.state_details.flow_run_id)}[REPORT_KEY].data
    assert "failed: " in markdown and "not run (an input failed)" in markdown
    assert not (tmp_path / "out" / "merged").exists()


def test_cli_prefect_option_runs_the_flow_and_gives_the_plain_executors_bytes(
    tiny_base_dir: Path, family_models: dict[str, dict[str, Path]], tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    """``supermerge merge --prefect`` runs the same nodes through the flow (a flow run on the server,
    one task run per node) and publishes the same bytes as the plain executor, each with its own store."""
    from prefect import get_client
    from prefect.client.schemas.sorting import FlowRunSort

    from supermerge.flows.cli import main

    config = _write_config(tmp_path, tiny_base_dir, family_models, ["pa", "pb", "qa"], registry=None)
    plain, flowed = tmp_path / "plain" / "merged", tmp_path / "flowed" / "merged"
    assert main(["merge", str(config), "--output", str(plain)]) == 0
    assert main(["merge", str(config), "--output", str(flowed), "--prefect"]) == 0
    out = capsys.readouterr().out
    assert "merged with the hierarchical-merge flow in" in out and f"-> {flowed}" in out
    assert "2 merged, 0 from the store" in out and "test accuracy:       pa " in out
    for name in ("model.safetensors", "merge_weights.safetensors", "heads/pa.safetensors"):
        assert (flowed / name).read_bytes() == (plain / name).read_bytes(), name
    report = json.loads((flowed / REPORT_FILE).read_text())
    with get_client(sync_client=True) as client:
        [latest] = client.read_flow_runs(sort=FlowRunSort.EXPECTED_START_TIME_DESC, limit=1)
    assert latest.state is not None and latest.state.is_completed()
    assert sorted(r.name for r in _merge_task_runs(latest.id)) == sorted(n["id"] for n in report["plan"]["nodes"])


def test_a_node_out_of_memory_fails_alone_and_its_independent_sibling_completes(
    tiny_base_dir: Path, family_models: dict[str, dict[str, Path]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """pa+pb and qa+qb hang under the root; qa+qb's merge cannot allocate. It fails with the node's own
    clear error (tried twice: retries 1), pa+pb completes and stays in the store for the next run, the
    root never runs, and nothing is published."""
    import supermerge.orchestrator.node
    from supermerge.orchestrator.stores import default_store_dir
    from supermerge.orchestrator.store import CheckpointStore

    config = _write_config(tmp_path, tiny_base_dir, family_models, ["pa", "pb", "qa", "qb"], registry=None)
    merge = supermerge.orchestrator.node.merge

    def qa_qb_runs_out(base: Any, vectors: Any, *args: Any, **kwargs: Any) -> Any:
        if sorted(v.name for v in vectors) == ["qa", "qb"]:
            raise MemoryError
        return merge(base, vectors, *args, **kwargs)

    monkeypatch.setattr(supermerge.orchestrator.node, "merge", qa_qb_runs_out)
    state = hierarchical_merge(config=str(config), return_state=True)
    assert state.is_failed() and "(2 inputs, 2 tasks) ran out of memory on cpu (MemoryError)" in (state.message or "")
    runs = {r.name.removeprefix("merge-"): r for r in _merge_task_runs(state.state_details.flow_run_id)}
    assert runs["pa+pb"].state.is_completed()
    assert runs["qa+qb"].state.is_failed() and runs["qa+qb"].run_count == 2
    assert "pa+pb+qa+qb" not in runs or not runs["pa+pb+qa+qb"].state.is_completed()
    markdown = {a.key: a for a in _artifacts(state.state_details.flow_run_id)}[REPORT_KEY].data
    assert "ran out of memory" in markdown and "not run (an input failed)" in markdown
    output = tmp_path / "out" / "merged"
    assert not output.exists()
    store = CheckpointStore(default_store_dir(output))
    finished = [p.name for p in store.root.iterdir() if not p.name.startswith(".") and store.is_finished(p.name)]
    assert len(finished) == 1 and store.record(finished[0])["tasks"] == ["pa", "pb"]


def test_versioned_runs_publish_v1_then_up_to_date_then_v2_and_keep_the_newest(
    first_run: tuple[dict[str, Any], UUID, float], workspace: Path, tmp_path: Path,
    family_models: dict[str, dict[str, Path]],
) -> None:
    """What the deployment does (versions=N): a new version per run with something new, ``current``
    switched to it, the oldest beyond N deleted; a run with nothing new publishes nothing, in seconds."""
    from supermerge.orchestrator.versions import CURRENT

    config = _copy(workspace, tmp_path)
    versioned = str(config.parent / "out" / "versioned")
    one, _, _ = _run(config, output=versioned, versions=1)
    out = Path(versioned)
    assert one["version"] == "v1" and (out / CURRENT).resolve() == (out / "v1").resolve()
    assert one["merged"] == 0 and one["from_store"] == 4  # the module's run left every node in the store

    again, flow_run_id, wall = _run(config, output=versioned, versions=1)
    assert again["up_to_date"] and again["version"] == "v1" and not (out / "v2").exists()
    assert wall < 30 and _merge_task_runs(flow_run_id) == []
    assert "up to date" in {a.key: a for a in _artifacts(flow_run_id)}[REPORT_KEY].data
    print(f"\nup-to-date run: {wall:.1f} s wall")

    m = family_models[ARRIVING]
    register(m["path"], ARRIVING, m["validation"], config.parent / "registry")
    two, _, _ = _run(config, output=versioned, versions=1)
    assert two["version"] == "v2" and two["merged"] == len(path_to_root(MergeTree.from_nested(
        _report(two)["plan"]["groups"]), ARRIVING))
    assert (out / CURRENT).resolve() == (out / "v2").resolve() and not (out / "v1").exists()  # kept 1
    assert sorted(p.name for p in out.iterdir()) == [CURRENT, "v2"]
    from transformers import AutoModel

    AutoModel.from_pretrained(out / CURRENT)


def _swapped(nested: Any, a: str, b: str) -> Any:
    """The nested groups with leaves ``a`` and ``b`` trading places."""
    if isinstance(nested, list):
        return [_swapped(n, a, b) for n in nested]
    return {a: b, b: a}.get(nested, nested)


def test_merge_and_merge_prefect_grow_the_published_tree_alike_after_a_registration(
    first_run: tuple[dict[str, Any], UUID, float], workspace: Path, tmp_path: Path,
    family_models: dict[str, dict[str, Path]], capsys: pytest.CaptureFixture[str],
) -> None:
    """The one run path: after a registration, ``supermerge plan``, ``supermerge merge`` and
    ``supermerge merge --prefect`` all grow the tree published at the output (here one with pa and qa
    swapped, which clustering from scratch would never build), and the two merges publish the same bytes."""
    from supermerge.flows.cli import main

    published = _report(first_run[0])["plan"]["groups"]
    swapped = _swapped(published, "pa", "qa")
    assert swapped != published
    m = family_models[ARRIVING]
    outputs: dict[str, tuple[Path, list[Any]]] = {}
    for way, extra in (("plain", []), ("prefect", ["--prefect"])):
        config = _copy(workspace, tmp_path / way)
        report_file = config.parent / "out" / "merged" / REPORT_FILE
        report = json.loads(report_file.read_text())
        report["plan"]["groups"] = swapped
        report_file.write_text(json.dumps(report))
        register(m["path"], ARRIVING, m["validation"], config.parent / "registry")
        if way == "plain":
            assert main(["plan", str(config)]) == 0
            shown = capsys.readouterr().out
            assert "the previous tree, grown by rb" in shown and "merge-pa+qb" in shown and "merge-ra+rb" in shown
            assert main(["plan", str(config), "--replan"]) == 0
            assert "merge-pa+qb" not in capsys.readouterr().out  # from scratch: the families pair up again
        assert main(["merge", str(config), "--overwrite", *extra]) == 0
        capsys.readouterr()
        output = config.parent / "out" / "merged"
        outputs[way] = (output, json.loads((output / REPORT_FILE).read_text())["plan"]["groups"])
    (plain, plain_groups), (flowed, flowed_groups) = outputs["plain"], outputs["prefect"]
    tree = MergeTree.from_nested(plain_groups)
    assert plain_groups == flowed_groups and tree.children(path_to_root(tree, ARRIVING)[0]) == [REGISTERED, ARRIVING]
    assert tree.children(tree.parent("pa")) == ["pa", "qb"]  # still the swapped tree, grown
    names = sorted(str(p.relative_to(plain)) for p in plain.rglob("*.safetensors"))
    assert names and names == sorted(str(p.relative_to(flowed)) for p in flowed.rglob("*.safetensors"))
    for name in names:
        assert (plain / name).read_bytes() == (flowed / name).read_bytes(), name


def test_merge_after_a_registration_merges_only_the_new_models_path(
    first_run: tuple[dict[str, Any], UUID, float], workspace: Path, tmp_path: Path,
    family_models: dict[str, dict[str, Path]], capsys: pytest.CaptureFixture[str],
) -> None:
    """The plain ``supermerge merge --overwrite`` grows the published tree as the flow does: the nodes
    off the new model's path come from the store."""
    from supermerge.flows.cli import main

    config = _copy(workspace, tmp_path)
    m = family_models[ARRIVING]
    register(m["path"], ARRIVING, m["validation"], config.parent / "registry")
    assert main(["merge", str(config), "--overwrite"]) == 0
    capsys.readouterr()
    after = json.loads((config.parent / "out" / "merged" / REPORT_FILE).read_text())
    tree = MergeTree.from_nested(after["plan"]["groups"])
    merged = {n["id"] for n in after["nodes"] if not n["cached"]}
    assert merged == set(path_to_root(tree, ARRIVING))
    assert {n["id"] for n in after["nodes"] if n["cached"]} == {n for n in tree.merges()} - merged != set()


def test_each_data_file_is_read_once_per_flow_run(
    tiny_base_dir: Path, family_models: dict[str, dict[str, Path]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Planning reads every task's data; the node tasks, the root's score and the reference rows reuse
    it (the run's DataCache) instead of tokenising each file again."""
    import supermerge.merge_core.job

    reads: list[str] = []
    real = supermerge.merge_core.job.load_task_data

    def counted(path: Any, *args: Any, **kwargs: Any) -> Any:
        reads.append(str(Path(path).resolve()))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(supermerge.merge_core.job, "load_task_data", counted)
    config = _write_config(tmp_path, tiny_base_dir, family_models, ["pa", "pb", "qa"], registry=None)
    result, _, _ = _run(config, evaluate=True)
    assert result["merged"] == 2 and set(result["test_accuracy"]) == {"pa", "pb", "qa"}
    files = {str(Path(family_models[n]["validation"]).resolve()) for n in ("pa", "pb", "qa")}
    assert sorted(reads) == sorted(files)  # each once (validation and test are one file here)
