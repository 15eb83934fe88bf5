# Shared by deploy/e2e.sh and deploy/e2e_distributed.sh (sourced, from the repository root): a temp dir,
# timestamped messages, background processes each in its own process group, all stopped on exit, failure
# or Ctrl-C, and the logs' last lines on a failure. Set before sourcing: E2E_TAG (the messages' prefix and
# the temp dir's name) and E2E_STOPPED (the last message of a passing run). KEEP=1 keeps the temp dir.
ROOT=$PWD
PY=${PYTHON:-python}
STARTED=$EPOCHREALTIME
WORK=$(mktemp -d -t "supermerge-$E2E_TAG.XXXXXX")
PGIDS=()

say() { awk -v a="$STARTED" -v b="$EPOCHREALTIME" -v t="$E2E_TAG" -v m="$*" 'BEGIN { printf "[%s %5.1fs] %s\n", t, b - a, m }'; }

cleanup() {
  local rc=$? i
  # last started first (workers before the server they talk to); a Prefect 3.8.8 worker here ignored
  # SIGTERM and SIGINT for over 30 s, so a group still alive after 10 s is killed (nothing is running by then)
  for ((i = ${#PGIDS[@]} - 1; i >= 0; i--)); do
    kill -TERM -- "-${PGIDS[i]}" 2>/dev/null || true
    for _ in $(seq 1 50); do kill -0 -- "-${PGIDS[i]}" 2>/dev/null || break; sleep 0.2; done
    kill -KILL -- "-${PGIDS[i]}" 2>/dev/null || true
  done
  if [ "$rc" != 0 ]; then
    echo "[$E2E_TAG] FAILED (exit $rc); last lines of the logs:" >&2
    for f in "$WORK"/*.log; do [ -f "$f" ] && { echo "--- $f" >&2; tail -n 25 "$f" >&2; }; done
  fi
  if [ "${KEEP:-0}" = 1 ]; then echo "[$E2E_TAG] kept $WORK"; else rm -rf "$WORK"; fi
  [ "$rc" = 0 ] && say "$E2E_STOPPED"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

background() {  # background LOG CMD...: start CMD in its own process group, remember the group
  local log=$1; shift
  setsid "$@" >"$log" 2>&1 &
  PGIDS+=("$!")
}

free_port() { "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
