#!/usr/bin/env bash
# Measures the node against the hand-written minimum (bench/baseline.py) and a
# peer (taskiq on taskiq-redis's stream broker, bench/peer.py) at 16, 256 and
# 1,000 tasks in flight, on a private redis-server and the API simulator.
# Prints one table with the ratios; writes build/bench/bench.json and
# build/bench/bench.png. A full run takes about 5 minutes on 2 cores.
#
#   scripts/bench.sh [--quick] [--concurrency 16,256] [--systems baseline,mesh-node]
#                    [--latency-ms 50] [--warmup-s S] [--measure-s S] [--out DIR]
#
# Nothing here reaches the real API: every consumer is pointed at the
# simulator with an obviously fake key.
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "$0")/lib.sh"
cd "$repo_root"
ensure_redis_server
ensure_venv
ensure_bench_extra
exec "$venv/bin/python" -m bench.run "$@"
