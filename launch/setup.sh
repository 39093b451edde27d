#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment. Idempotent: when neither the pinned
# versions nor pyproject.toml changed since the last successful run, it returns at once.
#   LIQE_VENV  where the environment lives (default: <repo>/.venv)
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${LIQE_VENV:-$repo/.venv}"
python="${PYTHON:-python3}"
stamp_want="$(cat "$repo/launch/constraints.txt" "$repo/pyproject.toml" | sha256sum | cut -c1-16)"
stamp_file="$venv/.liqe-dist-stamp"

if [[ -x "$venv/bin/python" && -f "$stamp_file" && "$(cat "$stamp_file")" == "$stamp_want" ]]; then
  echo "[setup] environment up to date: $venv"
  exit 0
fi

echo "[setup] building environment in $venv (first time: a few minutes, ~6 GB)"
[[ -x "$venv/bin/python" ]] || "$python" -m venv "$venv"
pip_log="$(mktemp)"
trap 'rm -f "$pip_log"' EXIT
pip() {  # quiet pip; on failure show its output, less the mirror's "Location ... ignored" noise
  if ! "$venv/bin/python" -m pip --disable-pip-version-check "$@" >"$pip_log" 2>&1; then
    grep -v "^WARNING: Location '" "$pip_log" >&2 || true
    return 1
  fi
}
pip install -q --upgrade pip setuptools wheel
# torch first: deepspeed's setup imports torch, and installing it up front keeps pip from ever
# resolving a different torch inside a build environment.
pip install -q -c "$repo/launch/constraints.txt" torch torchvision
pip install -q -c "$repo/launch/constraints.txt" --no-build-isolation deepspeed
pip install -q -c "$repo/launch/constraints.txt" -e "$repo[test]"
echo "$stamp_want" > "$stamp_file"
echo "[setup] done: $("$venv/bin/python" -c 'import torch, open_clip; print("torch", torch.__version__, "open_clip", open_clip.__version__)')"
