#!/usr/bin/env bash
# `make demo`: start armoryd on the local store (or reuse a running one), run the example
# evaluation, show `armoryctl status` and where the results are.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.build/debug
ARMORY_HOME=${ARMORY_HOME:-$HOME/.armory}
export ARMORY_HOME
mkdir -p "$ARMORY_HOME"

if "$BIN/armoryctl" status >/dev/null 2>&1; then
  echo "demo: reusing the armoryd that is already running"
else
  echo "demo: starting armoryd in the background (log: $ARMORY_HOME/armoryd.log)"
  # System metrics every second (default 10 s), so that even this short example shows charts.
  nohup "$BIN/armoryd" --system-metrics-interval 1 >>"$ARMORY_HOME/armoryd.log" 2>&1 </dev/null &
  for _ in $(seq 1 100); do
    "$BIN/armoryctl" status >/dev/null 2>&1 && break
    sleep 0.1
  done
fi
"$BIN/armoryctl" status >/dev/null 2>&1 || { echo "demo: armoryd did not start; see $ARMORY_HOME/armoryd.log" >&2; tail -5 "$ARMORY_HOME/armoryd.log" >&2; exit 1; }

echo
echo "demo: running the example evaluation (armory-example)"
case "${MLFLOW_TRACKING_URI:-}" in
  http://*|https://*)
    # On a server: wait (bounded) until everything is confirmed there before showing it.
    ARMORY_WAIT_UPLOAD=${ARMORY_WAIT_UPLOAD:-60} "$BIN/armory-example"
    ARMORY_WAIT_UPLOAD=${ARMORY_WAIT_UPLOAD:-60} .venv/bin/python clients/python/examples/armory_example.py
    echo
    "$BIN/armoryctl" status || true
    echo
    echo "Results are on the MLflow server ${MLFLOW_TRACKING_URI} (experiment armory-example); open it in a browser."
    exit 0
    ;;
esac
"$BIN/armory-example"
echo
echo "demo: running the same evaluation written in Python with armory_track (clients/python/examples)"
.venv/bin/python clients/python/examples/armory_example.py
echo
echo "demo: resuming a run with unchanged MLflow code through armoryd (MLFLOW_TRACKING_URI=armoryd://)"
MLFLOW_TRACKING_URI=armoryd:// .venv/bin/python clients/python/examples/mlflow_resume.py
echo
"$BIN/armoryctl" status || true

store=$("$BIN/armoryctl" status --json | .venv/bin/python -c 'import json,sys; print(json.load(sys.stdin)["destination"])')
cat <<MSG

Results are in the local MLflow store: ${store}
Open them in the MLflow UI: PATH=$(pwd)/.venv/bin:\$PATH ${BIN}/armoryctl mlflow-server
  prints a link per experiment that opens it on its runs table, for example
  http://127.0.0.1:5000/#/experiments/<id>?workflowType=machine_learning (MLflow 3.17's UI opens
  experiments on an empty traces page otherwise: choose "Model training" at its top left). Or directly:
  MLFLOW_ALLOW_FILE_STORE=true $(pwd)/.venv/bin/mlflow server --backend-store-uri ${store} --host 127.0.0.1 --port 5000
Or read them with the MLflow client:
  MLFLOW_ALLOW_FILE_STORE=true $(pwd)/.venv/bin/python -c "import mlflow; print(mlflow.MlflowClient('${store}').search_experiments())"
The daemon keeps running; stop it with: kill \$(${BIN}/armoryctl status --json | .venv/bin/python -c 'import json,sys; print(json.load(sys.stdin)["pid"])')
MSG
