#!/usr/bin/env bash
# deploy/apt-install.sh PACKAGE COMMAND...: install the Debian/Ubuntu package PACKAGE unless every
# COMMAND is already on PATH (idempotent; what the tests need, for .ci/run).
set -euo pipefail

package=$1
shift
missing=0
for cmd in "$@"; do
    command -v "$cmd" >/dev/null 2>&1 || missing=1
done
if [ "$missing" -eq 0 ]; then
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "apt-install.sh: no apt-get here; install $package ($* on PATH) by hand" >&2
    exit 1
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi
echo "apt-install.sh: installing the $package package ($*)"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "$package" >/dev/null
for cmd in "$@"; do
    command -v "$cmd" >/dev/null
done
