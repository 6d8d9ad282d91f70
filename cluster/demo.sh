#!/usr/bin/env bash
# `make demo`: submit the main job to the local stack with `ray job submit`, wait for it, and say
# where the registered models are. Assumes `make install up` ran (the Makefile does that first).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="${VENV:-$ROOT/.venv}"
STATE="${METAPREP_STATE_DIR:-$ROOT/.state}"
MLFLOW_URI="http://127.0.0.1:${MLFLOW_PORT:-5000}"
DASHBOARD="http://127.0.0.1:${RAY_DASHBOARD_PORT:-8265}"
RECIPE="${DEMO_RECIPE:-jobs/configs/demo.yaml}"
SUMMARY="$STATE/demo_summary.json"
export MLFLOW_TRACKING_URI="$MLFLOW_URI"
# shellcheck disable=SC1091  # the stack's client environment (Ray token authentication), written by `make up`
source "$STATE/stack.env"

echo "== metaprep demo: ray job submit of jobs.meta_train ($RECIPE)"
start=$(date +%s)
"$VENV/bin/ray" job submit --address "$DASHBOARD" --working-dir . -- \
  python -m jobs.meta_train --config "$RECIPE" --summary-out "$SUMMARY"
end=$(date +%s)

"$VENV/bin/python" - "$SUMMARY" "$MLFLOW_URI" "$DASHBOARD" "$((end - start))" <<'PY'
import json, sys
summary, mlflow_uri, dashboard, secs = json.load(open(sys.argv[1])), sys.argv[2], sys.argv[3], sys.argv[4]
base, ctrl = summary["base_uri"], summary["controller_uri"]
name = base.split("/")[1].rsplit("-", 1)[0]
print(f"""
== done in {secs} s: meta-val query loss {summary['meta_val_loss_start']:.3f} -> {summary['meta_val_loss_end']:.3f}
   after {summary['meta_steps']} meta-steps ({summary['algorithm']}, {summary['reparam']})
Registered (alias 'candidate'):
   {base}
   {ctrl}
Browse:
   MLflow UI      {mlflow_uri}/#/models/{name}-base   (versions, aliases, lineage tags)
   MLflow run     {mlflow_uri}/#/experiments  -> 'metaprep' -> {summary['run_name']}
   Ray dashboard  {dashboard}   (Jobs tab)
Adapt it to a new task:
   .venv/bin/python -m jobs.adapt --base models:/{name}-base@candidate \\
       --controller models:/{name}-controller@candidate --tasks YOUR.jsonl --shots 8 --steps 10
""")
PY
