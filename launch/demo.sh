#!/usr/bin/env bash
# Set up the environment (idempotent) and run the demo. Outputs go to runs/demo/.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$repo/launch/setup.sh"
cd "$repo"
exec "${LIQE_VENV:-$repo/.venv}/bin/python" -m liqe_dist.demo "$@"
