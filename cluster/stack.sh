#!/usr/bin/env bash
# Local stack: a Ray head on 127.0.0.1 (dashboard/job server :8265) and an MLflow tracking
# server (SQLite backend store; it owns the artifacts and serves them over HTTP) on 127.0.0.1:${MLFLOW_PORT:-5000}.
#   bash cluster/stack.sh up|down|status
# Idempotent: `up` reuses healthy servers that are already running from this state folder.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
STATE="${METAPREP_STATE_DIR:-$ROOT/.state}"
MLFLOW_PORT="${MLFLOW_PORT:-5000}"
RAY_PORT="${RAY_PORT:-6379}"
DASHBOARD_PORT="${RAY_DASHBOARD_PORT:-8265}"
RAY_NUM_CPUS="${RAY_NUM_CPUS:-4}"   # logical CPUs: 2 train workers + sweep trials on a 2-core box
HOST=127.0.0.1
MLFLOW_URI="http://$HOST:$MLFLOW_PORT"
export PATH="$VENV/bin:$PATH"
export MLFLOW_DISABLE_TELEMETRY=true
# Ray token authentication (Ray >= 2.52 turns it on by itself for new clusters and for `ray start` when
# ~/.ray/auth_token exists): the stack always runs with its own token in the state folder, readable by
# this user only, so every client (ray job submit, drivers, workers) must present it. The clients'
# environment is in $STATE/stack.env (and the export line `up` prints).
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
export RAY_AUTH_TOKEN_PATH="${RAY_AUTH_TOKEN_PATH:-$STATE/ray_auth_token}"

mkdir -p "$STATE"

port_in_use() { (exec 3<>"/dev/tcp/$HOST/$1") 2>/dev/null; }
mlflow_healthy() { curl -fsS -m 3 "$MLFLOW_URI/health" >/dev/null 2>&1; }
ray_dashboard_up() {
  curl -fsS -m 3 -H "Authorization: Bearer $(cat "$RAY_AUTH_TOKEN_PATH" 2>/dev/null)" \
    "http://$HOST:$DASHBOARD_PORT/api/version" >/dev/null 2>&1
}

ray_node_up() {  # the head node's raylet: without it the dashboard answers but no job, actor or worker can run
  pgrep -f -- "raylet/raylet .*--gcs-address=$HOST:$RAY_PORT" >/dev/null 2>&1
}

ray_healthy() { ray_dashboard_up && ray_node_up; }

ensure_token() {  # 256 random bits, as `ray get-auth-token --generate` makes them, but in the state folder
  if [ "$RAY_AUTH_MODE" = token ] && [ ! -s "$RAY_AUTH_TOKEN_PATH" ]; then
    (umask 077; python -c 'import secrets; print(secrets.token_hex(32), end="")' > "$RAY_AUTH_TOKEN_PATH")
  fi
}

CLIENT_ENV="MLFLOW_TRACKING_URI=$MLFLOW_URI RAY_ADDRESS=http://$HOST:$DASHBOARD_PORT RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 \
RAY_AUTH_MODE=$RAY_AUTH_MODE RAY_AUTH_TOKEN_PATH=$RAY_AUTH_TOKEN_PATH"

wait_for() {  # wait_for WHAT CHECK TIMEOUT_S LOG
  local what="$1" check="$2" timeout="$3" log="$4" t=0
  until $check; do
    sleep 1; t=$((t + 1))
    if [ "$t" -ge "$timeout" ]; then
      echo "error: $what did not become healthy within ${timeout}s; last log lines ($log):" >&2
      tail -n 20 "$log" >&2 || true
      exit 1
    fi
  done
}

up_ray() {
  ensure_token
  if ray_healthy; then echo "ray: already running (dashboard http://$HOST:$DASHBOARD_PORT)"; return; fi
  if ray_dashboard_up; then  # e.g. an interrupted `down`: the GCS and dashboard outlived the raylet
    echo "ray: the dashboard answers but the head node's raylet is gone; restarting Ray"
    ray stop --force > /dev/null 2>&1 || true
  fi
  for p in "$RAY_PORT" "$DASHBOARD_PORT"; do
    if port_in_use "$p"; then
      echo "error: port $p on $HOST is taken by another process; free it or set RAY_PORT / RAY_DASHBOARD_PORT" >&2
      exit 1
    fi
  done
  # Jobs inherit this environment: where state lives and where MLflow is.
  # `ray start` turns --node-ip-address=127.0.0.1 into the machine's address, and Ray's gRPC servers
  # (GCS, raylet, workers) listen on 0.0.0.0 unless the node address is 127.0.0.1. With Ray's
  # single-machine mode (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0) the node address stays the loopback,
  # so every server of the local stack listens on 127.0.0.1 only (issue 22; tests/test_stack_network.py).
  METAPREP_STATE_DIR="$STATE" MLFLOW_TRACKING_URI="$MLFLOW_URI" RAY_TRAIN_V2_ENABLED=1 \
    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 \
    ray start --head --node-ip-address="$HOST" --port="$RAY_PORT" \
      --dashboard-host="$HOST" --dashboard-port="$DASHBOARD_PORT" --num-cpus="$RAY_NUM_CPUS" \
      --include-dashboard=true --disable-usage-stats > "$STATE/ray-start.log" 2>&1 || {
        echo "error: ray start failed; see $STATE/ray-start.log" >&2; tail -n 20 "$STATE/ray-start.log" >&2; exit 1; }
  wait_for "Ray dashboard/job server" ray_healthy 90 "$STATE/ray-start.log"
  echo "ray: up (GCS $HOST:$RAY_PORT, dashboard/jobs http://$HOST:$DASHBOARD_PORT)"
}

up_mlflow() {
  if mlflow_healthy; then echo "mlflow: already running ($MLFLOW_URI)"; return; fi
  if port_in_use "$MLFLOW_PORT"; then
    echo "error: port $MLFLOW_PORT on $HOST is taken by another process; free it or set MLFLOW_PORT" >&2
    exit 1
  fi
  mkdir -p "$STATE/mlartifacts"
  nohup mlflow server --host "$HOST" --port "$MLFLOW_PORT" --workers 1 \
    --backend-store-uri "sqlite:///$STATE/mlflow.db" \
    --serve-artifacts --artifacts-destination "$STATE/mlartifacts" > "$STATE/mlflow.log" 2>&1 &
  echo $! > "$STATE/mlflow.pid"
  wait_for "MLflow server" mlflow_healthy 120 "$STATE/mlflow.log"
  # clients log and load artifacts through the server (mlflow-artifacts:/...), never by a path of this machine
  echo "mlflow: up ($MLFLOW_URI, backend sqlite:///$STATE/mlflow.db, artifacts served from $STATE/mlartifacts)"
}

down() {
  ray stop --force > /dev/null 2>&1 || true
  if [ -f "$STATE/mlflow.pid" ]; then
    pid="$(cat "$STATE/mlflow.pid")"
    pkill -TERM -P "$pid" 2>/dev/null || true
    kill "$pid" 2>/dev/null || true
    rm -f "$STATE/mlflow.pid"
  fi
  for _ in $(seq 1 20); do mlflow_healthy || break; sleep 0.5; done
  echo "stack: down"
}

status() {
  local rc=0
  if ray_healthy; then echo "ray:    up   http://$HOST:$DASHBOARD_PORT"; else echo "ray:    down"; rc=1; fi
  if mlflow_healthy; then echo "mlflow: up   $MLFLOW_URI"; else echo "mlflow: down"; rc=1; fi
  return $rc
}

case "${1:-}" in
  up) up_mlflow; up_ray
      echo "export $CLIENT_ENV" > "$STATE/stack.env"
      echo "clients: source $STATE/stack.env   (or: export $CLIENT_ENV)" ;;
  down) down ;;
  status) status ;;
  *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
