#!/usr/bin/env bash
# The whole test suite: lint, format check, type check, then pytest against a
# redis-server and the simulator that the tests start themselves. Extra
# arguments go to pytest.
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "$0")/lib.sh"
cd "$repo_root"

ensure_redis_server
# The cluster test joins its redis-server nodes into a cluster with it.
ensure_command redis-cli redis-tools redis redis redis
# The egress tests make a throwaway TLS certificate with it.
ensure_command openssl
ensure_venv

say "== ruff check"
"$venv/bin/ruff" check .
say "== ruff format --check"
"$venv/bin/ruff" format --check .
say "== mypy"
"$venv/bin/mypy"
say "== pytest"
"$venv/bin/pytest" "$@"
