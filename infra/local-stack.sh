#!/usr/bin/env bash
# The local stack behind the deployments: a Prefect server (SQLite), the qatgguf work
# pool, both deployments of deployment.yaml and a process worker, all on 127.0.0.1.
#   infra/local-stack.sh up     start (idempotent) and deploy
#   infra/local-stack.sh down   stop the worker and the server
# With RAY_ADDRESS=host:port in the environment, flow runs join that Ray cluster
# (see ray-cluster.yaml); without it each run starts a private local Ray.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
bin="$root/.venv/bin"
state="${QATGGUF_CACHE:-$HOME/.cache/qatgguf}/stack"
mkdir -p "$state"
export PREFECT_API_URL="${PREFECT_API_URL:-http://127.0.0.1:4200/api}"
export PREFECT_SERVER_ANALYTICS_ENABLED=false
export QATGGUF_HOME="$root"

healthy() { curl -sf "$PREFECT_API_URL/health" >/dev/null 2>&1; }

up() {
  if ! healthy; then
    setsid nohup "$bin/prefect" server start --host 127.0.0.1 --port 4200 >"$state/server.log" 2>&1 &
    echo $! >"$state/server.pid"
    for _ in $(seq 240); do healthy && break; sleep 0.5; done
    healthy || { echo "Prefect server did not start; see $state/server.log" >&2; exit 1; }
  fi
  "$bin/prefect" work-pool inspect qatgguf-local >/dev/null 2>&1 \
    || "$bin/prefect" work-pool create qatgguf-local --type process
  (cd "$root" && "$bin/prefect" --no-prompt deploy --prefect-file deployment.yaml --all)
  if ! { [ -f "$state/worker.pid" ] && kill -0 "$(cat "$state/worker.pid")" 2>/dev/null; }; then
    (cd "$root" && setsid nohup "$bin/prefect" worker start --pool qatgguf-local >"$state/worker.log" 2>&1 & echo $! >"$state/worker.pid")
  fi
  echo "Prefect UI: ${PREFECT_API_URL%/api}   worker log: $state/worker.log"
  echo "Run a release: $bin/prefect deployment run release/release --param config=tiny-family"
}

down() {
  for p in worker server; do
    if [ -f "$state/$p.pid" ]; then kill "$(cat "$state/$p.pid")" 2>/dev/null || true; rm -f "$state/$p.pid"; fi
  done
}

case "${1:-up}" in up) up ;; down) down ;; *) echo "usage: $0 up|down" >&2; exit 2 ;; esac
