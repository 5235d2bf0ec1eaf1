#!/usr/bin/env bash
# Debian's chromium for tests/test_playground.py (driven by playwright through executable_path;
# never `playwright install`, whose browser downloads fail here). Installs it when missing and
# this is root on a Debian-like system; otherwise says what to do (the test then fails).
set -euo pipefail
[ -x /usr/bin/chromium ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium
else
  echo "install_browser: /usr/bin/chromium missing; run: sudo apt-get install -y chromium" >&2
fi
