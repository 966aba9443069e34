#!/usr/bin/env bash
# The local stack behind the deployments: a Prefect server (SQLite), the qatgguf work
# pool, the deployments of deployment.yaml and a process worker, all on 127.0.0.1.
#   infra/local-stack.sh up     start (idempotent) and deploy
#   infra/local-stack.sh down   stop the worker and the server
# PREFECT_API_URL picks the server's address (default http://127.0.0.1:4200/api). With
# RAY_ADDRESS=host:port in the environment, flow runs join that Ray cluster (see
# ray-cluster.yaml); without it each run starts a private local Ray. With
# QATGGUF_ALERT_WEBHOOK set, `up` also installs the alerts of automations.yaml.
#
# Each background process runs in a session of its own (setsid) whose id is recorded, so
# `down` stops the whole process group (a server's or worker's children included), and
# none of them keeps the caller's stdout: `up | tail` returns.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
bin="$root/.venv/bin"
state="${QATGGUF_CACHE:-$HOME/.cache/qatgguf}/stack"
mkdir -p "$state"
export PREFECT_API_URL="${PREFECT_API_URL:-http://127.0.0.1:4200/api}"
export PREFECT_SERVER_ANALYTICS_ENABLED=false
export QATGGUF_HOME="$root"
hostport="${PREFECT_API_URL#*://}"; hostport="${hostport%%/*}"
host="${hostport%%:*}"; port="${hostport##*:}"

healthy() { curl -sf "$PREFECT_API_URL/health" >/dev/null 2>&1; }
running() { [ -f "$state/$1.pid" ] && kill -0 -- "-$(cat "$state/$1.pid")" 2>/dev/null; }

# start NAME LOG CMD...: CMD in a new session, detached from our stdin/stdout/stderr; the
# session leader writes its own pid (its process group id), whether or not setsid forked
start() {
  local name=$1 log=$2; shift 2
  rm -f "$state/$name.pid"
  (cd "$root" && exec setsid sh -c 'echo $$ >"$0"; exec "$@"' "$state/$name.pid" "$@") </dev/null >"$log" 2>&1 &
  for _ in $(seq 50); do [ -s "$state/$name.pid" ] && return; sleep 0.1; done
  echo "$name did not start; see $log" >&2; exit 1
}

up() {
  if ! healthy; then
    start server "$state/server.log" "$bin/prefect" server start --host "$host" --port "$port"
    for _ in $(seq 240); do healthy && break; sleep 0.5; done
    healthy || { echo "Prefect server did not start; see $state/server.log" >&2; exit 1; }
  fi
  "$bin/prefect" work-pool inspect qatgguf-local >/dev/null 2>&1 \
    || "$bin/prefect" work-pool create qatgguf-local --type process >/dev/null
  (cd "$root" && "$bin/prefect" --no-prompt deploy --prefect-file deployment.yaml \
     --name release --name nightly) >"$state/deploy.log" 2>&1 \
    || { echo "deploy failed; see $state/deploy.log" >&2; exit 1; }
  if [ -n "${QATGGUF_ALERT_WEBHOOK:-}" ]; then
    (cd "$root" && "$bin/python" -m qatgguf.flows.alerts) >>"$state/deploy.log" 2>&1
  fi
  running worker || start worker "$state/worker.log" "$bin/prefect" worker start --pool qatgguf-local
  echo "Prefect UI: ${PREFECT_API_URL%/api}   worker log: $state/worker.log"
  echo "Run a release: $bin/prefect deployment run release/release --param config=tiny-family"
}

down() {
  for p in worker server; do
    if [ -f "$state/$p.pid" ]; then
      pgid="$(cat "$state/$p.pid")"
      kill -TERM -- "-$pgid" 2>/dev/null || true
      for _ in $(seq 40); do kill -0 -- "-$pgid" 2>/dev/null || break; sleep 0.25; done
      kill -KILL -- "-$pgid" 2>/dev/null || true
      rm -f "$state/$p.pid"
    fi
  done
}

case "${1:-up}" in up) up ;; down) down ;; *) echo "usage: $0 up|down" >&2; exit 2 ;; esac
