#!/usr/bin/env bash
# Install Prometheus and promtool (Debian/Ubuntu package `prometheus`) for the observability tests.
# Idempotent: does nothing when promtool and prometheus are already on PATH.
set -euo pipefail

if command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1; then
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install-prometheus.sh: no apt-get here; install Prometheus (prometheus and promtool on PATH) by hand" >&2
    exit 1
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi
echo "install-prometheus.sh: installing the prometheus package (prometheus, promtool)"
$SUDO apt-get update -qq
# The tests start their own server on 127.0.0.1; the package's service is not used by them.
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends prometheus >/dev/null
command -v promtool >/dev/null && command -v prometheus >/dev/null
