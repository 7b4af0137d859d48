#!/usr/bin/env bash
# Measures the shared limiter: serve processes sharing one key against a
# simulator that enforces the same per-minute limit. Prints requests, 429s,
# achieved rate and utilisation.
#
#   scripts/bench-limiter.sh [--rpm 600] [--nodes 3] [--seconds 60]
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "$0")/lib.sh"
cd "$repo_root"
ensure_redis_server
ensure_venv
exec "$venv/bin/python" -m bench.limiter "$@"
