#!/usr/bin/env bash
# Stop the local cluster started by cluster/local-up.sh: only the processes in its PID files
# (each `ray start --block` and its process group), never `ray stop` (that stops every Ray here).
#   cluster/local-down.sh [--state-dir DIR]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${STYLEGEN_PYTHON:-$ROOT/.venv/bin/python}"
if [[ ! -x "$PY" ]]; then
  echo "local-down.sh: error: $PY not found; run 'make setup' first (or set STYLEGEN_PYTHON)" >&2
  exit 2
fi
exec "$PY" -m stylegen.raycluster down --state-dir "$ROOT/runs/cluster" "$@"
