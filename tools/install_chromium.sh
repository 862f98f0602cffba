#!/usr/bin/env bash
# Installs Debian's chromium (headless browser for the playground test of `pvera serve`) when it
# is missing. Needs root (or sudo) and Debian's package archive. Idempotent.
set -euo pipefail
if [ -x /usr/bin/chromium ]; then
  exit 0
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then
  if command -v sudo >/dev/null; then SUDO="sudo -n"; else
    echo "install_chromium.sh: chromium is missing and this user cannot install packages (not root, no sudo); run: apt-get install -y chromium" >&2
    exit 1
  fi
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends chromium >/dev/null
test -x /usr/bin/chromium
