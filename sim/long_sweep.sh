#!/usr/bin/env bash
# Opt-in long sweep: 3 and 5 replicas, safety and liveness, 2,000 seeds each way.
set -euo pipefail
sim="$1"
status=0
"$sim" --seeds 1000..2999 --replicas 3 --mode safety || status=1
"$sim" --seeds 3000..4999 --replicas 5 --mode liveness || status=1
exit $status
