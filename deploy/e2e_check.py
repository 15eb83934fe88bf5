"""deploy/e2e.sh's checks of what a user sees, through the Prefect server's REST API (PREFECT_API_URL).

    python deploy/e2e_check.py run [PARAMS_JSON]   start a deployment run; print its id
    python deploy/e2e_check.py watch RUN_ID        wait for the run's end, recording the live tree
                                                   artifact while it is in flight; check it all
    python deploy/e2e_check.py kill RUN_ID PGID    when the live tree shows a node merged and one not,
                                                   SIGKILL the worker's process group and the flow
                                                   run's own process; print what the store held
    python deploy/e2e_check.py crashed RUN_ID      wait until the killed run is Crashed
    python deploy/e2e_check.py up-to-date RUN_ID   the run ended Completed, "up to date", publishing nothing
    python deploy/e2e_check.py triggered N         wait for the N-th flow run (an event's) to exist; its id
    python deploy/e2e_check.py started RUN_ID KILL the run went Running within 60 s of the kill
    python deploy/e2e_check.py resumed RESULT KILL the resumed run reused every node merged before the kill
    python deploy/e2e_check.py closed RUN_ID       the killed run's task runs and tree say it crashed

Each prints one JSON line (what e2e.sh reports) and exits 1 with the reason when a check fails.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from e2e_api import api, fail

DEPLOYMENT = "hierarchical-merge/local"
REPORT_KEY = "hierarchical-merge-report"
FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def flow_run(run_id: str) -> dict[str, Any]:
    return api("GET", f"/flow_runs/{run_id}")


def report_versions(run_id: str) -> list[dict[str, Any]]:
    """Every version of the run's tree artifact, oldest first."""
    found = api("POST", "/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [run_id]},
                                                            "key": {"any_": [REPORT_KEY]}},
                                              "sort": "CREATED_DESC", "limit": 200})
    return list(reversed(found))


def task_runs(run_id: str) -> list[dict[str, Any]]:
    return api("POST", "/task_runs/filter", {"flow_runs": {"id": {"any_": [run_id]}}, "sort": "EXPECTED_START_TIME_ASC",
                                             "limit": 200})


def start(params: dict[str, Any]) -> str:
    deployment = api("GET", f"/deployments/name/{DEPLOYMENT}")
    created = api("POST", f"/deployments/{deployment['id']}/create_flow_run", {"parameters": params})
    return created["id"]


def watch(run_id: str, timeout: float = 400) -> dict[str, Any]:
    """Poll the run to its end; the first in-flight version of its tree artifact seen (the tree with
    nodes still pending or running, while the run is Running)."""
    deadline = time.monotonic() + timeout
    in_flight = None
    state = ""
    while time.monotonic() < deadline:
        run = flow_run(run_id)
        state = run["state_type"]
        if state == "RUNNING" and in_flight is None:
            live = [a for a in report_versions(run_id) if "in flight" in a["data"]]
            if live:
                in_flight = {"seconds_after_start": round(time.monotonic() - deadline + timeout, 1),
                             "data": live[-1]["data"]}
        if state in FINAL:
            return {"run": run, "in_flight": in_flight}
        time.sleep(0.4)
    fail(f"flow run {run_id} still {state} after {timeout:.0f} s")
    raise AssertionError


def check_completed_run(run_id: str, watched: dict[str, Any]) -> dict[str, Any]:
    """One task run per merge node named after it, edges exactly the tree's, the live tree seen in
    flight and right at the end."""
    run = watched["run"]
    if run["state_type"] != "COMPLETED":
        fail(f"flow run {run['name']} ended {run['state_name']}: {run['state']['message']}")
    result = api("GET", f"/flow_runs/{run_id}")["parameters"]
    config = Path(result["config"])
    out_root = config.parent / yaml_output(config)
    current = out_root / "current"
    report = json.loads((current / "merge_report.json").read_text())
    nodes = report["plan"]["nodes"]
    # task runs reach the database through the server's event stream, some seconds behind the flow run
    deadline = time.monotonic() + 90
    while True:
        runs = [t for t in task_runs(run_id) if t["name"].startswith("merge-")]
        if (len(runs) >= len(nodes) and all(t["state_type"] in FINAL for t in runs)) or time.monotonic() > deadline:
            break
        time.sleep(1)
    names = sorted(t["name"] for t in runs)
    if names != sorted(n["id"] for n in nodes):
        fail(f"task runs {names} are not one per merge node {sorted(n['id'] for n in nodes)}")
    by_id = {t["id"]: t["name"] for t in runs}
    for n in nodes:
        [t] = [t for t in runs if t["name"] == n["id"]]
        edges = sorted(by_id.get(i["id"], f"?{i['id']}") for inputs in t["task_inputs"].values() for i in inputs)
        tree = sorted(c["name"] for c in n["children"] if c["path"] is None)
        if edges != tree:
            fail(f"{n['id']}'s upstream task runs {edges} are not its merged children {tree}")
    cached = {n["id"] for n in report["nodes"] if n["cached"]}
    for t in runs:
        from_store = t["state_name"] == "From store" and "from-store" in t["tags"]
        if t["state_type"] != "COMPLETED" or from_store != (t["name"] in cached):
            fail(f"task run {t['name']} is {t['state_name']} tags {t['tags']}; the report says cached="
                 f"{t['name'] in cached}")
    if watched["in_flight"] is None:
        fail("no in-flight version of the tree artifact was seen while the run was Running")
    final = report_versions(run_id)[-1]["data"]
    want = {n["id"]: ("from store" if n["id"] in cached else "merged") for n in report["nodes"]}
    rows = {line.split(" | ")[0].removeprefix("| "): line for line in final.splitlines() if line.startswith("| merge-")}
    wrong = [n for n, state in want.items() if f"| {state} |" not in rows.get(n, "")]
    if wrong or "published" not in final:
        fail(f"the final tree artifact misstates node(s) {wrong}:\n{final}")
    return {"run": run["name"], "version": os.readlink(current), "nodes": len(nodes),
            "merged": sorted(set(want) - cached), "from_store": sorted(cached),
            "tree": report["plan"]["groups"], "in_flight_seen_at_s": watched["in_flight"]["seconds_after_start"],
            "wall_s": round(run["total_run_time"], 1)}


def yaml_output(config: Path) -> str:
    import yaml

    return yaml.safe_load(config.read_text())["output"]


def pids_of_flow_run(run_id: str) -> list[int]:
    """Processes started for this flow run (the worker passes PREFECT__FLOW_RUN_ID to them)."""
    mark = f"PREFECT__FLOW_RUN_ID={run_id}".encode()
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if mark in (proc / "environ").read_bytes().split(b"\0"):
                    found.append(int(proc.name))
            except OSError:
                continue
    return found


def kill_mid_run(run_id: str, worker_pgid: int, timeout: float = 300) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        versions = report_versions(run_id)
        data = versions[-1]["data"] if versions else ""
        if "in flight" in data and "1 merged" in data:
            pids = pids_of_flow_run(run_id)
            if not pids:
                fail(f"no process carries flow run {run_id}")
            os.killpg(worker_pgid, signal.SIGKILL)
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            return {"killed_at": time.time(), "pids": pids, "tree_at_kill": data}
        if flow_run(run_id)["state_type"] in FINAL:
            fail(f"flow run {run_id} ended before it could be killed mid-run")
        time.sleep(0.2)
    fail("the run never had a node merged while others were left")
    raise AssertionError


def up_to_date(run_id: str) -> dict[str, Any]:
    run = watch(run_id)["run"]
    if run["state_type"] != "COMPLETED":
        fail(f"the run with nothing new ended {run['state_name']}: {run['state']['message']}")
    final = report_versions(run_id)[-1]["data"]
    if "up to date" not in final or [t for t in task_runs(run_id) if t["name"].startswith("merge-")]:
        fail(f"the run with nothing new did not end 'up to date' without task runs:\n{final}")
    return {"run": run["name"], "wall_s": round(run["total_run_time"], 1), "note": final.split("\n", 1)[0]}


def triggered(n: int, timeout: float = 300) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runs = api("POST", "/flow_runs/filter", {"sort": "EXPECTED_START_TIME_ASC", "limit": 50})
        if len(runs) >= n:
            return runs[n - 1]["id"]
        time.sleep(1)
    fail(f"no flow run number {n} within {timeout:.0f} s (the event did not trigger one?)")
    raise AssertionError


def started_within(run_id: str, kill: dict[str, Any], limit: float = 60, timeout: float = 180) -> dict[str, Any]:
    from datetime import datetime

    deadline = time.monotonic() + timeout
    while not (run := flow_run(run_id))["start_time"]:
        if time.monotonic() > deadline:
            fail(f"the run after the crash had not started {timeout:.0f} s after the kill: {run['state_name']}")
        time.sleep(0.5)
    delay = datetime.fromisoformat(run["start_time"]).timestamp() - kill["killed_at"]
    if delay > limit:
        fail(f"the run after the crash started {delay:.1f} s after the kill (limit {limit:.0f} s)")
    return {"run": run["name"], "started_s_after_kill": round(delay, 1)}


def resumed(result: dict[str, Any], kill: dict[str, Any]) -> dict[str, Any]:
    merged_before = sorted(line.split("|")[1].strip() for line in kill["tree_at_kill"].splitlines()
                           if "| merged |" in line)
    if not merged_before or not set(merged_before) <= set(result["from_store"]):
        fail(f"the resumed run took {result['from_store']} from the store; {merged_before} were merged before the kill")
    return {"merged_before_kill": merged_before, "from_store": result["from_store"], "merged": result["merged"]}


def closed(run_id: str) -> dict[str, Any]:
    unfinished = [t["name"] for t in task_runs(run_id) if t["state_type"] not in FINAL]
    final = report_versions(run_id)[-1]["data"]
    if unfinished or "in flight" in final or "crashed" not in final.split("\n", 1)[0]:
        fail(f"the crashed run still shows task runs {unfinished} unfinished or its tree in flight:\n{final[:600]}")
    states = sorted({t["state_name"] for t in task_runs(run_id)})
    return {"task_run_states": states, "tree_head": final.split("\n", 1)[0][:120]}


def main(argv: list[str]) -> None:
    what = argv[0]
    if what == "run":
        print(start(json.loads(argv[1]) if len(argv) > 1 else {}))
    elif what == "watch":
        watched = watch(argv[1])
        print(json.dumps(check_completed_run(argv[1], watched)))
    elif what == "kill":
        print(json.dumps(kill_mid_run(argv[1], int(argv[2]))))
    elif what == "crashed":
        deadline = time.monotonic() + 300
        while (run := flow_run(argv[1]))["state_type"] != "CRASHED":
            if time.monotonic() > deadline:
                fail(f"the killed run is still {run['state_name']} after 300 s")
            time.sleep(0.5)
        print(json.dumps({"run": run["name"], "state": run["state_name"], "message": run["state"]["message"]}))
    elif what == "up-to-date":
        print(json.dumps(up_to_date(argv[1])))
    elif what == "triggered":
        print(triggered(int(argv[1])))
    elif what == "started":
        print(json.dumps(started_within(argv[1], json.loads(argv[2]))))
    elif what == "resumed":
        print(json.dumps(resumed(json.loads(argv[1]), json.loads(argv[2]))))
    elif what == "closed":
        print(json.dumps(closed(argv[1])))
    else:
        fail(f"unknown check {what}")


if __name__ == "__main__":
    main(sys.argv[1:])
