#!/usr/bin/env bash
# Installs what the build and the tests need, once: Debian packages and the
# Python virtual environment with the real MLflow. Safe to run repeatedly;
# runs without a terminal (CI=true, no stdin).
set -euo pipefail
cd "$(dirname "$0")/.."

# postgresql and iproute2: the lab test bed (deploy/testbed.py) of `make test-scale`.
APT_PACKAGES=(libsystemd-dev pkg-config systemd postgresql iproute2)
# `--tests` (make test): Debian's chromium too, for the MLflow UI check (Tests/python/test_mlflow_ui.py).
if [ "${1:-}" = "--tests" ]; then APT_PACKAGES+=(chromium); fi
VENV=${ARMORY_VENV:-.venv}
MLFLOW_SPEC='mlflow[auth]==3.17.2'

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "bootstrap: installing Debian packages: ${missing[*]}"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -q </dev/null
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" </dev/null
fi

command -v swift >/dev/null || { echo "bootstrap: swift is not on PATH (Swift 6.x is required: https://www.swift.org/install/linux/)" >&2; exit 1; }

stamp="$VENV/.armory-bootstrap"
want="$MLFLOW_SPEC psycopg[binary] pytest jsonschema psutil"
if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "bootstrap: creating $VENV with $want (about a minute)"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check "$MLFLOW_SPEC" "psycopg[binary]" pytest jsonschema psutil </dev/null
  echo "$want" > "$stamp"
fi
# The Python client, editable, so that tests and examples use this checkout's code; installed
# again when its pyproject.toml changes (its MLflow entry points live in the install's metadata).
client_stamp="$VENV/.armory-client"
client_want=$(sha256sum clients/python/pyproject.toml | cut -d' ' -f1)
if ! "$VENV/bin/python" -c "import armory_track, sys; sys.exit(0 if armory_track.__file__.startswith('$(pwd)/clients/python/') else 1)" 2>/dev/null \
    || [ "$(cat "$client_stamp" 2>/dev/null)" != "$client_want" ]; then
  echo "bootstrap: installing clients/python into $VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check -e ./clients/python </dev/null
  echo "$client_want" > "$client_stamp"
fi
