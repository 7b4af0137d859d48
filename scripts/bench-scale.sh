#!/usr/bin/env bash
# The node at scale (bench/scale.py): start-up time, 1,000 tasks in flight
# against a 5 s API latency in under 256 MB, the task stream empty after
# 10,000 tasks, and a 100,000-task batch with flat memory that resumes after a
# kill without paying twice. Prints one line of figures per check and exits 1
# when a bound is missed. About 10 minutes on 2 cores, most of it the batch.
#
#   scripts/bench-scale.sh [--checks startup,in-flight,hygiene,batch]
#                          [--in-flight N] [--tasks N] [--batch-tasks N]
#
# Nothing here reaches the real API: the node is pointed at the simulator with
# an obviously fake key.
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "$0")/lib.sh"
cd "$repo_root"
ensure_redis_server
ensure_venv
ensure_bench_extra
exec "$venv/bin/python" -m bench.scale "$@"
