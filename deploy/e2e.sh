#!/usr/bin/env bash
# End to end through a real Prefect server, offline, on tiny models built here (about 2 minutes on 2 cores):
#   1. a server on 127.0.0.1 (a free port, its own PREFECT_HOME in a temp dir, no telemetry);
#   2. the process work pool supermerge-local and the deployment hierarchical-merge/local (deploy/prefect.yaml);
#   3. a worker; `prefect deployment run 'hierarchical-merge/local' --watch`; the merged model must load
#      with transformers;
#   4. `supermerge register` of one more task model: its event must trigger a second run by itself, which
#      merges only the new model's path to the root.
# Everything started here is stopped on exit, failure or Ctrl-C (each in its own process group).
# KEEP=1 keeps the temp dir (logs, models) for a look afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python}
STARTED=$EPOCHREALTIME
WORK=$(mktemp -d -t supermerge-e2e.XXXXXX)
PGIDS=()

say() { awk -v a="$STARTED" -v b="$EPOCHREALTIME" -v m="$*" 'BEGIN { printf "[e2e %5.1fs] %s\n", b - a, m }'; }

cleanup() {
  local rc=$? i
  # the worker before the server it talks to; a Prefect 3.8.8 worker here ignored SIGTERM and SIGINT for
  # over 30 s, so a group still alive after 10 s is killed (nothing is running by then)
  for ((i = ${#PGIDS[@]} - 1; i >= 0; i--)); do
    kill -TERM -- "-${PGIDS[i]}" 2>/dev/null || true
    for _ in $(seq 1 50); do kill -0 -- "-${PGIDS[i]}" 2>/dev/null || break; sleep 0.2; done
    kill -KILL -- "-${PGIDS[i]}" 2>/dev/null || true
  done
  if [ "$rc" != 0 ]; then
    echo "[e2e] FAILED (exit $rc); last lines of the logs:" >&2
    for f in "$WORK"/*.log; do [ -f "$f" ] && { echo "--- $f" >&2; tail -n 25 "$f" >&2; }; done
  fi
  if [ "${KEEP:-0}" = 1 ]; then echo "[e2e] kept $WORK"; else rm -rf "$WORK"; fi
  [ "$rc" = 0 ] && say "server and worker stopped"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

background() {  # background LOG CMD...: start CMD in its own process group, remember the group
  local log=$1; shift
  setsid "$@" >"$log" 2>&1 &
  PGIDS+=("$!")
}

export PREFECT_HOME=$WORK/prefect-home DO_NOT_TRACK=1 PREFECT_SERVER_ANALYTICS_ENABLED=false
export PREFECT_WORKER_QUERY_SECONDS=2 PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=120
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
PORT=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
export PREFECT_API_URL=http://127.0.0.1:$PORT/api

say "server on 127.0.0.1:$PORT (PREFECT_HOME $PREFECT_HOME)"
background "$WORK/server.log" prefect server start --host 127.0.0.1 --port "$PORT"
say "building tiny models in $WORK/ws"
CONFIG=$("$PY" deploy/e2e_models.py "$WORK/ws")
for _ in $(seq 1 240); do
  curl -fsS "$PREFECT_API_URL/health" >/dev/null 2>&1 && break
  sleep 0.5
done
curl -fsS "$PREFECT_API_URL/health" >/dev/null || { echo "server did not answer in 120 s" >&2; exit 1; }
say "server healthy"

prefect --no-prompt work-pool create supermerge-local --type process >"$WORK/pool.log" 2>&1
# Prefect 3.8.8 with fastapi 0.154: after creating the deployment and its trigger, `prefect deploy` lists the
# pool's workers sending `"limit": null`, which this server refuses (422), and exits 1. Only that failure,
# after "successfully created", is let through (deploy/README.md, "Known problems").
if ! SUPERMERGE_ROOT=$ROOT SUPERMERGE_CONFIG=$CONFIG \
    prefect --no-prompt deploy --prefect-file deploy/prefect.yaml --name local >"$WORK/deploy.log" 2>&1; then
  grep -q "successfully created" "$WORK/deploy.log" && grep -q "workers/filter' - Response" "$WORK/deploy.log" \
    || { echo "prefect deploy failed" >&2; exit 1; }
  say "prefect deploy: deployment created; its closing worker listing hit Prefect 3.8.8's 422 (known, ignored)"
fi
say "pool supermerge-local and deployment hierarchical-merge/local created"
background "$WORK/worker.log" prefect worker start --pool supermerge-local --type process

say "run 1: prefect deployment run 'hierarchical-merge/local' --watch"
prefect deployment run 'hierarchical-merge/local' --param evaluate=true --watch --watch-timeout 400 \
  | tee "$WORK/run1.log" | grep -E "Flow run|state|Completed|Failed" || true
grep -q "Completed" "$WORK/run1.log" || { echo "run 1 did not complete" >&2; exit 1; }

"$PY" - "$WORK/ws/out/merged" <<'EOF'
import json, sys
from pathlib import Path
from transformers import AutoModel
out = Path(sys.argv[1])
model = AutoModel.from_pretrained(out)
report = json.loads((out / "merge_report.json").read_text())
nodes = report["nodes"]
assert len(nodes) == 4 and not any(n["cached"] for n in nodes), nodes
print(f"[e2e] run 1: {type(model).__name__} loads from {out}; {len(nodes)} nodes merged; tree {report['plan']['groups']}; "
      f"test accuracy {report['test_accuracy']}")
EOF

say "registering rb: its event should trigger run 2"
read -r RB_NAME RB_PATH RB_VAL BASE < <("$PY" - "$WORK/ws" <<'EOF'
import sys
from pathlib import Path
import yaml
ws = Path(sys.argv[1])
m = yaml.safe_load((ws / "arriving.yaml").read_text())
print(m["name"], m["path"], m["validation"], yaml.safe_load((ws / "config.yaml").read_text())["base"])
EOF
)
supermerge register "$RB_PATH" --task "$RB_NAME" --val "$RB_VAL" --registry "$WORK/ws/registry" --base "$BASE"

"$PY" - "$WORK/ws/out/merged" <<'EOF'
import asyncio, json, sys, time
from pathlib import Path
from prefect import get_client
from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName
from prefect.client.schemas.sorting import FlowRunSort
from transformers import AutoModel
from orchestrator.incremental import path_to_root
from orchestrator.tree import MergeTree

async def runs():
    async with get_client() as client:
        # sort and limit given: this server refuses the null the client sends by default (see above)
        return await client.read_flow_runs(deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=["local"])),
                                           sort=FlowRunSort.EXPECTED_START_TIME_ASC, limit=20)

deadline = time.monotonic() + 400
while True:
    done = [r for r in asyncio.run(runs()) if r.state is not None and r.state.is_final()]
    if len(done) >= 2 or time.monotonic() > deadline:
        break
    time.sleep(2)
assert len(done) >= 2, f"the registration did not trigger a second run in time: {[(r.name, r.state_name) for r in done]}"
assert all(r.state.is_completed() for r in done), [(r.name, r.state_name, r.state.message) for r in done]
out = Path(sys.argv[1])
AutoModel.from_pretrained(out)
report = json.loads((out / "merge_report.json").read_text())
merged = sorted(n["id"] for n in report["nodes"] if not n["cached"])
reused = sorted(n["id"] for n in report["nodes"] if n["cached"])
path = path_to_root(MergeTree.from_nested(report["plan"]["groups"]), "rb")
assert merged == sorted(path) and len(reused) == len(report["nodes"]) - len(path) > 0, report["nodes"]
print(f"[e2e] run 2 (triggered by the event): tree {report['plan']['groups']}; merged {merged}, from the store {reused}")
EOF

say "passed; stopping server and worker"
