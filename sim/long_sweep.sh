#!/usr/bin/env bash
# Opt-in long sweep, per group size: 900 seeds each of 3, 4 and 5 replicas (safety and
# liveness), 250 each with leases off and the read-back workload (3 and 4 replicas), 250
# each without pre-votes (3 and 5 replicas), and 100 each of 2, 6 and 7 replicas. Every
# sweep runs, and any failing one fails the test.
set -euo pipefail
sim="$1"
status=0
"$sim" --seeds 1000..1899 --replicas 3 --mode safety || status=1
"$sim" --seeds 2000..2899 --replicas 4 --mode liveness || status=1
"$sim" --seeds 3000..3899 --replicas 5 --mode safety || status=1
"$sim" --seeds 4000..4249 --replicas 3 --leases off --workload reads || status=1
"$sim" --seeds 4250..4499 --replicas 4 --leases off --workload reads --mode liveness || status=1
"$sim" --seeds 4500..4749 --replicas 3 --pre-vote off --leases off --workload reads || status=1
"$sim" --seeds 4750..4999 --replicas 5 --pre-vote off --mode liveness || status=1
for n in 2 6 7; do
  "$sim" --seeds 5000..5099 --replicas "$n" --mode liveness || status=1
done
exit $status
