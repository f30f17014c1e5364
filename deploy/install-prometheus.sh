#!/usr/bin/env bash
# Install Prometheus and promtool (Debian/Ubuntu package `prometheus`) for the observability tests.
# Idempotent: does nothing when promtool and prometheus are already on PATH. The tests start their
# own server on 127.0.0.1; the package's service is not used by them.
set -euo pipefail
exec "$(dirname "$0")/apt-install.sh" prometheus prometheus promtool
