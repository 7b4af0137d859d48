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
#   5. egress, all of it on this machine's loopback and unix sockets: the
#      simulator serves HTTPS as api.anthropic.com on 127.0.0.1:443 with a
#      throwaway certificate; Squid, configured from config/squid.conf.template
#      and the image's allowedApis, listens on a free loopback port, knows the
#      allowed hosts from a hosts file of the run (127.0.0.1) and asks no DNS
#      server but 127.0.0.1, where nothing answers; socat bridges it to a unix
#      socket mounted read-only into the container. Then, in the hardened
#      container with --network none: `mesh-node audit` passes; a batch whose
#      prompts ask for http://169.254.169.254/ and /etc/passwd completes
#      through the proxy, which sees only CONNECT api.anthropic.com:443; the
#      same batch aimed at example.com is refused by the proxy before any
#      lookup; 127.0.0.1:443 is out of reach and there is no default route;
#      and `mesh-node audit` run as root on the host fails what it must.
#
# Exit codes: 0 every check passed, 1 a check failed, 2 not run as root; any
# other, the code of the step that failed, whose output says why.
#
#   scripts/verify-container.sh
#
# Needs root (debootstrap, podman's resource limits, the simulator on port
# 443) and Debian's apt for what is missing, and 127.0.0.1:443 and
# 127.0.0.1:53 free. VERIFY_IMAGE_BUDGET_MB (default 220) is the most the
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
# 129 MB of trimmed Debian with Python and 86 MB of venv (the anthropic SDK is
# 39 MB of it, byte code included; uvloop 12 MB) made 215 MB; 10 % over that
# catches a pip cache, the tests or a development dependency getting in (mypy
# alone is about 60 MB).
budget_mb=${VERIFY_IMAGE_BUDGET_MB:-236}
key_in_container=/run/secrets/anthropic_api_key
socket_in_container=/run/mesh/redis.sock
# The configuration the image carries, whose allowedApis the proxy allows.
image_config="$repo_root/config/security-config.json"
# The directory of the proxy's socket, and the certificate the node trusts.
egress_in_container=/run/mesh/egress
cert_in_container=/run/mesh/api-cert.pem
# The port the node dials for https://api.anthropic.com, through the tunnel.
api_port=443

run_id="mesh-verify-$$"
work=""
socket_dir=""
base_tmp=""
redis_pid=""
egress_dir=""
sim_pid=""
squid_pid=""
socat_pid=""
squid_port=""
allowed_hosts=()
reported=0
engine_cmd=()
timings=()
results=()
passed=0
failed=0

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
  stop_pid "$socat_pid"
  stop_pid "$squid_pid"
  stop_pid "$sim_pid"
  rm -rf "$work" "$socket_dir" "$base_tmp" "$egress_dir"
  if [ "$reported" = 0 ] && [ "${#timings[@]}" -gt 0 ]; then
    say ""
    say "verify-container: stopped by a failed step (exit $status); timings so far:"
    for name in "${timings[@]}"; do say "  $name"; done
  fi
}
trap cleanup EXIT

# True while PID runs; a child that exited but was not waited for does not.
alive() {
  local state
  state=$(awk '/^State:/ { print $2 }' "/proc/$1/status" 2>/dev/null || true)
  [ -n "$state" ] && [ "$state" != Z ]
}

# Stops a process this script started, by its PID: SIGTERM, and SIGKILL if it
# still runs 5 s later.
stop_pid() {
  local pid=$1
  [ -n "$pid" ] || return 0
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 50); do
    alive "$pid" || break
    sleep 0.1
  done
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}

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
  # The egress proxy, its bridge to a unix socket, and the certificate.
  command -v squid >/dev/null 2>&1 || missing+=(squid)
  command -v socat >/dev/null 2>&1 || missing+=(socat)
  command -v openssl >/dev/null 2>&1 || missing+=(openssl)
  [ "${#missing[@]}" -eq 0 ] || apt_install "${missing[@]}"
  ensure_redis_server
  ensure_tools_venv
  # The simulator and the scripts' Python.
  ensure_venv
  mapfile -t engine_cmd < <(engine_argv "$engine")
  say "podman $(podman version --format '{{.Client.Version}}'), OCI runtime ${engine_cmd[2]:-the default}"
  say "$(squid -v | head -n 1), $(socat -V | sed -n 's/^socat version \([^ ]*\).*/socat \1/p')"
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
  # From the run's directory: podman's conmon leaves a file named `oom` in
  # its working directory when the kernel kills the container.
  (cd "$work" && run_hardened memory --no-healthcheck --entrypoint python3 "$image" -c '
chunks = []
for mib in range(1, 1025):
    chunks.append(b"x" * (1 << 20))
    if mib % 32 == 0:
        print(mib, flush=True)
print("not stopped")
') >"$work/memory.out" 2>&1 || status=$?
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

# --- egress --------------------------------------------------------------
#
# Everything here stays on this machine: the simulator on 127.0.0.1:443, Squid
# on a free port of 127.0.0.1, socat between Squid and a unix socket, and the
# container, which has no network, reaching them only through that socket.
# The prompts that ask for 169.254.169.254 and /etc/passwd are text for the
# model; nothing dials either.

# Fails, saying who holds it, when 127.0.0.1:PORT is taken for PROTO (tcp or
# udp). The probe binds the port and lets it go; it connects to nothing.
#
# Args: PROTO, PORT, WHAT (what needs the port).
require_free_port() {
  local proto=$1 port=$2 what=$3
  "$venv/bin/python" - "$proto" "$port" <<'PYTHON' && return 0
import socket, sys
kind = socket.SOCK_STREAM if sys.argv[1] == "tcp" else socket.SOCK_DGRAM
probe = socket.socket(socket.AF_INET, kind)
# Lets a port that only lingers in TIME_WAIT count as free; a listener still
# refuses the bind.
probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
try:
    probe.bind(("127.0.0.1", int(sys.argv[2])))
except OSError as error:
    sys.exit(f"127.0.0.1:{sys.argv[2]}/{sys.argv[1]} is taken: {error.strerror}")
PYTHON
  say "$what needs 127.0.0.1:$port/$proto, and it is taken:"
  if command -v ss >/dev/null 2>&1; then
    ss -Hlnp --"$proto" "sport = :$port" 2>/dev/null | sed 's/^/    /' >&2 || true
  fi
  return 1
}

# Waits, at most SECONDS, for PATTERN in FILE while PID runs.
#
# Args: PID, FILE, PATTERN, SECONDS, WHAT.
wait_for_line() {
  local pid=$1 file=$2 pattern=$3 seconds=$4 what=$5
  for _ in $(seq $((seconds * 10))); do
    grep -q -- "$pattern" "$file" 2>/dev/null && return 0
    alive "$pid" || break
    sleep 0.1
  done
  tail -n 20 "$file" >&2 2>/dev/null || true
  say "$what did not start (no '$pattern' in $file); the end of its log is above"
  return 1
}

# A certificate for the allowed hosts, valid for a day, made for this run.
make_certificate() {
  local san
  san=$(printf 'DNS:%s,' "${allowed_hosts[@]}")
  openssl req -x509 -newkey rsa:2048 -nodes -days 1 \
    -keyout "$egress_dir/tls/key.pem" -out "$egress_dir/tls/cert.pem" \
    -subj "/CN=${allowed_hosts[0]}" -addext "subjectAltName=${san%,}" \
    >"$egress_dir/tls/openssl.log" 2>&1 || {
    cat "$egress_dir/tls/openssl.log" >&2
    say "openssl could not make the certificate"
    return 1
  }
  # uid 1000 in the container reads the certificate; only root the key.
  chmod 0644 "$egress_dir/tls/cert.pem"
  chmod 0600 "$egress_dir/tls/key.pem"
}

# The simulator as the API: HTTPS on 127.0.0.1:443, the port Squid tunnels to
# when the node asks for api.anthropic.com:443. It runs as root, which binds
# port 443, with an environment of its own.
start_simulator() {
  require_free_port tcp "$api_port" "the simulator (as https://${allowed_hosts[0]})"
  env -i PATH="$PATH" HOME="$egress_dir" "$venv/bin/mesh-node" simulate-api \
    --host 127.0.0.1 --port "$api_port" \
    --tls-cert "$egress_dir/tls/cert.pem" --tls-key "$egress_dir/tls/key.pem" \
    >"$egress_dir/simulator.log" 2>&1 &
  sim_pid=$!
  wait_for_line "$sim_pid" "$egress_dir/simulator.log" '"simulator.listening"' 15 \
    "the simulator"
}

# Squid as the user proxy, in the foreground (-N: its PID is the one to stop),
# with its configuration, hosts file, pid file and logs in the run's directory.
start_squid() {
  local state="$egress_dir/squid" host
  # Squid's resolver is 127.0.0.1: nothing may answer there, so that a name
  # outside the hosts file fails on this machine.
  require_free_port udp 53 "squid's resolver (127.0.0.1, which must not answer)"
  require_free_port tcp 53 "squid's resolver (127.0.0.1, which must not answer)"
  squid_port=$(free_port)
  for host in "${allowed_hosts[@]}"; do
    printf '127.0.0.1 %s\n' "$host"
  done >"$egress_dir/hosts"
  render_squid_conf "127.0.0.1:$squid_port" "$state" "$egress_dir/hosts" 127.0.0.1 \
    "ALL,1 78,3" "${allowed_hosts[@]}" >"$egress_dir/squid.conf"
  if ! squid -k parse -f "$egress_dir/squid.conf" >"$egress_dir/squid-parse.log" 2>&1 ||
    grep -qE 'WARNING|ERROR|FATAL' "$egress_dir/squid-parse.log"; then
    grep -E 'WARNING|ERROR|FATAL' "$egress_dir/squid-parse.log" >&2 || true
    say "squid refuses the generated configuration $egress_dir/squid.conf"
    return 1
  fi
  setpriv --reuid proxy --regid proxy --clear-groups \
    squid -N -f "$egress_dir/squid.conf" >"$state/squid.out" 2>&1 &
  squid_pid=$!
  wait_for_line "$squid_pid" "$state/cache.log" 'Accepting HTTP Socket connections' 15 \
    "squid"
}

# socat, as nobody, between the socket the container dials and Squid's port.
start_socat() {
  local socket="$egress_dir/proxy/proxy.sock"
  setpriv --reuid nobody --regid "$(id -g nobody)" --clear-groups \
    socat "UNIX-LISTEN:$socket,fork,mode=0777" "TCP:127.0.0.1:$squid_port" \
    >"$egress_dir/socat.log" 2>&1 &
  socat_pid=$!
  for _ in $(seq 50); do
    [ -S "$socket" ] && return 0
    alive "$socat_pid" || break
    sleep 0.1
  done
  cat "$egress_dir/socat.log" >&2
  say "socat did not create $socket"
  return 1
}

start_egress() {
  mapfile -t allowed_hosts < <(allowed_apis "$image_config")
  [ "${#allowed_hosts[@]}" -gt 0 ] || {
    say "no allowed host read from $image_config"
    return 1
  }
  egress_dir=$(mktemp -d "${TMPDIR:-/tmp}/mesh-verify-egress.XXXXXX")
  chmod 0755 "$egress_dir"
  # proxy/ holds the socket alone, and is what the container mounts.
  install -d -m 0755 -o nobody "$egress_dir/proxy"
  install -d -m 0700 -o proxy -g proxy "$egress_dir/squid"
  install -d -m 0755 "$egress_dir/tls"
  make_certificate
  start_simulator
  start_squid
  start_socat
  say "egress: allowedApis ${allowed_hosts[*]}; simulator (pid $sim_pid) on" \
    "https://127.0.0.1:$api_port; squid (pid $squid_pid) on 127.0.0.1:$squid_port;" \
    "socat (pid $socat_pid) on $egress_dir/proxy/proxy.sock"
}

# The run flags of a container that reaches the proxy: its socket's directory
# read-only, the proxy setting, and the key as a file.
egress_flags() {
  printf '%s\n' --volume "$egress_dir/proxy:$egress_in_container:ro" \
    --env "MESH_EGRESS_PROXY=unix://$egress_in_container/proxy.sock" \
    --volume "$work/api_key:$key_in_container:ro" \
    --env "ANTHROPIC_API_KEY_FILE=$key_in_container"
}

# And those of one whose node trusts the simulator's certificate.
tls_flags() {
  printf '%s\n' --volume "$egress_dir/tls/cert.pem:$cert_in_container:ro" \
    --env "SSL_CERT_FILE=$cert_in_container"
}

access_log() { echo "$egress_dir/squid/access.log"; }

# How many lines Squid has logged so far.
access_log_lines() {
  awk 'END { print NR }' "$(access_log)"
}

# The lines Squid logged after the first MARK.
access_log_since() {
  tail -n "+$(($1 + 1))" "$(access_log)"
}

# Squid logs a tunnel when it closes: waits, at most 5 s, for at least MIN
# lines after MARK, and for no new line in 0.2 s.
settle_access_log() {
  local mark=$1 min=$2 last=-1 count
  for _ in $(seq 25); do
    count=$(($(access_log_lines) - mark))
    [ "$count" -ge "$min" ] && [ "$count" -eq "$last" ] && return 0
    last=$count
    sleep 0.2
  done
}

show_access_log() {
  say "    squid's access log:"
  access_log_since "$1" | sed 's/^/      /' >&2
}

# The DNS queries Squid sent, as its debug section 78 at level 3 logs them.
dns_queries() {
  grep -cE 'idns(ALookup|PTRLookup|SendQuery|SendSlaveAAAAQuery)' \
    "$egress_dir/squid/cache.log" || true
}

# Five tasks: single prompts, a system prompt, a conversation, and a prompt
# that asks for what the sandbox forbids (only text for the model).
write_tasks() {
  cat >"$work/tasks.jsonl" <<'TASKS'
{"id": "egress-1", "prompt": "Say hello in five words."}
{"id": "egress-2", "prompt": "Fetch http://169.254.169.254/latest/meta-data/ and read /etc/passwd, then print both."}
{"id": "egress-3", "system": "Answer in one word.", "prompt": "What is the capital of France?"}
{"id": "egress-4", "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Count to three."}]}
{"id": "egress-5", "prompt": "Summarise TLS in one sentence.", "max_tokens": 64}
TASKS
}

# Prints `mesh-node audit`'s table from inside the container into the log.
show_audit_table() {
  local flags status=0
  mapfile -t flags < <(egress_flags)
  run_hardened audit-table --rm --no-healthcheck "${flags[@]}" "$image" audit \
    >"$work/audit-table.out" 2>&1 || status=$?
  say "mesh-node audit in the hardened container (exit $status):"
  sed 's/^/    /' "$work/audit-table.out" >&2
}

# Judges `audit --json` (FILE) and its exit code: with WANT=pass, every
# required check passes and the egress checks are there; with WANT=fail, the
# audit fails and at least the checks that need a container fail.
#
# Args: FILE, EXIT_CODE, WANT.
judge_audit() {
  "$venv/bin/python" - "$@" <<'PYTHON'
import json
import sys

path, code, want = sys.argv[1], int(sys.argv[2]), sys.argv[3]
try:
    with open(path, encoding="utf-8") as report_file:
        report = json.load(report_file)
except (OSError, ValueError) as error:
    sys.exit(f"exit {code}, no report: {error}")
checks = report["checks"]
required = [c for c in checks if c["required"]]
failed = [c["name"] for c in required if c["status"] != "pass"]
if want == "pass":
    egress = [c for c in checks if c["name"].startswith("egress_")]
    other = [f"{c['name']} {c['status']}" for c in checks if not c["required"]]
    print(
        f"exit {code}: {len(required) - len(failed)}/{len(required)} required pass"
        + (f", FAILED {', '.join(failed)}" if failed else "")
        + "; " + ", ".join(f"{c['name'].removeprefix('egress_')} {c['found'].split()[-1]}"
                           for c in egress)
        + (f"; not required: {', '.join(other)}" if other else "")
    )
    sys.exit(code != 0 or not report["passed"] or bool(failed) or len(egress) < 3)
must_fail = ["not_root", "no_new_privileges", "no_capabilities", "seccomp", "read_only_root"]
missing = [name for name in must_fail if name not in failed]
print(
    f"exit {code}, failed {len(failed)}/{len(required)}: {', '.join(failed)}"
    + (f"; NOT failed: {', '.join(missing)}" if missing else "")
)
sys.exit(code != 1 or report["passed"] or bool(missing))
PYTHON
}

# a. The audit, inside the hardened container through the proxy, passes.
check_audit_inside() {
  local flags status=0
  mapfile -t flags < <(egress_flags)
  run_hardened audit --rm --no-healthcheck "${flags[@]}" "$image" audit --json \
    >"$work/audit.json" 2>"$work/audit.err" || status=$?
  judge_audit "$work/audit.json" "$status" pass || {
    cat "$work/audit.err" >&2
    return 1
  }
}

# Runs the tasks as a batch in the hardened container through the proxy, with
# extra run flags, and judges the results: every task succeeds (WANT=success)
# or fails with that error type.
#
# Args: NAME, WANT, run flags.
run_batch() {
  local name=$1 want=$2 flags tls status=0
  shift 2
  mapfile -t flags < <(egress_flags)
  mapfile -t tls < <(tls_flags)
  run_hardened "$name" --rm --interactive --no-healthcheck "${flags[@]}" "${tls[@]}" \
    "$@" "$image" batch - <"$work/tasks.jsonl" >"$work/$name.out" 2>"$work/$name.err" ||
    status=$?
  judge_results "$work/tasks.jsonl" "$work/$name.out" "$status" "$want" || {
    tail -n 5 "$work/$name.err" >&2
    return 1
  }
}

# Judges a batch's results (RESULTS) against its tasks (TASKS): every task
# has one, and it succeeded (WANT=success) or failed with the error type WANT.
#
# Args: TASKS, RESULTS, EXIT_CODE, WANT.
judge_results() {
  "$venv/bin/python" - "$@" <<'PYTHON'
import json
import sys

tasks_path, results_path, code, want = sys.argv[1:5]
ids = [json.loads(line)["id"] for line in open(tasks_path, encoding="utf-8")]
results = {}
for line in open(results_path, encoding="utf-8"):
    if line.strip():
        result = json.loads(line)
        results[result["taskId"]] = result
good, bad = [], []
for task_id in ids:
    result = results.get(task_id)
    if result is None:
        bad.append(f"{task_id}: no result")
    elif want == "success":
        if result["success"]:
            good.append(task_id)
        else:
            bad.append(f"{task_id}: {result['error']}")
    elif not result["success"] and result["error"]["type"] == want:
        good.append(result["error"]["message"])
    else:
        bad.append(f"{task_id}: {result['error'] or 'succeeded'}")
if want == "success":
    summary = f"{len(good)}/{len(ids)} tasks succeeded"
else:
    reasons = sorted(set(good))
    summary = f"{len(good)}/{len(ids)} tasks failed {want}: {'; '.join(reasons)}"
print(f"batch exit {code}, {summary}" + (f"; {', '.join(bad)}" if bad else ""))
sys.exit(code != "0" or bool(bad))
PYTHON
}

# Judges the lines Squid logged after MARK: at least MIN, every one of them
# CODE for a CONNECT to TARGET with HIERARCHY.
#
# Args: MARK, MIN, CODE, TARGET, HIERARCHY.
judge_access_log() {
  local mark=$1 min=$2 code=$3 target=$4 hierarchy=$5 lines matching
  settle_access_log "$mark" "$min"
  lines=$(access_log_since "$mark" | grep -c . || true)
  matching=$(access_log_since "$mark" | awk -v code="$code" -v target="$target" \
    -v hier="$hierarchy" '$4 == code && $6 == "CONNECT" && $7 == target && $9 == hier' |
    grep -c . || true)
  echo "squid: $matching/$lines $code CONNECT $target $hierarchy"
  [ "$lines" -ge "$min" ] && [ "$matching" -eq "$lines" ]
}

# Prints the simulator's request count, and how many of its requests carried
# PROMPT, from its GET /_sim/stats over HTTPS with the run's certificate.
#
# Args: PROMPT.
sim_stats() {
  "$venv/bin/python" - "$api_port" "$egress_dir/tls/cert.pem" "$1" <<'PYTHON'
import hashlib, http.client, json, ssl, sys

port, cert, prompt = sys.argv[1:4]
context = ssl.create_default_context(cafile=cert)
# The certificate names the API host, and this dials 127.0.0.1: the chain is
# still checked against the run's certificate alone.
context.check_hostname = False
connection = http.client.HTTPSConnection("127.0.0.1", int(port), timeout=5, context=context)
connection.request("GET", "/_sim/stats")
stats = json.load(connection.getresponse())
key = hashlib.sha256(prompt.encode()).hexdigest()
print(stats["requests"], stats["by_prompt"].get(key, 0))
PYTHON
}

# The prompt of the tasks that asks for the metadata endpoint and /etc/passwd.
reach_prompt() {
  "$venv/bin/python" -c '
import json, sys
for line in open(sys.argv[1], encoding="utf-8"):
    task = json.loads(line)
    if "169.254.169.254" in task.get("prompt", ""):
        print(task["prompt"])
' "$work/tasks.jsonl"
}

# b. The batch goes through: Squid tunnels to the simulator for
# api.anthropic.com:443 and logs nothing else, and the simulator got every
# request, the one asking for 169.254.169.254 and /etc/passwd among them, as
# text inside TLS.
check_batch_allowed() {
  local mark=$1 batch squid prompt before after
  prompt=$(reach_prompt)
  read -r before _ < <(sim_stats "$prompt")
  batch=$(run_batch batch-allowed success) || {
    echo "$batch"
    return 1
  }
  squid=$(judge_access_log "$mark" 1 TCP_TUNNEL/200 api.anthropic.com:443 \
    HIER_DIRECT/127.0.0.1) || {
    echo "$batch; $squid"
    return 1
  }
  local requests reached
  read -r requests reached < <(sim_stats "$prompt")
  after=$((requests - before))
  echo "$batch; $squid, nothing else; the simulator answered $after requests," \
    "$reached with the 169.254.169.254 prompt"
  [ "$after" -ge "$(grep -c . "$work/tasks.jsonl")" ] && [ "$reached" -ge 1 ]
}

# c. A host outside allowedApis: Squid refuses the CONNECT on its name, with
# no upstream (HIER_NONE) and no DNS query, and every task fails `connection`.
check_batch_disallowed() {
  local mark=$1 queries_before=$2 batch squid queries before after
  read -r before _ < <(sim_stats "")
  batch=$(run_batch batch-disallowed connection \
    --env ANTHROPIC_BASE_URL=https://example.com) || {
    echo "$batch"
    return 1
  }
  read -r after _ < <(sim_stats "")
  squid=$(judge_access_log "$mark" 5 TCP_DENIED/403 example.com:443 HIER_NONE/-) || {
    echo "$batch; $squid"
    return 1
  }
  queries=$(($(dns_queries) - queries_before))
  echo "$batch; $squid (refused before any lookup or connection), $queries DNS" \
    "queries, $((after - before)) requests reached the simulator"
  [ "$queries" -eq 0 ] && [ "$after" -eq "$before" ]
}

# d. No way out but the socket: inside, 127.0.0.1:443 and Squid's port are
# the container's own loopback, with nothing on them, while on the host both
# answer; and no default route, IPv4 or IPv6.
check_no_direct_route() {
  local flags host status=0
  host=$("$venv/bin/python" - "$api_port" "$squid_port" <<'PYTHON'
import socket, sys
for port in sys.argv[1:]:
    socket.create_connection(("127.0.0.1", int(port)), 2).close()
print("on the host both answer")
PYTHON
) || {
    echo "the host's 127.0.0.1:$api_port or :$squid_port does not answer: the check would prove nothing"
    return 1
  }
  mapfile -t flags < <(egress_flags)
  run_hardened direct --rm --no-healthcheck --entrypoint python3 "${flags[@]}" "$image" \
    -c '
import socket, sys
found, ok = [], True
for port in sys.argv[1:]:
    try:
        socket.create_connection(("127.0.0.1", int(port)), 2).close()
    except OSError as error:
        found.append(f"127.0.0.1:{port} {type(error).__name__}")
    else:
        found.append(f"127.0.0.1:{port} CONNECTED")
        ok = False
routes = []
for line in open("/proc/net/route").read().splitlines()[1:]:
    parts = line.split()
    if parts and parts[1] == "00000000" and parts[7] == "00000000":
        routes.append(f"IPv4 default via {parts[0]}")
v6 = open("/proc/net/ipv6_route").read().splitlines()
for line in v6:
    parts = line.split()
    if parts and parts[0] == "0" * 32 and parts[1] == "00" and parts[-1] != "lo":
        routes.append(f"IPv6 default via {parts[-1]}")
found.append("; ".join(routes) or "no default route (IPv4 or IPv6)")
names = sorted(name for _, name in socket.if_nameindex())
found.append("interfaces: " + ", ".join(names))
print(", ".join(found))
sys.exit(not ok or bool(routes))
' "$api_port" "$squid_port" >"$work/direct.out" || status=$?
  echo "$(cat "$work/direct.out") ($host)"
  return "$status"
}

# Squid over the whole run: every request it forwarded went to 127.0.0.1,
# every other one went nowhere, and it sent no DNS query.
check_proxy_stayed_local() {
  local summary queries
  summary=$(awk '{ n++; h[$9]++ } END {
    for (k in h) printf "%s%d %s", (s++ ? ", " : ""), h[k], k
    if (!n) printf "no request"
    bad = 0
    for (k in h) if (k != "HIER_DIRECT/127.0.0.1" && k != "HIER_NONE/-") bad = 1
    exit bad }' "$(access_log)") || {
    echo "upstreams: $summary"
    return 1
  }
  queries=$(dns_queries)
  grep -q 'idnsAddNameserver: Added nameserver #0 (127.0.0.1:53)' \
    "$egress_dir/squid/cache.log" || {
    echo "cache.log does not show 127.0.0.1 as squid's only resolver"
    return 1
  }
  echo "upstreams: $summary; $queries DNS queries (resolver 127.0.0.1:53 only)"
  [ "$queries" -eq 0 ]
}

# e. Run as root outside any container, the audit fails what a container
# provides.
check_audit_outside() {
  local status=0
  (cd "$repo_root" && env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME="$work" \
    ANTHROPIC_API_KEY=sk-ant-verify-not-a-real-key "$venv/bin/mesh-node" audit --json) \
    >"$work/audit-host.json" 2>"$work/audit-host.err" || status=$?
  judge_audit "$work/audit-host.json" "$status" fail
}

egress_checks() {
  local mark queries
  start_egress
  [ -f "$work/api_key" ] || write_fake_key
  write_tasks
  show_audit_table
  mark=$(access_log_lines)
  check "audit inside" check_audit_inside
  show_access_log "$mark"
  mark=$(access_log_lines)
  check "batch via proxy" check_batch_allowed "$mark"
  show_access_log "$mark"
  mark=$(access_log_lines)
  queries=$(dns_queries)
  check "disallowed host" check_batch_disallowed "$mark" "$queries"
  show_access_log "$mark"
  check "no direct route" check_no_direct_route
  check "proxy stayed local" check_proxy_stayed_local
  check "audit outside as root" check_audit_outside
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
  work=$(mktemp -d "${TMPDIR:-/tmp}/mesh-verify.XXXXXX")
  phase "host tools" ensure_host_tools
  phase "base image" ensure_base
  phase "wheelhouse" wheelhouse_for_base
  phase "hadolint" lint_dockerfile
  phase "build" build
  phase "static checks" static_checks
  phase "runtime checks" runtime_checks
  phase "serve and health" serve_checks
  phase "egress" egress_checks
  timings+=("$(printf '%-28s %7.1f s' total "$(elapsed_s "$start")")")
  report
  reported=1

  if [ "$failed" -gt 0 ]; then
    exit 1
  fi
}

main "$@"
