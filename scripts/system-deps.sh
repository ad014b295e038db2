#!/usr/bin/env bash
# System packages that `make test` needs beyond requirements.txt, installed from Debian when
# missing:
#   chromium    the browser tests (tests/test_browser.py) drive Debian's chromium with Playwright
#   bubblewrap  bwrap, the sandbox used when grading
# Run as root (CI runs as root). Elsewhere it prints what is missing and leaves the system alone;
# the browser tests then skip with the reason. Safe to run again: it installs nothing present.
set -euo pipefail

packages=(chromium bubblewrap)
missing=()
for pkg in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" \
        || missing+=("$pkg")
done

if [ ${#missing[@]} -eq 0 ]; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "system-deps: missing ${missing[*]}; install as root: apt-get install -y ${missing[*]}" >&2
    exit 0
fi
echo "system-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq "${missing[@]}"
