#!/usr/bin/env bash
# Start a local Ray cluster on this machine with token auth on:
#   cluster/local-up.sh [--workers-node] [--port P] [--dashboard-port D] [--state-dir DIR] [--token-path F] [--num-cpus N]
# Head (+ optional worker node) with non-default ports (GCS 6390, dashboard/job API 8275), every Ray
# listener on 127.0.0.1 (README "Ports and listeners"), a token generated into STATE_DIR/auth_token
# (mode 0600) unless --token-path names an existing one, PID files, ports (cluster.json) and logs in
# STATE_DIR (default runs/cluster). Stop with cluster/local-down.sh.
# Clients of the GCS (ray.init, `stylegen train --address 127.0.0.1:6390`) need
# RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 as well as the token variables; `stylegen submit` needs only the token.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${STYLEGEN_PYTHON:-$ROOT/.venv/bin/python}"
if [[ ! -x "$PY" ]]; then
  echo "local-up.sh: error: $PY not found; run 'make setup' first (or set STYLEGEN_PYTHON)" >&2
  exit 2
fi
exec "$PY" -m stylegen.raycluster up --state-dir "$ROOT/runs/cluster" "$@"
