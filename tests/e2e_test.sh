#!/usr/bin/env bash
# Runs an end-to-end test script (default e2e_test.py) against the synod-server binary Bazel
# built: e2e_test.sh SERVER [SCRIPT].
set -euo pipefail
exec python3 "$(dirname "$0")/${2:-e2e_test.py}" "$1"
