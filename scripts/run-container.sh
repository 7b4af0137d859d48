#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# The node's image, run by hand with the compose file's restrictions, as the
# original container's run-container.sh was:
#
#   scripts/run-container.sh interactive                tasks on stdin, results on stdout
#   scripts/run-container.sh batch tasks.json > results.json
#   scripts/run-container.sh serve                      consume the stream until stopped
#   scripts/run-container.sh audit                      the sandbox's posture, from inside
#   scripts/run-container.sh build                      build the image, with no network
#
# The engine is podman when there is one, else docker (CONTAINER_ENGINE names
# one). The image is MESH_IMAGE (default localhost/mesh-node:latest); `build`
# makes it from BASE_IMAGE (default python:3.12-slim), first filling the
# wheelhouse for that base's Python.
#
# The API key comes from the file ANTHROPIC_API_KEY_FILE, else from
# ANTHROPIC_API_KEY or CLAUDE_API_KEY, which is written to a file of mode 0600
# that is deleted when the script exits. Either file is mounted read-only at
# /run/secrets/anthropic_api_key; the key is never an environment variable of
# the container nor an argument of the engine, so neither `inspect` nor `ps`
# shows it.
#
# The container has no network (MESH_NETWORK=none) unless told otherwise: the
# node's only allowed way out is the egress proxy (config/squid.conf.template;
# scripts/verify-container.sh shows it running on the host behind a unix
# socket), which this script does not start or mount, so here the API is out
# of its reach. MESH_NETWORK names an engine network to use instead. `serve` needs Redis: MESH_REDIS_SOCKET=/path/to/redis.sock
# mounts that socket's directory and points the node at it; with a network,
# REDIS_URL does. ANTHROPIC_BASE_URL, REDIS_URL, MESH_PREFIX, MESH_GROUP,
# MESH_NODE_ID, MESH_CONCURRENCY and the OTEL_* exporter settings pass through
# when set.
set -euo pipefail
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"
# shellcheck source=image-lib.sh
source "$(dirname "$0")/image-lib.sh"

image=${MESH_IMAGE:-localhost/mesh-node:latest}
network=${MESH_NETWORK:-none}
key_in_container=/run/secrets/anthropic_api_key
socket_dir_in_container=/run/mesh
passed_through=(ANTHROPIC_BASE_URL REDIS_URL MESH_PREFIX MESH_GROUP MESH_NODE_ID
  MESH_CONCURRENCY OTEL_EXPORTER_OTLP_ENDPOINT OTEL_EXPORTER_OTLP_PROTOCOL
  OTEL_SERVICE_NAME)
key_dir=""
key_flags=()
identity_flags=()
# The key leaves the environment at once, so that no process this script
# starts, the engine's client included, inherits it.
api_key=${ANTHROPIC_API_KEY:-${CLAUDE_API_KEY:-}}
unset ANTHROPIC_API_KEY CLAUDE_API_KEY

usage() {
  say "usage: $0 interactive | batch FILE | serve | audit | build"
  exit 2
}

cleanup() {
  [ -z "$key_dir" ] || rm -rf "$key_dir"
}
trap cleanup EXIT

find_engine() {
  local engine=${CONTAINER_ENGINE:-}
  if [ -z "$engine" ]; then
    engine=$(command -v podman || command -v docker || true)
  fi
  [ -n "$engine" ] || {
    say "no container engine: install podman or docker, or set CONTAINER_ENGINE"
    return 2
  }
  echo "$engine"
}

rootless_podman() {
  [ "${engine##*/}" = podman ] &&
    [ "$("$engine" info --format '{{.Host.Security.Rootless}}')" = true ]
}

# Sets key_flags to the mount of the key file, and identity_flags to what lets
# uid 1000 in the container read it.
prepare_key() {
  local required=$1 file=${ANTHROPIC_API_KEY_FILE:-}
  key_flags=()
  identity_flags=()
  if [ -z "$file" ]; then
    if [ -z "$api_key" ]; then
      [ "$required" = required ] || return 0
      say "no API key: set ANTHROPIC_API_KEY_FILE, ANTHROPIC_API_KEY or CLAUDE_API_KEY"
      return 2
    fi
    key_dir=$(mktemp -d "${TMPDIR:-/tmp}/mesh-key.XXXXXX")
    file="$key_dir/anthropic_api_key"
    # printf is a builtin: the key is in no process's arguments.
    (umask 077 && printf '%s' "$api_key" >"$file")
    own_key_file "$file"
  fi
  [ -r "$file" ] || {
    say "cannot read the key file $file"
    return 2
  }
  key_flags=(--volume "$(realpath "$file"):$key_in_container:ro"
    --env "ANTHROPIC_API_KEY_FILE=$key_in_container")
  if rootless_podman; then
    identity_flags=(--userns "keep-id:uid=1000,gid=1000")
  fi
}

# The node runs as uid 1000. Rootless podman maps the caller to it; for an
# engine running as root, the file must belong to uid 1000.
own_key_file() {
  if rootless_podman; then
    return 0
  fi
  if [ "$(id -u)" -eq 0 ]; then
    chown 1000:1000 "$1"
  elif [ "$(id -u)" -ne 1000 ]; then
    say "the node runs as uid 1000 and could not read a key file of uid $(id -u):" \
      "run as root, as uid 1000, or with rootless podman"
    return 2
  fi
}

redis_flags() {
  local socket=${MESH_REDIS_SOCKET:-}
  if [ -n "$socket" ]; then
    [ -S "$socket" ] || {
      say "MESH_REDIS_SOCKET: $socket is not a unix socket"
      return 2
    }
    printf '%s\n' --volume "$(dirname "$(realpath "$socket")"):$socket_dir_in_container" \
      --env "REDIS_URL=unix://$socket_dir_in_container/${socket##*/}"
  elif [ "$network" = none ]; then
    say "serve needs Redis: set MESH_REDIS_SOCKET=/path/to/redis.sock," \
      "or MESH_NETWORK and REDIS_URL"
    return 2
  fi
}

ensure_image() {
  engine_command "$engine" image inspect "$image" >/dev/null 2>&1 || {
    say "no image $image: run $0 build first"
    return 2
  }
}

# Runs the image with the compose file's restrictions.
#
# Args: run flags, then the command for mesh-node.
run_node() {
  local flags env_flags=() name
  mapfile -t flags < <(hardening_flags "$engine")
  for name in "${passed_through[@]}"; do
    # NAME alone: the engine copies the value from this environment.
    [ -z "${!name:-}" ] || env_flags+=(--env "$name")
  done
  engine_command "$engine" run --rm --network "$network" "${flags[@]}" \
    "${identity_flags[@]}" "${key_flags[@]}" "${env_flags[@]}" "$@"
}

build() {
  local base=${BASE_IMAGE:-python:3.12-slim} facts
  ensure_tools_venv
  say "reading the Python of $base ..."
  facts=$(base_python_facts "$engine" "$base")
  # shellcheck disable=SC2086 # three words: version, glibc, machine
  build_wheelhouse $facts
  lint_dockerfile
  build_image "$engine" "$image" "$base"
  say "$image: $(engine_command "$engine" image inspect --format '{{.Size}}' "$image" |
    awk '{ printf "%d MB", $1 / 1000000 }')"
}

main() {
  [ $# -ge 1 ] || usage
  local command=$1 status=0
  shift
  engine=$(find_engine)
  case "$command" in
    build)
      [ $# -eq 0 ] || usage
      build
      ;;
    interactive)
      [ $# -eq 0 ] || usage
      ensure_image
      prepare_key required
      run_node --interactive --no-healthcheck "$image" interactive
      ;;
    batch)
      [ $# -eq 1 ] || usage
      [ "$1" = - ] || [ -r "$1" ] || {
        say "cannot read $1"
        exit 2
      }
      ensure_image
      prepare_key required
      # The file goes in on stdin, so the node needs no mount to read it.
      if [ "$1" = - ]; then
        run_node --interactive --no-healthcheck "$image" batch -
      else
        run_node --interactive --no-healthcheck "$image" batch - <"$1"
      fi
      ;;
    serve)
      [ $# -eq 0 ] || usage
      ensure_image
      prepare_key required
      local redis_output redis
      redis_output=$(redis_flags) || exit 2
      mapfile -t redis <<<"$redis_output"
      [ -n "$redis_output" ] || redis=()
      run_node --name "${MESH_CONTAINER_NAME:-mesh-node}" "${redis[@]}" "$image" serve
      ;;
    audit)
      [ $# -eq 0 ] || usage
      ensure_image
      prepare_key optional
      run_node --no-healthcheck "$image" audit || status=$?
      say "mesh-node audit exited $status"
      exit "$status"
      ;;
    *) usage ;;
  esac
}

main "$@"
