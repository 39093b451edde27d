#!/usr/bin/env bash
# Print the path of a headless-capable browser (Debian's chromium), installing it with apt-get
# when it is missing and this is root. Used by the tests that open the gMAD pages.
set -euo pipefail
for name in chromium chromium-browser; do
  if command -v "$name" >/dev/null; then command -v "$name"; exit 0; fi
done
if [[ $(id -u) != 0 ]]; then
  echo "chromium is not installed and this is not root: apt-get install chromium" >&2
  exit 1
fi
echo "installing chromium (apt-get)" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get install -y -q chromium >/dev/null 2>&1 ||
  { apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null; }
command -v chromium
