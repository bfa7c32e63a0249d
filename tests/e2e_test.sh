#!/usr/bin/env bash
# Runs the end-to-end tests against the synod-server binary Bazel built.
set -euo pipefail
exec python3 "$(dirname "$0")/e2e_test.py" "$1"
