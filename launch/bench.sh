#!/usr/bin/env bash
# Set up the environment (idempotent) and run a benchmark: launch/bench.sh core
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$repo/launch/setup.sh"
which="${1:-core}"; shift || true
exec "${LIQE_VENV:-$repo/.venv}/bin/python" "$repo/launch/bench_$which.py" "$@"
