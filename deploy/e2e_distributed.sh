#!/usr/bin/env bash
# Merge nodes on two workers, end to end on loopback (issue 18; minutes on 2 cores), checked through the
# Prefect server's REST API (deploy/e2e_distributed_check.py):
#   1. moto's S3 server on 127.0.0.1 (the checkpoint store, s3://supermerge-e2e/...), a Prefect server, the
#      process work pool supermerge-cpu with its merge-node deployment (flows/pools.py), the zombie-run
#      automation, and two workers on the pool (worker-a, worker-b: separate processes with separate
#      store caches, as two machines would be; --limit 1 each, one node per worker at a time);
#   2. the reference: `supermerge merge` in one process (the plain executor), and hierarchical-merge in one
#      process (threads, the in-process path) for the per-node overhead;
#   3. the distributed run: the tree's two sibling nodes run at the same time (their flow runs' intervals
#      overlap) on different workers (different pids, each a child of a different worker), the root after
#      them; the published model byte-identical to the reference;
#   4. again into a new store, SIGKILL of the worker running a node (its process group and the node's own
#      process) once the node has started: the zombie automation marks the node's run Crashed, the node's
#      task retries it, the other worker runs it, and the model is still byte-identical;
#   5. the same tree with only the surviving worker (every node alone in its process): the siblings'
#      measured peaks in step 3 within 10 % of theirs alone; the seconds per node beyond the merge itself,
#      distributed vs in-process.
# Everything started here is stopped on exit, failure or Ctrl-C (each in its own process group).
# KEEP=1 keeps the temp dir; STEPS (default 300) sets the SuperMerge steps per node.
set -euo pipefail
cd "$(dirname "$0")/.."
E2E_TAG=e2e-dist E2E_STOPPED="servers and workers stopped"
# shellcheck source=deploy/e2e_lib.sh
source deploy/e2e_lib.sh

export PREFECT_HOME=$WORK/prefect-home DO_NOT_TRACK=1 PREFECT_SERVER_ANALYTICS_ENABLED=false
export PREFECT_WORKER_QUERY_SECONDS=2 PREFECT_LOGGING_EXTRA_LOGGERS=supermerge
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
# one thread per process, as on two one-core machines: on a shared 2-core host, two processes' OpenMP
# threads spinning against each other made each node 20x slower (tests/orchestrator/families.one_thread)
export OMP_NUM_THREADS=1
export AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing AWS_DEFAULT_REGION=us-east-1
S3_PORT=$(free_port)
PORT=$(free_port)
export AWS_ENDPOINT_URL=http://127.0.0.1:$S3_PORT PREFECT_API_URL=http://127.0.0.1:$PORT/api
BUCKET=s3://supermerge-e2e
POOL=supermerge-cpu
POOLS="[{\"name\": \"$POOL\", \"device\": \"cpu\", \"memory\": \"8GB\"}]"
ZOMBIE_WITHIN=${ZOMBIE_WITHIN:-40}
CHECK=("$PY" deploy/e2e_distributed_check.py)

say "S3 (moto) on 127.0.0.1:$S3_PORT, Prefect server on 127.0.0.1:$PORT"
background "$WORK/s3.log" moto_server -H 127.0.0.1 -p "$S3_PORT"
background "$WORK/server.log" prefect server start --host 127.0.0.1 --port "$PORT"
CONFIG0=$("$PY" deploy/e2e_models.py "$WORK/ws" 2>"$WORK/models.log")
CONFIG=$("${CHECK[@]}" config "$WORK/ws" "${STEPS:-300}")
for _ in $(seq 1 240); do
  curl -fsS "$PREFECT_API_URL/health" >/dev/null 2>&1 && curl -fsS "$AWS_ENDPOINT_URL" >/dev/null 2>&1 && break
  sleep 0.5
done
curl -fsS "$PREFECT_API_URL/health" >/dev/null || { echo "the Prefect server did not answer in 120 s" >&2; exit 1; }
"${CHECK[@]}" bucket "$BUCKET/x" >/dev/null
say "servers healthy; tiny models built ($CONFIG0), the tree's config $CONFIG"

prefect --no-prompt work-pool create "$POOL" --type process >"$WORK/pool.log" 2>&1
"$PY" -m supermerge.flows.pools deploy --pool "$POOL" >"$WORK/deploy.log" 2>&1 \
  || { echo "deploying merge-node/$POOL failed" >&2; exit 1; }
"$PY" -m supermerge.flows.automations --within "$ZOMBIE_WITHIN" >"$WORK/automation.log" 2>&1
declare -A WORKER_PID
for w in worker-a worker-b; do
  SUPERMERGE_STORE_CACHE=$WORK/cache-$w background "$WORK/$w.log" \
    prefect worker start --pool "$POOL" --type process --limit 1 --name "$w"
  WORKER_PID[$w]=${PGIDS[-1]}
done
WORKERS="{\"worker-a\": ${WORKER_PID[worker-a]}, \"worker-b\": ${WORKER_PID[worker-b]}}"
"${CHECK[@]}" workers "$POOL" 2 >/dev/null
say "pool $POOL, deployment merge-node/$POOL, zombie automation (within $ZOMBIE_WITHIN s), workers online: $WORKERS"

T0=$EPOCHREALTIME
SUPERMERGE_STORE_CACHE=$WORK/cache-ref supermerge merge "$CONFIG" --output "$WORK/ws/out/reference" \
  --store "$WORK/ws/reference-store" >"$WORK/reference.log" 2>&1
say "reference, one process (supermerge merge): $(awk -v a="$T0" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }') s"
IN=$("${CHECK[@]}" merge "$CONFIG" "$WORK/ws/out/in-process" "$WORK/ws/in-process-store" "$WORK/in-process.json" 2>"$WORK/in-process.log")
say "in-process flow (threads): $IN"

export SUPERMERGE_STORE_CACHE=$WORK/cache-parent
D=$("${CHECK[@]}" merge "$CONFIG" "$WORK/ws/out/distributed" "$BUCKET/run1" "$WORK/distributed.json" "$POOLS" 2>"$WORK/distributed.log")
say "distributed: $D"
R=$("${CHECK[@]}" overlap "$WORK/distributed.json" "$WORKERS")
say "siblings: $R"
R=$("${CHECK[@]}" same "$WORK/ws/out/reference" "$WORK/ws/out/distributed")
say "distributed vs reference: $R"

SINCE=$(date +%s.%N)
background "$WORK/killed.log" "${CHECK[@]}" merge "$CONFIG" "$WORK/ws/out/killed" "$BUCKET/run2" "$WORK/killed.json" "$POOLS"
MERGE=${PGIDS[-1]}
KILL=$("${CHECK[@]}" kill-mid-node "$SINCE" "$WORKERS")
say "killed mid-node: $KILL"
wait "$MERGE" || { echo "the merge with a killed worker failed" >&2; exit 1; }
R=$("$PY" -c 'import json, sys; r = json.load(open(sys.argv[1])); print({"seconds": r["seconds"], "merged": r["result"]["merged"]})' "$WORK/killed.json")
say "merge with a killed worker: $R"
R=$("${CHECK[@]}" retried "$WORK/killed.json" "$KILL" "$WORKERS")
say "retried: $R"
R=$("${CHECK[@]}" same "$WORK/ws/out/reference" "$WORK/ws/out/killed")
say "killed-and-retried vs reference: $R"

A=$("${CHECK[@]}" merge "$CONFIG" "$WORK/ws/out/alone" "$BUCKET/run3" "$WORK/alone.json" "$POOLS" 2>"$WORK/alone.log")
say "one worker left, every node alone: $A"
R=$("${CHECK[@]}" peaks "$WORK/distributed.json" "$WORK/alone.json")
say "peaks, siblings at once vs alone: $R"
R=$("${CHECK[@]}" overhead "$WORK/in-process.json" "$WORK/distributed.json" "$WORK/alone.json")
say "seconds per node beyond the merge: $R"
say "passed; stopping servers and workers"
