"""Screenshots of the Prefect UI in a real browser: a flow run's page and its live tree artifact.

    PYTHON deploy/screenshots.py http://127.0.0.1:PORT RUN_ID NAME OUTDIR

writes OUTDIR/NAME-flow-run.png and OUTDIR/NAME-tree.png, and OUTDIR/NAME.json saying the run's state
and the tree's counts when each was taken. It waits for the run to be Running with an
in-flight tree (mid-run), or, for a NAME ending in "end" or "resumed", for the run's end.
PYTHON: one with Playwright (``pip install playwright``; never ``playwright install``: the browser is
Debian's ``/usr/bin/chromium``, ``apt-get install chromium``). deploy/e2e.sh runs it with SCREENSHOTS=1.
A plain ``chromium --headless --screenshot`` renders these pages empty: the UI is an app that fetches
after load, so this waits for the content itself.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import urllib.request
from playwright.sync_api import sync_playwright

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run"]
REPORT_KEY = "hierarchical-merge-report"


def call(url: str, body: dict | None = None) -> Any:
    """The REST API with the standard library (Playwright's venv has no httpx)."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"},
                                     method="POST" if body is not None else "GET")
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def tree_versions(api: str, run_id: str) -> list[dict[str, Any]]:
    return call(f"{api}/artifacts/filter", {
        "artifacts": {"flow_run_id": {"any_": [run_id]}, "key": {"any_": [REPORT_KEY]}},
        "sort": "CREATED_DESC", "limit": 1})


def wait_for(api: str, run_id: str, final: bool, timeout: float = 300) -> tuple[dict[str, Any], dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = call(f"{api}/flow_runs/{run_id}")
        latest = tree_versions(api, run_id)
        ended = run["state_type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")
        if latest and (ended if final else (run["state_type"] == "RUNNING" and "in flight" in latest[0]["data"])):
            return run, latest[0]
        if ended and not final:
            return run, latest[0] if latest else {}
        time.sleep(0.3)
    raise SystemExit(f"flow run {run_id} never reached the state to screenshot in {timeout:.0f} s")


def main(base: str, run_id: str, name: str, out: Path) -> None:
    api = f"{base}/api"
    final = name.endswith(("end", "resumed"))
    out.mkdir(parents=True, exist_ok=True)
    taken: dict[str, dict[str, str]] = {}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        page = browser.new_page(viewport={"width": 1500, "height": 1000})
        run, artifact = wait_for(api, run_id, final)
        page.goto(f"{base}/runs/flow-run/{run_id}", wait_until="load")
        page.wait_for_selector(f"text={run['name']}", timeout=60_000)
        page.wait_for_timeout(2500)  # the graph draws after its data arrives
        page.screenshot(path=str(out / f"{name}-flow-run.png"), full_page=False)
        taken["flow-run"] = {"state": call(f"{api}/flow_runs/{run_id}")["state_name"]}
        latest = tree_versions(api, run_id)[0] if not final else artifact
        page.goto(f"{base}/artifacts/artifact/{latest['id']}", wait_until="load")
        page.wait_for_selector("text=merge-", timeout=60_000)
        page.wait_for_timeout(1000)
        page.screenshot(path=str(out / f"{name}-tree.png"), full_page=True)
        taken["tree"] = {"counts": latest["data"].split("\n\n")[1], "head": latest["data"].split("\n", 1)[0]}
        browser.close()
    (out / f"{name}.json").write_text(json.dumps({"run": run["name"], **taken}, indent=2) + "\n")
    print(f"{name}: {taken}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], Path(sys.argv[4]))
