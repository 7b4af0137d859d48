#!/usr/bin/env bash
# The fault-injection run, at any size: nodes killed with SIGKILL, Redis
# restarted and a node stopped with SIGTERM while tasks flow. Prints the
# figures and exits 1 when a delivery guarantee broke.
#
#   scripts/chaos.sh [--tasks 1000] [--nodes 2] [--kills 2] [--sigterms 1]
#                    [--redis-restarts 1] [--concurrency 16] [--seed 1]
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "$0")/lib.sh"
cd "$repo_root"
ensure_redis_server
ensure_venv
exec "$venv/bin/python" -m tests.chaos "$@"
