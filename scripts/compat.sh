#!/usr/bin/env bash
# `make test-compat`: MLflow-using libraries (PyTorch Lightning's MLFlowLogger, what Armory's
# engine uses) unmodified through armoryd://, in a venv of their own (torch is large: CPU wheel).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${ARMORY_COMPAT_VENV:-.venv-compat}
want='mlflow[auth]==3.17.2 pytest psutil torch==2.13.0+cpu lightning'
if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$VENV/.armory-compat" 2>/dev/null)" != "$want" ]; then
  echo "compat: creating $VENV with $want (several minutes)"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check $want </dev/null
  echo "$want" > "$VENV/.armory-compat"
fi
"$VENV/bin/pip" install -q --disable-pip-version-check -e ./clients/python </dev/null
ARMORY_BIN="$(pwd)/.build/debug" "$VENV/bin/python" -m pytest -q clients/python/tests/test_mlflow_plugin.py -k lightning -rs "$@"
