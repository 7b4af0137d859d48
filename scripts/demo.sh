#!/usr/bin/env bash
# Runs the node's main job end to end on this machine, offline: a private
# redis-server, the Messages API simulator, one `mesh-node serve`, and the
# example tasks submitted to the stream. Prints one result per task on stdout.
#
#   scripts/demo.sh [TASKS_FILE]      (default examples/tasks.jsonl)
#
# Nothing here reaches the real API: the node is pointed at the simulator and
# given an obviously fake key.
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "$0")/lib.sh"
cd "$repo_root"
tasks_file=${1:-examples/tasks.jsonl}
[ -r "$tasks_file" ] || { say "cannot read $tasks_file"; exit 2; }

ensure_redis_server
ensure_venv

work=$(mktemp -d "${TMPDIR:-/tmp}/mesh-demo.XXXXXX")
pids=()
# shellcheck disable=SC2317 # run by the trap below
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

redis_port=$(free_port)
redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no \
  --dir "$work" --logfile "$work/redis.log" &
pids+=($!)

api_port=$(free_port)
"$venv/bin/mesh-node" simulate-api --port "$api_port" --latency-ms 200 \
  --latency-jitter-ms 300 2>"$work/simulator.log" &
pids+=($!)

export REDIS_URL="redis://127.0.0.1:$redis_port/0"
export ANTHROPIC_BASE_URL="http://127.0.0.1:$api_port"
export ANTHROPIC_API_KEY="sk-ant-demo-not-a-real-key"
unset CLAUDE_API_KEY ANTHROPIC_API_KEY_FILE

wait_until() {
  local what=$1; shift
  for _ in $(seq 100); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done
  say "demo: $what did not come up; its log:"; cat "$work"/*.log >&2; exit 1
}
wait_until "redis-server" redis-cli -p "$redis_port" ping
wait_until "the simulator" grep -q simulator.listening "$work/simulator.log"

"$venv/bin/mesh-node" serve --node-id demo-node 2>"$work/node.log" &
node_pid=$!
pids+=("$node_pid")

say "demo: submitting $tasks_file to the stream; results follow as they finish"
status=0
"$venv/bin/mesh-node" submit "$tasks_file" --wait --timeout 60 2>"$work/submit.log" ||
  status=$?

kill -TERM "$node_pid"
wait "$node_pid" || status=$?
results=$(redis-cli -p "$redis_port" xlen mesh:results)
pending=$(redis-cli -p "$redis_port" xpending mesh:tasks mesh-nodes | head -1)
say "demo: $results results in mesh:results, $pending entries pending; node exit $status"
[ "$status" -eq 0 ] || { say "demo: node log:"; cat "$work/node.log" >&2; }
exit "$status"
