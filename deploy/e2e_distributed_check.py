"""deploy/e2e_distributed.sh's steps and checks, through the Prefect server's REST API (PREFECT_API_URL).

    python deploy/e2e_distributed_check.py bucket URL                     create the S3 bucket of URL
    python deploy/e2e_distributed_check.py workers POOL N                 wait for N online workers of POOL
    python deploy/e2e_distributed_check.py config WS STEPS                write WS/dist.yaml; print its path
    python deploy/e2e_distributed_check.py merge CONFIG OUT STORE JSON [POOLS]  run hierarchical-merge here (in
                                          this process; with POOLS, a JSON list, its nodes on the pools); write
                                          {"run": flow run id, "result": ..., "seconds": ...} to JSON
    python deploy/e2e_distributed_check.py nodes RUN_ID                   the merge-node runs under a merge run:
                                          per node its runs, each with its state, interval, pid, parent pid
    python deploy/e2e_distributed_check.py overlap RUN_ID WORKERS         siblings ran at once on different
                                          workers (WORKERS: JSON {name: pid})
    python deploy/e2e_distributed_check.py kill-mid-node SINCE WORKERS    once a merge-node run started after
                                          SINCE (unix seconds) holds its node's lock, SIGKILL its worker's
                                          process group and its own process; print what was killed
    python deploy/e2e_distributed_check.py retried RUN_ID KILL            the killed node's run ended Crashed and
                                          a second run of it completed on another worker
    python deploy/e2e_distributed_check.py same A B                       two published models, byte for byte
    python deploy/e2e_distributed_check.py peaks CONCURRENT ALONE         per node, measured peaks within 10 %
    python deploy/e2e_distributed_check.py overhead IN_PROCESS TWO ONE   seconds per node beyond the merge

Each prints one JSON line and exits 1 with the reason when a check fails.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml
from e2e_api import api, fail

from supermerge.orchestrator.store import LOCKS_DIR

PLACED = re.compile(r"merge-node (?P<node>\S+): pid (?P<pid>\d+), parent pid (?P<ppid>\d+), host (?P<host>\S+)")
"""supermerge.flows.node_flow.PLACED_LOG, read back."""
PEAK_TOLERANCE = 0.10
METADATA = {"supermerge.json", "merge_report.json"}
"""Files of a published model that record the run (times, peaks, paths), not the model."""


def _time(text: str | None) -> float | None:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp() if text else None


def make_bucket(url: str) -> dict[str, Any]:
    import boto3

    bucket = url.removeprefix("s3://").split("/", 1)[0]
    boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"]).create_bucket(Bucket=bucket)
    return {"bucket": bucket}


def wait_workers(pool: str, n: int, timeout: float = 120) -> dict[str, Any]:
    """Wait until ``n`` workers of ``pool`` are online (a worker registers some seconds after it starts)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        online = [w["name"] for w in api("POST", f"/work_pools/{pool}/workers/filter", {}) if w["status"] == "ONLINE"]
        if len(online) >= n:
            return {"pool": pool, "online": sorted(online)}
        time.sleep(0.5)
    fail(f"{pool}: fewer than {n} workers online after {timeout:.0f} s")
    raise AssertionError


def write_config(ws: Path, steps: int) -> Path:
    """Four of deploy/e2e_models.py's task models (two families: the tree pairs pa+pb and qa+qb, two
    siblings, then the root), SuperMerge with ``steps`` steps a node, two retries a second apart."""
    models = {m["name"]: m for m in yaml.safe_load((ws / "config.yaml").read_text())["models"]}
    config = {
        "base": str(ws / "base"), "output": str(ws / "out" / "dist"), "method": "supermerge",
        "parameters": {"steps": steps, "lr": 0.05}, "device": "cpu",
        "models": [models[n] for n in ("pa", "pb", "qa", "qb")],
        "tree": {"max_fan_in": 2}, "retry": {"retries": 2, "retry_delay_seconds": 1},
    }
    path = ws / "dist.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def merge(config: str, output: str, store: str, pools: str | None) -> dict[str, Any]:
    from supermerge.flows.hierarchical import hierarchical_merge

    started = time.perf_counter()
    state = hierarchical_merge(config=config, output=output, store=store, max_parallel=1,
                               pools=json.loads(pools) if pools else None, return_state=True)
    if not state.is_completed():
        fail(f"the merge of {config} ended {state.name}: {state.message}")
    return {"run": str(state.state_details.flow_run_id), "result": state.result(),
            "seconds": round(time.perf_counter() - started, 2)}


def task_runs(run_id: str) -> list[dict[str, Any]]:
    return api("POST", "/task_runs/filter", {"flow_runs": {"id": {"any_": [run_id]}}, "limit": 200})


def placed(flow_run_id: str) -> dict[str, Any] | None:
    """The placement line a merge-node run logged first (None before it logged it)."""
    logs = api("POST", "/logs/filter", {"logs": {"flow_run_id": {"any_": [flow_run_id]}}, "sort": "TIMESTAMP_ASC",
                                        "limit": 200})
    for line in logs:
        m = PLACED.search(line["message"])
        if m:
            return {"pid": int(m["pid"]), "ppid": int(m["ppid"]), "host": m["host"], "logged": _time(line["timestamp"])}
    return None


def node_runs(run_id: str, timeout: float = 60) -> dict[str, list[dict[str, Any]]]:
    """node -> its merge-node flow runs under the merge run ``run_id``, oldest first: state, the run's
    start and end (unix seconds), and where it ran. Waits for task runs and logs to reach the server."""
    deadline = time.monotonic() + timeout
    while True:
        # run_deployment's own task run (named after the deployment) is each child's parent
        parents = {t["id"]: t for t in task_runs(run_id)}
        children = api("POST", "/flow_runs/filter", {"flow_runs": {"parent_task_run_id": {"any_": list(parents)}},
                                                     "sort": "START_TIME_ASC", "limit": 200}) if parents else []
        nodes: dict[str, list[dict[str, Any]]] = {}
        for child in children:
            where = placed(child["id"])
            nodes.setdefault(child["name"], []).append({
                "state": child["state_type"], "start": _time(child["start_time"]), "end": _time(child["end_time"]),
                **(where or {}),
            })
        settled = all(r["state"] in ("COMPLETED", "CRASHED", "FAILED") and (r["state"] != "COMPLETED" or "pid" in r)
                      for runs in nodes.values() for r in runs)
        if (nodes and settled) or time.monotonic() > deadline:
            return nodes
        time.sleep(1)


def siblings(result: dict[str, Any]) -> list[str]:
    """The nodes whose inputs are all task models (the tree's leaves: here, the siblings)."""
    plan = result["result"]
    merged = {n["id"] for n in plan["nodes"]}
    # a leaf's record names no merged child; the records do not list children, so use the names
    return sorted(n for n in merged if n.count("+") == 1)


def overlap(run: dict[str, Any], workers: dict[str, int]) -> dict[str, Any]:
    nodes = node_runs(run["run"])
    leaves = siblings(run)
    if len(leaves) < 2:
        fail(f"the tree has {len(leaves)} sibling leaves ({leaves}); the check needs two")
    a, b = (nodes[n][-1] for n in leaves[:2])
    if "pid" not in a or "pid" not in b:
        fail(f"no placement logged for {leaves[:2]}: {a}, {b}")
    at_once = max(a["start"], b["start"]) < min(a["end"], b["end"])
    by_pid = {pid: name for name, pid in workers.items()}
    on = [by_pid.get(a["ppid"]), by_pid.get(b["ppid"])]
    summary = {"siblings": leaves[:2], "intervals": [[round(r["start"] % 1000, 2), round(r["end"] % 1000, 2)] for r in (a, b)],
               "overlap_seconds": round(min(a["end"], b["end"]) - max(a["start"], b["start"]), 2),
               "pids": [a["pid"], b["pid"]], "workers": on}
    if not at_once:
        fail(f"the siblings did not run at the same time: {summary}")
    if a["pid"] == b["pid"] or None in on or on[0] == on[1]:
        fail(f"the siblings did not run in different processes on different workers: {summary}")
    return summary


def holds_lease(parameters: dict[str, Any]) -> bool:
    """The node's lease object is in the store: its run holds the node's lock, so it is merging it."""
    import boto3

    bucket, _, prefix = parameters["store"].removeprefix("s3://").partition("/")
    lock = f"{prefix}/{LOCKS_DIR}/{parameters['node']['key']}.lock".lstrip("/")
    found = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"]).list_objects_v2(Bucket=bucket, Prefix=lock)
    return found.get("KeyCount", 0) > 0


def kill_mid_node(since: float, workers: dict[str, int], timeout: float = 400) -> dict[str, Any]:
    """Once a merge-node run started after ``since`` holds its node's lease in the store (it is
    merging the node), SIGKILL its worker's process group and its own process."""
    deadline = time.monotonic() + timeout
    by_pid = {pid: name for name, pid in workers.items()}
    while time.monotonic() < deadline:
        running = api("POST", "/flow_runs/filter", {"flow_runs": {"state": {"type": {"any_": ["RUNNING"]}},
                                                                  "start_time": {"after_": datetime.fromtimestamp(since).astimezone().isoformat()}},
                                                    "limit": 50})
        for child in running:
            if child["name"].startswith("merge-") and (where := placed(child["id"])) is not None \
                    and where["ppid"] in by_pid and holds_lease(child["parameters"]):
                worker_pid = where["ppid"]
                for target, how in ((worker_pid, os.killpg), (where["pid"], os.kill)):
                    try:
                        how(target, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                return {"node": child["name"], "flow_run": child["id"], "pid": where["pid"],
                        "worker": by_pid[worker_pid], "worker_pid": worker_pid, "at": time.time()}
        time.sleep(0.3)
    fail(f"no merge-node run started merging within {timeout:.0f} s")
    raise AssertionError


def retried(run: dict[str, Any], kill: dict[str, Any], workers: dict[str, int]) -> dict[str, Any]:
    runs = node_runs(run["run"])[kill["node"]]
    by_pid = {pid: name for name, pid in workers.items()}
    states = [r["state"] for r in runs]
    last = runs[-1]
    crashed = [r for r in runs if r["state"] == "CRASHED"]
    summary = {"node": kill["node"], "runs": states, "killed_on": kill["worker"],
               "retried_on": by_pid.get(last.get("ppid", -1)),
               "crashed_after_kill_s": round(crashed[0]["end"] - kill["at"], 1) if crashed and crashed[0]["end"] else None,
               "retry_started_after_kill_s": round(last["start"] - kill["at"], 1) if last.get("start") else None,
               "retry_finished_after_kill_s": round(last["end"] - kill["at"], 1) if last.get("end") else None}
    if not crashed or last["state"] != "COMPLETED" or summary["retried_on"] in (None, kill["worker"]):
        fail(f"the killed node was not marked Crashed and run again on another worker: {summary} ({runs})")
    return summary


def model_files(folder: Path) -> dict[str, str]:
    return {str(f.relative_to(folder)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(folder.rglob("*")) if f.is_file() and f.name not in METADATA}


def same(a: Path, b: Path) -> dict[str, Any]:
    fa, fb = model_files(a), model_files(b)
    if not fa or fa != fb:
        differ = sorted(k for k in set(fa) | set(fb) if fa.get(k) != fb.get(k))
        fail(f"{a} and {b} differ in {differ}")
    return {"identical_files": len(fa), "bytes": sum((a / f).stat().st_size for f in fa)}


def node_records(run: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {n["id"]: n for n in run["result"]["nodes"]}


def peaks(concurrent: dict[str, Any], alone: dict[str, Any]) -> dict[str, Any]:
    together, solo = node_records(concurrent), node_records(alone)
    rows = {}
    for node in siblings(concurrent):
        c, s = together[node]["measured_peak_bytes"], solo[node]["measured_peak_bytes"]
        rows[node] = {"concurrent_MiB": round(c / 2**20, 2), "alone_MiB": round(s / 2**20, 2),
                      "ratio": round(c / s, 3) if s else None}
        if not s or abs(c / s - 1) > PEAK_TOLERANCE:
            fail(f"node {node}: measured peak {c} B beside its sibling, {s} B alone (more than "
                 f"{PEAK_TOLERANCE:.0%} apart): {rows}")
    return rows


def overhead(in_process: dict[str, Any], distributed: dict[str, Any], alone: dict[str, Any]) -> dict[str, Any]:
    """Per node: its task run's seconds (start to end) minus the merge's own seconds (the record's);
    the mean on each path: in process (threads, one node at a time), on two workers (siblings at
    once, each on its own worker: nothing waits for a worker), on one worker (a sibling's time also
    holds its wait for the other to finish). The overhead is two workers' minus in process's."""

    def beyond(run: dict[str, Any]) -> float:
        records = node_records(run)
        out = {}
        for t in task_runs(run["run"]):
            node = t["name"].split(" @ ")[0]
            if node in records and t["state_type"] == "COMPLETED" and t["start_time"] and t["end_time"]:
                out[node] = _time(t["end_time"]) - _time(t["start_time"]) - records[node]["seconds"]
        if set(out) != set(records):
            fail(f"run {run['run']}: no completed task run for {sorted(set(records) - set(out))}")
        return sum(out.values()) / len(out)

    means = {name: beyond(run) for name, run in
             (("in_process", in_process), ("two_workers", distributed), ("one_worker", alone))}
    return {"nodes": len(node_records(in_process)), **{f"{k}_s": round(v, 2) for k, v in means.items()},
            "overhead_per_node_s": round(means["two_workers"] - means["in_process"], 2),
            "run_s": {"in_process": in_process["seconds"], "two_workers": distributed["seconds"], "one_worker": alone["seconds"]},
            "merge_s": {name: {n: r["seconds"] for n, r in node_records(run).items()}
                        for name, run in (("in_process", in_process), ("two_workers", distributed), ("one_worker", alone))}}


def main(argv: list[str]) -> None:
    command, *args = argv
    if command == "bucket":
        out: Any = make_bucket(args[0])
    elif command == "workers":
        out = wait_workers(args[0], int(args[1]))
    elif command == "config":
        out = str(write_config(Path(args[0]), int(args[1])))
        print(out)
        return
    elif command == "merge":
        out = merge(args[0], args[1], args[2], args[4] if len(args) > 4 else None)
        Path(args[3]).write_text(json.dumps(out, default=str))
        out = {"run": out["run"], "seconds": out["seconds"], "merged": out["result"]["merged"]}
    elif command == "nodes":
        out = node_runs(json.loads(Path(args[0]).read_text())["run"])
    elif command == "overlap":
        out = overlap(json.loads(Path(args[0]).read_text()), json.loads(args[1]))
    elif command == "kill-mid-node":
        out = kill_mid_node(float(args[0]), json.loads(args[1]))
    elif command == "retried":
        out = retried(json.loads(Path(args[0]).read_text()), json.loads(args[1]), json.loads(args[2]))
    elif command == "same":
        out = same(Path(args[0]), Path(args[1]))
    elif command == "peaks":
        out = peaks(json.loads(Path(args[0]).read_text()), json.loads(Path(args[1]).read_text()))
    elif command == "overhead":
        out = overhead(*(json.loads(Path(a).read_text()) for a in args[:3]))
    else:
        fail(f"unknown command {command}")
        return
    print(json.dumps(out, default=str))


if __name__ == "__main__":
    main(sys.argv[1:])
