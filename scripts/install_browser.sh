#!/usr/bin/env bash
# Install what the browser test (tests/viz, marker `browser`) needs: Debian's chromium and its fonts.
# Idempotent: does nothing when /usr/bin/chromium already exists. Playwright's own browser download
# (`playwright install`) is NOT used; the test drives /usr/bin/chromium through Playwright's Python package.
set -euo pipefail

if [ -x /usr/bin/chromium ]; then
    echo "install_browser: /usr/bin/chromium present ($(/usr/bin/chromium --version 2>/dev/null || echo unknown version))"
    exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
        echo "install_browser: need root (or sudo) to apt-get install chromium" >&2; exit 1
    fi
fi

export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
echo "install_browser: installed $(/usr/bin/chromium --version 2>/dev/null || echo chromium)"
