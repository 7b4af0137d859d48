#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Builds the node's image with no network and proves what it promises, with
# podman and nothing from an image registry:
#
#   1. a base image from Debian's packages (debootstrap minbase with python3
#      and python3-venv, trimmed), cached between runs;
#   2. the wheelhouse for that base's Python, hadolint, and the build;
#   3. the image's user, workdir, health check, entrypoint and size, and the
#      same layers from a second build;
#   4. runs with the compose file's restrictions and no network: the CLI
#      starts, / is read-only and the workspace is not, pip is gone, a memory
#      hog is killed at the limit, a fork loop is refused at the pids limit,
#      the health check fails with no node, and `serve` reaches a Redis
#      through a unix socket, reports healthy and stops cleanly on SIGTERM;
#   5. the egress checks, not built yet: a placeholder that fails the run.
#
# Exit codes: 0 every check passed, 1 a check failed, 2 not run as root,
# 3 every check passed but the egress checks do not exist yet; any other, the
# code of the step that failed, whose output says why.
#
#   scripts/verify-container.sh
#
# Needs root (debootstrap, and podman's resource limits) and Debian's apt for
# what is missing. VERIFY_SKIP_EGRESS=1 lets a run without the egress checks
# exit 0, and says so. VERIFY_IMAGE_BUDGET_MB (default 220) is the most the
# image may weigh. DEBIAN_MIRROR picks the mirror for the base. The base's
# cache lives in ${XDG_CACHE_HOME:-~/.cache}/mesh-node; deleting it rebuilds
# the base with the mirror's current packages. Every container, process and
# temporary directory the script starts is removed when it exits.
set -euo pipefail
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"
# shellcheck source=image-lib.sh
source "$(dirname "$0")/image-lib.sh"
cd "$repo_root"

engine=podman
suite=bookworm
base_packages=(python3 python3-venv)
base_tag=localhost/mesh-node-base:$suite
image=localhost/mesh-node:verify
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
cache_dir=${XDG_CACHE_HOME:-$HOME/.cache}/mesh-node
# 129 MB of trimmed Debian with Python and 72 MB of venv (the anthropic SDK is
# 39 MB of it, byte code included) made 201 MB; 10 % over that catches a pip
# cache, the tests or a development dependency getting in (mypy alone is
# about 60 MB).
budget_mb=${VERIFY_IMAGE_BUDGET_MB:-220}
skip_egress=${VERIFY_SKIP_EGRESS:-0}
key_in_container=/run/secrets/anthropic_api_key
socket_in_container=/run/mesh/redis.sock

run_id="mesh-verify-$$"
work=""
socket_dir=""
base_tmp=""
redis_pid=""
reported=0
engine_cmd=()
timings=()
results=()
passed=0
failed=0
egress_missing=0

# Every container this run started has a name that begins with its run id.
cleanup() {
  local status=$? name
  if [ "${#engine_cmd[@]}" -gt 0 ]; then
    for name in $("${engine_cmd[@]}" ps --all --format '{{.Names}}' \
      --filter "name=^$run_id-" 2>/dev/null); do
      "${engine_cmd[@]}" rm --force --time 0 "$name" >/dev/null 2>&1 || true
    done
    "${engine_cmd[@]}" rmi "$image-rebuild" >/dev/null 2>&1 || true
  fi
  if [ -n "$redis_pid" ]; then
    kill "$redis_pid" 2>/dev/null || true
    wait "$redis_pid" 2>/dev/null || true
  fi
  rm -rf "$work" "$socket_dir" "$base_tmp"
  if [ "$reported" = 0 ] && [ "${#timings[@]}" -gt 0 ]; then
    say ""
    say "verify-container: stopped by a failed step (exit $status); timings so far:"
    for name in "${timings[@]}"; do say "  $name"; done
  fi
}
trap cleanup EXIT

# Runs one phase and records how long it took.
phase() {
  local name=$1 start=$EPOCHREALTIME
  shift
  say ""
  say "== $name"
  "$@"
  timings+=("$(printf '%-28s %7.1f s' "$name" "$(elapsed_s "$start")")")
}

elapsed_s() {
  awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }'
}

# Runs one check: its command prints a one-line finding and succeeds or fails.
# A failed check does not stop the run, so that one run reports them all.
check() {
  local name=$1 finding status=PASS
  shift
  if finding=$("$@" 2>"$work/check.err"); then
    passed=$((passed + 1))
  else
    status=FAIL
    failed=$((failed + 1))
  fi
  results+=("$(printf '%s  %-22s %s' "$status" "$name" "${finding:-(no output)}")")
  say "$status  $name: ${finding:-(no output)}"
  if [ "$status" = FAIL ] && [ -s "$work/check.err" ]; then
    sed 's/^/        /' "$work/check.err" | tail -n 20 >&2
  fi
}

require_root() {
  [ "$(id -u)" -eq 0 ] || {
    say "verify-container.sh needs root: debootstrap and podman's resource limits"
    exit 2
  }
}

apt_install() {
  command -v apt-get >/dev/null 2>&1 || {
    say "missing $*, and no apt-get to install them with"
    return 1
  }
  say "installing $* ..."
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

ensure_host_tools() {
  local missing=()
  command -v podman >/dev/null 2>&1 || missing+=(podman)
  command -v debootstrap >/dev/null 2>&1 || missing+=(debootstrap)
  if [ "$(oci_runtime)" = runc ] && ! command -v runc >/dev/null 2>&1; then
    missing+=(runc)
  fi
  [ "${#missing[@]}" -eq 0 ] || apt_install "${missing[@]}"
  ensure_redis_server
  ensure_tools_venv
  mapfile -t engine_cmd < <(engine_argv "$engine")
  say "podman $(podman version --format '{{.Client.Version}}'), OCI runtime ${engine_cmd[2]:-the default}"
}

# What a Debian base needs to run the node and nothing of what it only needs
# to be administered by hand: package caches and lists, documents but their
# copyright files, manual pages, translations, logs, and the building host's
# name and resolver.
trim_base() {
  local root=$1
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/cache/apt/*.bin \
    "$root"/var/lib/apt/lists/* "$root"/usr/share/man "$root"/usr/share/info \
    "$root"/var/log/*
  find "$root/usr/share/locale" -mindepth 1 -maxdepth 1 -type d -exec rm -rf {} +
  find "$root/usr/share/doc" -mindepth 1 ! -name copyright ! -type d -delete
  find "$root/usr/share/doc" -mindepth 1 -type d -empty -delete
  : >"$root/etc/resolv.conf"
  echo localhost >"$root/etc/hostname"
}

# The base as a tarball in the cache, keyed by everything that shapes it, and
# as an image labelled with that key, imported again only when it changed.
ensure_base() {
  local key tarball old_id
  key=$(printf '%s\n' "$suite" minbase "${base_packages[@]}" "$mirror" \
    "$(declare -f trim_base)" | sha256sum | cut -c1-16)
  tarball="$cache_dir/base-$suite-$key.tar"
  if [ -f "$tarball" ]; then
    say "base: cached ($tarball)"
  else
    mkdir -p "$cache_dir"
    base_tmp=$(mktemp -d "$cache_dir/base.XXXXXX")
    local includes
    includes=$(IFS=,; echo "${base_packages[*]}")
    say "base: debootstrap --variant=minbase --include=$includes $suite ($mirror) ..."
    if ! debootstrap --variant=minbase --include="$includes" "$suite" \
      "$base_tmp/root" "$mirror" >"$base_tmp/debootstrap.log" 2>&1; then
      tail -n 20 "$base_tmp/debootstrap.log" >&2
      say "debootstrap failed; the end of its log is above"
      return 1
    fi
    trim_base "$base_tmp/root"
    # Source files keep their times: the byte code beside them is checked
    # against them, and a read-only root could not rewrite it.
    tar --numeric-owner -C "$base_tmp/root" -cf "$base_tmp/base.tar" .
    rm -f "$cache_dir"/base-"$suite"-*.tar
    mv "$base_tmp/base.tar" "$tarball"
    rm -rf "$base_tmp"
    base_tmp=""
    say "base: $(du -m "$tarball" | cut -f1) MB, cached as $tarball"
  fi
  if [ "$(image_label "$base_tag" mesh-node.base-key)" = "$key" ]; then
    say "base: $base_tag is up to date"
    return 0
  fi
  old_id=$("${engine_cmd[@]}" image inspect --format '{{.Id}}' "$base_tag" 2>/dev/null || true)
  "${engine_cmd[@]}" import --quiet \
    --change "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
    --change "LABEL mesh-node.base-key=$key" --change 'CMD ["/bin/bash"]' \
    "$tarball" "$base_tag" >/dev/null
  [ -z "$old_id" ] || "${engine_cmd[@]}" rmi "$old_id" >/dev/null 2>&1 || true
  say "base: imported as $base_tag"
}

image_label() {
  "${engine_cmd[@]}" image inspect \
    --format "{{index .Config.Labels \"$2\"}}" "$1" 2>/dev/null || true
}

wheelhouse_for_base() {
  local facts
  facts=$(base_python_facts "$engine" "$base_tag")
  say "the base runs CPython, glibc and machine: $facts"
  # shellcheck disable=SC2086 # three words: version, glibc, machine
  build_wheelhouse $facts
  say "wheelhouse: $(find "$wheelhouse" -name '*.whl' | wc -l) wheels, $(du -sm "$wheelhouse" | cut -f1) MB"
}

build() {
  local old_id
  old_id=$("${engine_cmd[@]}" image inspect --format '{{.Id}}' "$image" 2>/dev/null || true)
  if ! build_image "$engine" "$image" "$base_tag" >"$work/build.log" 2>&1; then
    tail -n 30 "$work/build.log" >&2
    say "the image build failed; the end of its log is above"
    return 1
  fi
  local new_id
  new_id=$("${engine_cmd[@]}" image inspect --format '{{.Id}}' "$image")
  if [ -n "$old_id" ] && [ "$old_id" != "$new_id" ]; then
    "${engine_cmd[@]}" rmi "$old_id" >/dev/null 2>&1 || true
  fi
  say "built $image"
}

inspect() {
  "${engine_cmd[@]}" image inspect --format "$1" "$image"
}

expect_inspect() {
  local template=$1 want=$2 got
  got=$(inspect "$template")
  echo "$got"
  [ "$got" = "$want" ] || { echo "expected $want" >&2; return 1; }
}

check_size() {
  local bytes mb
  bytes=$(inspect '{{.Size}}')
  mb=$((bytes / 1000000))
  echo "$mb MB (budget $budget_mb MB)"
  [ "$mb" -le "$budget_mb" ]
}

# A second build of the same sources must give the same layers, byte for
# byte; the Docker config still differs, by the build container's host name.
check_reproducible() {
  local again="$image-rebuild" first second
  build_image "$engine" "$again" "$base_tag" >"$work/rebuild.log" 2>&1 || {
    tail -n 20 "$work/rebuild.log" >&2
    return 1
  }
  first=$(inspect '{{json .RootFS.Layers}}')
  second=$("${engine_cmd[@]}" image inspect --format '{{json .RootFS.Layers}}' "$again")
  "${engine_cmd[@]}" rmi "$again" >/dev/null 2>&1 || true
  echo "a second build's layers are $([ "$first" = "$second" ] || echo "NOT ")the same: ${first:0:40}..."
  [ "$first" = "$second" ]
}

static_checks() {
  check "user" expect_inspect '{{.Config.User}}' 1000:1000
  check "workdir" expect_inspect '{{.Config.WorkingDir}}' /tmp/claude-work
  check "healthcheck" expect_inspect '{{json .Config.Healthcheck.Test}}' \
    '["CMD","mesh-node","health"]'
  check "entrypoint" expect_inspect '{{json .Config.Entrypoint}}' '["mesh-node"]'
  check "cmd" expect_inspect '{{json .Config.Cmd}}' '["serve"]'
  check "size" check_size
  check "reproducible" check_reproducible
}

# Runs the image once with the compose file's restrictions and no network, as
# a container named after the run, for at most two minutes.
#
# Args: NAME, then run flags and arguments.
run_hardened() {
  local name="$run_id-$1" flags
  shift
  mapfile -t flags < <(hardening_flags "$engine")
  timeout 120 "${engine_cmd[@]}" run --name "$name" --network none \
    "${flags[@]}" "$@"
}

# Runs Python in the hardened image, without the health check that only
# `serve` can pass, and removes the container after.
#
# Args: NAME, CODE.
run_python() {
  run_hardened "$1" --rm --no-healthcheck --entrypoint python3 "$image" -c "$2"
}

check_help() {
  run_hardened help --rm --no-healthcheck "$image" --help >"$work/help.out" || return 1
  echo "mesh-node --help exits 0: $(grep -c . "$work/help.out") lines of usage"
}

check_read_only_root() {
  run_python read-only '
import errno
refused = []
for path in ("/probe", "/opt/venv/probe", "/etc/mesh-node/probe"):
    try:
        open(path, "w").close()
    except OSError as error:
        if error.errno != errno.EROFS:
            raise
        refused.append(path)
    else:
        raise SystemExit(f"{path} was written")
joined = ", ".join(refused)
print(f"writes to {joined} refused: read-only file system")
'
}

check_workspace() {
  run_python workspace '
import os, tempfile
with tempfile.NamedTemporaryFile() as probe:
    probe.write(b"x")
    probe.flush()
    where = os.path.dirname(probe.name)
stat = os.statvfs(where)
print(f"a temporary file goes to {where}, a tmpfs of {stat.f_blocks * stat.f_frsize >> 20} MiB")
'
}

check_no_pip() {
  run_python no-pip '
import importlib.util, sys
found = [name for name in ("pip", "setuptools") if importlib.util.find_spec(name)]
print("importable in the venv:", ", ".join(found) or "neither pip nor setuptools")
sys.exit(bool(found))
'
}

check_network_none() {
  run_python network '
import socket
names = sorted(name for _, name in socket.if_nameindex())
print("network interfaces:", ", ".join(names))
raise SystemExit(names != ["lo"])
'
}

# 1 MiB at a time, written so that every page is real, up to 1 GiB at most,
# saying how far it got every 32 MiB: the kernel must kill it (SIGKILL, 137)
# before 512 MiB. podman does not always learn of a kill under cgroup v1
# (OOMKilled false with runc), so its flag is reported, not required, and the
# kernel's log is quoted when it can be read.
check_memory_limit() {
  local status=0 name="$run_id-memory" id oom reached kernel=""
  run_hardened memory --no-healthcheck --entrypoint python3 "$image" -c '
chunks = []
for mib in range(1, 1025):
    chunks.append(b"x" * (1 << 20))
    if mib % 32 == 0:
        print(mib, flush=True)
print("not stopped")
' >"$work/memory.out" 2>&1 || status=$?
  id=$("${engine_cmd[@]}" inspect --format '{{.Id}}' "$name" 2>/dev/null || true)
  oom=$("${engine_cmd[@]}" inspect --format '{{.State.OOMKilled}}' "$name" 2>/dev/null || true)
  "${engine_cmd[@]}" rm --force "$name" >/dev/null 2>&1 || true
  reached=$(grep -E '^[0-9]+$' "$work/memory.out" | tail -n 1)
  if [ -n "$id" ] && dmesg 2>/dev/null | grep -q "oom_memcg=.*$id"; then
    kernel="; kernel: memory cgroup out of memory, killed"
  fi
  echo "exit $status after ${reached:-0} MiB, podman OOMKilled $oom$kernel"
  [ "$status" -eq 137 ] && [ "${reached:-0}" -lt 512 ] &&
    ! grep -q "not stopped" "$work/memory.out"
}

# Forks up to 1,000 children that exit at once; unreaped, each holds its pid,
# so the pids limit (128) must refuse a fork long before the loop ends.
check_pids_limit() {
  run_python pids '
import os, sys
children = 0
refused = None
try:
    for _ in range(1000):
        if os.fork() == 0:
            os._exit(0)
        children += 1
except OSError as error:
    refused = error.strerror
while True:
    try:
        os.wait()
    except ChildProcessError:
        break
if refused is None:
    sys.exit(f"{children} forks all succeeded")
print(f"fork refused after {children} children: {refused}")
sys.exit(children >= 128)
'
}

start_redis() {
  socket_dir=$(mktemp -d "${TMPDIR:-/tmp}/mesh-verify-redis.XXXXXX")
  # The node runs as uid 1000, so Redis and its socket belong to uid 1000
  # alone: no one else on the host can reach it.
  chown 1000:1000 "$socket_dir"
  chmod 0700 "$socket_dir"
  setpriv --reuid 1000 --regid 1000 --clear-groups redis-server --port 0 \
    --unixsocket "$socket_dir/redis.sock" --unixsocketperm 700 --save "" \
    --appendonly no --dir "$socket_dir" --logfile "$socket_dir/redis.log" &
  redis_pid=$!
  for _ in $(seq 50); do
    redis-cli -s "$socket_dir/redis.sock" ping >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  cat "$socket_dir/redis.log" >&2
  say "redis-server did not come up on $socket_dir/redis.sock"
  return 1
}

write_fake_key() {
  printf '%s' "sk-ant-verify-not-a-real-key" >"$work/api_key"
  chown 1000:1000 "$work/api_key"
  chmod 0400 "$work/api_key"
}

redis_flags() {
  printf '%s\n' --volume "$socket_dir:$(dirname "$socket_in_container")" \
    --env "REDIS_URL=unix://$socket_in_container"
}

# The health check must be able to fail: with Redis there but no node
# beating, `mesh-node health` exits 1.
check_unhealthy_without_node() {
  local status=0 redis
  mapfile -t redis < <(redis_flags)
  run_hardened health --rm --no-healthcheck "${redis[@]}" "$image" health \
    >"$work/unhealthy.out" 2>&1 || status=$?
  echo "with no node serving: exit $status, $(tail -n 1 "$work/unhealthy.out")"
  [ "$status" -eq 1 ]
}

start_serve() {
  local redis
  mapfile -t redis < <(redis_flags)
  run_hardened serve --detach "${redis[@]}" \
    --volume "$work/api_key:$key_in_container:ro" \
    --env "ANTHROPIC_API_KEY_FILE=$key_in_container" \
    "$image" serve >"$work/serve.start" 2>&1 || {
    cat "$work/serve.start" >&2
    return 1
  }
}

# A podman without systemd schedules no periodic health checks ("unable to
# get systemd connection to add healthchecks"), so each one runs here by hand.
check_healthy() {
  local name="$run_id-serve" status=""
  for _ in $(seq 30); do
    if "${engine_cmd[@]}" healthcheck run "$name" >"$work/health.out" 2>&1; then
      status=$("${engine_cmd[@]}" inspect --format '{{.State.Health.Status}}' "$name")
      [ "$status" != healthy ] || break
    fi
    sleep 1
  done
  echo "podman healthcheck run: ${status:-unhealthy}$(sed -n '1s/^/, /p' "$work/health.out")"
  [ "$status" = healthy ]
}

check_heartbeat_over_socket() {
  local keys
  keys=$(redis-cli -s "$socket_dir/redis.sock" --scan --pattern 'mesh:node:*')
  echo "heartbeat in Redis through the unix socket: ${keys:-none}"
  [ -n "$keys" ]
}

check_graceful_stop() {
  local name="$run_id-serve" code
  "${engine_cmd[@]}" stop --time 35 "$name" >/dev/null 2>&1
  code=$("${engine_cmd[@]}" inspect --format '{{.State.ExitCode}}' "$name")
  "${engine_cmd[@]}" logs "$name" >"$work/serve.log" 2>&1 || true
  echo "SIGTERM: exit $code; $(grep -c '"node.stopped"' "$work/serve.log") node.stopped line"
  [ "$code" -eq 0 ] && grep -q '"node.stopped"' "$work/serve.log"
}

runtime_checks() {
  check "help" check_help
  check "read-only root" check_read_only_root
  check "workspace" check_workspace
  check "no pip" check_no_pip
  check "no network" check_network_none
  check "memory limit" check_memory_limit
  check "pids limit" check_pids_limit
}

serve_checks() {
  start_redis
  write_fake_key
  check "unhealthy without node" check_unhealthy_without_node
  start_serve
  check "healthy" check_healthy
  check "redis over socket" check_heartbeat_over_socket
  check "graceful stop" check_graceful_stop
}

# NOT BUILT YET: the egress proxy is being built apart from this script. When
# it lands, this step runs, inside the hardened container with --network none:
# `mesh-node audit` passing; a batch of tasks completing against the simulator
# through the allowed path; a direct connection and a disallowed host refused;
# and `audit` run as root outside the container failing the checks that must
# fail.
egress_checks() {
  say "NOT BUILT YET: egress proxy"
  say "  missing: audit inside the container, a batch through the allowed path,"
  say "  a direct connection refused, a disallowed host refused, audit as root"
  say "  outside failing what it must"
  egress_missing=1
}

report() {
  local line
  say ""
  say "== timings"
  for line in "${timings[@]}"; do say "  $line"; done
  say ""
  say "== checks"
  for line in "${results[@]}"; do say "  $line"; done
  say ""
  say "image $image: $(inspect '{{.Size}}' | awk '{ printf "%d MB", $1 / 1000000 }')"
  say "verify-container: $passed passed, $failed failed"
}

main() {
  local start=$EPOCHREALTIME
  require_root
  if [ "$skip_egress" = 1 ]; then
    say "VERIFY_SKIP_EGRESS=1: THE EGRESS CHECKS ARE SKIPPED; THIS RUN PROVES LESS THAN THE ISSUE ASKS"
  fi
  work=$(mktemp -d "${TMPDIR:-/tmp}/mesh-verify.XXXXXX")
  phase "host tools" ensure_host_tools
  phase "base image" ensure_base
  phase "wheelhouse" wheelhouse_for_base
  phase "hadolint" lint_dockerfile
  phase "build" build
  phase "static checks" static_checks
  phase "runtime checks" runtime_checks
  phase "serve and health" serve_checks
  phase "egress (placeholder)" egress_checks
  timings+=("$(printf '%-28s %7.1f s' total "$(elapsed_s "$start")")")
  report
  reported=1

  if [ "$failed" -gt 0 ]; then
    exit 1
  fi
  if [ "$egress_missing" = 1 ] && [ "$skip_egress" != 1 ]; then
    say "verify-container: NOT A PASS: the egress checks are not built yet (VERIFY_SKIP_EGRESS=1 skips them)"
    exit 3
  fi
  if [ "$skip_egress" = 1 ]; then
    say "verify-container: passed WITHOUT THE EGRESS CHECKS (VERIFY_SKIP_EGRESS=1)"
  fi
}

main "$@"
