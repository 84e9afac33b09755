#!/usr/bin/env bash
# `make bench`: release builds, a private `mlflow server` (SQLite, loopback, free port) for the
# drain figure, then armory-bench; results in Benchmarks/results/latest.json.
set -euo pipefail
cd "$(dirname "$0")/.."
swift build -c release --product armoryd
swift build -c release --product armory-bench
swift build -c release --product armoryctl
work=$(mktemp -d /tmp/armory-bench-mlflow.XXXXXX)
mlflow_bin="$(pwd)/.venv/bin/mlflow"
port=$(.venv/bin/python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
(cd "$work" && exec setsid "$mlflow_bin" server --backend-store-uri "sqlite:///$work/mlflow.db" \
   --artifacts-destination "$work/artifacts" --host 127.0.0.1 --port "$port" --workers 4 >"$work/mlflow.log" 2>&1) &
server=$!
trap 'kill -- -$server 2>/dev/null || kill $server 2>/dev/null; rm -rf "$work"' EXIT
for _ in $(seq 1 120); do curl -sf "http://127.0.0.1:$port/health" >/dev/null && break; sleep 1; done
sleep 15  # the server's job consumers busy the CPU for a while after it answers
.build/release/armory-bench --daemon .build/release/armoryd --mlflow "http://127.0.0.1:$port" "$@"

# The Python client next to MLflow's own, against the same server.
home="$work/python-daemon"; mkdir -p "$home"
.build/release/armoryd --socket "$home/d.sock" --home "$home" --log-level warning &
daemon=$!
for _ in $(seq 1 100); do [ -S "$home/d.sock" ] && break; sleep 0.05; done
.venv/bin/python Benchmarks/python_client_bench.py "$home/d.sock" "http://127.0.0.1:$port" Benchmarks/results/python-latest.json
.venv/bin/python Benchmarks/mlflow_plugin_bench.py "$home/d.sock" "http://127.0.0.1:$port" Benchmarks/results/mlflow-plugin-latest.json
kill "$daemon"; wait "$daemon" 2>/dev/null || true

# Resumable sessions: the Python call cost next to the pre-session client, and a restart under load.
.venv/bin/python Benchmarks/resume_bench.py .build/release/armoryd

# A client's hello (its session journaled first) next to an admin tool's.
.venv/bin/python Benchmarks/hello_bench.py .build/release/armoryd "$work"

# `armoryctl sync` into the same server, next to raw log-batch and artifact PUTs.
.venv/bin/python Benchmarks/sync_bench.py --mlflow "http://127.0.0.1:$port"
