#!/usr/bin/env bash
# End to end through a real Prefect server, offline, on tiny models built here (a few minutes on 2 cores),
# checking what a user sees through the REST API (deploy/e2e_check.py):
#   1. a server on 127.0.0.1 (a free port, its own PREFECT_HOME in a temp dir, no telemetry), the process
#      work pool, the deployment hierarchical-merge/local (deploy/prefect.yaml), the zombie-run automation
#      (flows/automations.py), a worker;
#   2. run 1: one task run per merge node named after it, edges exactly the tree's (task_inputs), the live
#      tree artifact seen while the run is in flight and right at the end; v1 published and loads;
#   3. rb registered with no server in reach, then a run with no parameters (what the nightly schedule
#      sends): v2, only rb's path merged; again: "up to date", nothing published;
#   4. `supermerge register` of sa: its event triggers a run by itself, v3;
#   5. SIGKILL of the worker and the flow run's process mid-run, a new worker and the next run: the
#      automation marks the killed run Crashed, the next run is Running within 60 s of the kill and
#      reuses every node finished before it.
# SCREENSHOTS=1 also screenshots the UI mid-run and at the end into deploy/img (deploy/screenshots.py:
# Playwright and Debian's chromium, see deploy/README.md).
# Everything started here is stopped on exit, failure or Ctrl-C (each in its own process group).
# KEEP=1 keeps the temp dir (logs, models) for a look afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."
E2E_TAG=e2e E2E_STOPPED="server and worker stopped"
# shellcheck source=deploy/e2e_lib.sh
source deploy/e2e_lib.sh

export PREFECT_HOME=$WORK/prefect-home DO_NOT_TRACK=1 PREFECT_SERVER_ANALYTICS_ENABLED=false
export PREFECT_WORKER_QUERY_SECONDS=2 PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=120
# a run refused the deployment's concurrency slot asks again after 5 s (Prefect's default: 30 s)
export PREFECT_SERVER_DEPLOYMENTS_CONCURRENCY_SLOT_WAIT_SECONDS=5
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
PORT=${E2E_PORT:-$(free_port)}
export PREFECT_API_URL=http://127.0.0.1:$PORT/api
ZOMBIE_WITHIN=${ZOMBIE_WITHIN:-40}  # seconds without a heartbeat (one each 30 s) before a run is marked Crashed
CHECK=("$PY" deploy/e2e_check.py)

say "server on 127.0.0.1:$PORT (PREFECT_HOME $PREFECT_HOME)"
background "$WORK/server.log" prefect server start --host 127.0.0.1 --port "$PORT"
say "building tiny models in $WORK/ws"
CONFIG=$("$PY" deploy/e2e_models.py "$WORK/ws" 2>"$WORK/models.log")
for _ in $(seq 1 240); do
  curl -fsS "$PREFECT_API_URL/health" >/dev/null 2>&1 && break
  sleep 0.5
done
curl -fsS "$PREFECT_API_URL/health" >/dev/null || { echo "server did not answer in 120 s" >&2; exit 1; }
say "server healthy"

prefect --no-prompt work-pool create supermerge-local --type process >"$WORK/pool.log" 2>&1
SUPERMERGE_ROOT=$ROOT SUPERMERGE_CONFIG=$CONFIG \
  prefect --no-prompt deploy --prefect-file deploy/prefect.yaml --name local >"$WORK/deploy.log" 2>&1 \
  || { echo "prefect deploy failed" >&2; exit 1; }
"$PY" -m supermerge.flows.automations --within "$ZOMBIE_WITHIN" >"$WORK/automation.log" 2>&1
say "pool, deployment and zombie-run automation (within $ZOMBIE_WITHIN s) created"
start_worker() { background "$WORK/worker$1.log" prefect worker start --pool supermerge-local --type process; }
start_worker 1
WORKER_PGID=${PGIDS[-1]}

register() {  # register NAME [no-event]: list an arriving model (deploy/e2e_models.py) in the registry
  local path val
  read -r path val < <("$PY" -c 'import sys, yaml; m = yaml.safe_load(open(sys.argv[1]))[sys.argv[2]]; print(m["path"], m["validation"])' \
    "$WORK/ws/arriving.yaml" "$1")
  if [ "${2:-}" = no-event ]; then
    env -u PREFECT_API_URL supermerge register "$path" --task "$1" --val "$val" --registry "$WORK/ws/registry" --base "$WORK/ws/base" >/dev/null
  else
    supermerge register "$path" --task "$1" --val "$val" --registry "$WORK/ws/registry" --base "$WORK/ws/base" >/dev/null
  fi
}

SHOTS=()
screenshots() {  # screenshots RUN_ID NAME: the flow run page and its tree artifact (SCREENSHOTS=1 only)
  [ "${SCREENSHOTS:-0}" = 1 ] || return 0
  "${SCREENSHOT_PYTHON:-/work/venvs/playwright/bin/python}" deploy/screenshots.py "http://127.0.0.1:$PORT" "$1" "$2" \
    deploy/img >>"$WORK/screenshots.log" 2>&1 &
  SHOTS+=("$!")
}
wait_screenshots() { local p; for p in "${SHOTS[@]}"; do wait "$p" || { echo "screenshots failed" >&2; exit 1; }; done; SHOTS=(); }

say "run 1: the first merge (evaluate=true)"
RUN1=$("${CHECK[@]}" run '{"evaluate": true}')
screenshots "$RUN1" mid-run
R1=$("${CHECK[@]}" watch "$RUN1")
say "run 1: $R1"
wait_screenshots
screenshots "$RUN1" end
"$PY" -c 'import sys; from transformers import AutoModel; AutoModel.from_pretrained(sys.argv[1]); print("[e2e] the merged model loads from", sys.argv[1])' \
  "$WORK/ws/out/merged/current" 2>/dev/null

register rb no-event
say "rb registered with no server in reach; run 2 with no parameters (what the nightly schedule sends)"
R2=$("${CHECK[@]}" watch "$("${CHECK[@]}" run)")
say "run 2: $R2"
"$PY" -c 'import json, sys; r = json.loads(sys.argv[1]); assert r["version"] == "v2" and r["merged"] == ["merge-pa+pb+qa+qb+2 more", "merge-ra+rb"], r' \
  "$R2" || { echo "run 2 did not publish v2 merging only rb's path" >&2; exit 1; }
R3=$("${CHECK[@]}" up-to-date "$("${CHECK[@]}" run)")
say "run 3, nothing new: $R3"
[ "$(readlink "$WORK/ws/out/merged/current")" = v2 ] && [ ! -e "$WORK/ws/out/merged/v3" ] \
  || { echo "run 3 published a version though nothing was new" >&2; exit 1; }

register sa
say "sa registered; its event should trigger run 4"
RUN4=$("${CHECK[@]}" triggered 4)
R4=$("${CHECK[@]}" watch "$RUN4")
say "run 4 (triggered by the event): $R4"
[ "$(readlink "$WORK/ws/out/merged/current")" = v3 ] || { echo "run 4 did not publish v3" >&2; exit 1; }

say "run 5: SIGKILL of the worker and the flow run's process once a node is merged"
RUN5=$("${CHECK[@]}" run "{\"config\": \"$WORK/ws/crash.yaml\"}")
screenshots "$RUN5" crash-mid-run
KILL=$("${CHECK[@]}" kill "$RUN5" "$WORKER_PGID")
say "killed the worker's process group and the flow run's processes: $KILL" | cut -c1-200
start_worker 2
RUN6=$("${CHECK[@]}" run "{\"config\": \"$WORK/ws/crash.yaml\"}")
C5=$("${CHECK[@]}" crashed "$RUN5")
say "run 5, by the automation: $C5"
S6=$("${CHECK[@]}" started "$RUN6" "$KILL")
say "run 6: $S6"
R6=$("${CHECK[@]}" watch "$RUN6")
say "run 6: $R6"
RESUMED=$("${CHECK[@]}" resumed "$R6" "$KILL")
say "run 6 resumed from the store: $RESUMED"
CLOSED=$("${CHECK[@]}" closed "$RUN5")
say "run 5, closed by run 6: $CLOSED"
wait_screenshots
screenshots "$RUN6" crash-resumed
wait_screenshots
say "passed; stopping server and worker"
