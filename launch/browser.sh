#!/usr/bin/env bash
# Print the path of a headless-capable browser (Debian's chromium), or with --driver of its
# WebDriver (chromedriver, same version), installing the Debian package with apt-get when it is
# missing and this is root. Used by the tests that open the gMAD pages and drive the study.
set -euo pipefail
if [[ "${1:-}" == --driver ]]; then names=(chromedriver); package=chromium-driver
else names=(chromium chromium-browser); package=chromium; fi
find_it() {
  for name in "${names[@]}"; do
    if command -v "$name" >/dev/null; then command -v "$name"; return 0; fi
  done
  return 1
}
find_it && exit 0
if [[ $(id -u) != 0 ]]; then
  echo "$package is not installed and this is not root: apt-get install $package" >&2
  exit 1
fi
echo "installing $package (apt-get)" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get install -y -q "$package" >/dev/null 2>&1 ||
  { apt-get update -q >/dev/null && apt-get install -y -q "$package" >/dev/null; }
find_it
