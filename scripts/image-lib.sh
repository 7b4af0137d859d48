# shellcheck shell=bash
# shellcheck disable=SC2154 # repo_root comes from lib.sh, sourced first
# Shared by the image scripts, after lib.sh: the host's tools, the offline
# wheelhouse, the Dockerfile's lint, the build, and the restrictions every run
# of the image gets. Sourced, not run.

runtime_lock="$repo_root/requirements/runtime.lock"
tools_lock="$repo_root/requirements/tools.lock"
dockerfile="$repo_root/docker/Dockerfile"
tools_venv="$repo_root/build/tools-venv"
# The Dockerfile copies build/wheelhouse, and .dockerignore lets only that part
# of build/ into the context.
wheelhouse="$repo_root/build/wheelhouse"
wheelhouse_requirements="$repo_root/build/wheelhouse-requirements.txt"
wheelhouse_log="$repo_root/build/wheelhouse.log"

# The node service's restrictions in docker/docker-compose.yml, as run flags
# (tests/test_image_files.py holds the two together). The ulimits sit below
# the hard limits a sandboxed host may impose, where the engine's defaults
# (nofile 1048576) stop the runtime from starting the container at all.
workspace_tmpfs=/tmp/claude-work:size=100m,uid=1000,gid=1000,mode=0700
hardening=(
  --read-only
  --tmpfs "$workspace_tmpfs"
  --user 1000:1000
  --cap-drop ALL
  --security-opt no-new-privileges
  --memory 512m
  --cpus 0.5
  --pids-limit 128
  --ulimit nofile=1024:1024
  --ulimit nproc=1024:1024
)

# Prints the hardening flags for ENGINE, one a line. podman 4 refuses tmpfs's
# uid= and gid= ("unknown mount option"); its U option mounts the same tmpfs,
# owned by the container's user.
hardening_flags() {
  local flag
  for flag in "${hardening[@]}"; do
    if [ "${1##*/}" = podman ] && [ "$flag" = "$workspace_tmpfs" ]; then
      flag=/tmp/claude-work:size=100m,mode=0700,U
    fi
    printf '%s\n' "$flag"
  done
}

# Installs the tools from their lock into their own venv, again only when the
# lock changed.
ensure_tools_venv() {
  local stamp="$tools_venv/.installed" digest python
  digest=$(sha256sum "$tools_lock" | cut -d' ' -f1)
  if [ -x "$tools_venv/bin/hadolint" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$digest" ]; then
    return 0
  fi
  python=$(find_python)
  say "setting up the image tools in $tools_venv ..."
  rm -rf "$tools_venv"
  "$python" -m venv "$tools_venv"
  if ! "$tools_venv/bin/python" -m pip install --quiet --require-hashes \
    --requirement "$tools_lock" >"$tools_venv/install.log" 2>&1; then
    cat "$tools_venv/install.log" >&2
    say "installing the image tools failed; the log is above"
    return 1
  fi
  echo "$digest" >"$stamp"
}

# Prints the OCI runtime podman should use, or nothing for its default.
# crun refuses a host whose cgroup v2 hierarchy has controllers while v1
# hierarchies hold the rest ("cgroups in hybrid mode not supported"); runc
# runs there. MESH_OCI_RUNTIME names one outright.
oci_runtime() {
  if [ -n "${MESH_OCI_RUNTIME:-}" ]; then
    echo "$MESH_OCI_RUNTIME"
  elif [ -d /sys/fs/cgroup/memory ] &&
    [ -n "$(cat /sys/fs/cgroup/unified/cgroup.controllers 2>/dev/null)" ]; then
    echo runc
  fi
}

# Prints the command that runs ENGINE (podman or docker, a name or a path),
# one word a line, with podman's global flags.
engine_argv() {
  local runtime
  echo "$1"
  [ "${1##*/}" = podman ] || return 0
  runtime=$(oci_runtime)
  [ -z "$runtime" ] || printf -- '--runtime\n%s\n' "$runtime"
}

# Runs ENGINE with the rest of the arguments.
engine_command() {
  local argv
  mapfile -t argv < <(engine_argv "$1")
  shift
  "${argv[@]}" "$@"
}

# Prints what the wheelhouse must match in BASE_IMAGE, on one line: its
# Python's full version, its glibc's version and its machine.
#
# Args: ENGINE, BASE_IMAGE.
base_python_facts() {
  engine_command "$1" run --rm --network none --ulimit nofile=1024:1024 \
    --ulimit nproc=1024:1024 --entrypoint python3 "$2" -c \
    'import platform; print(platform.python_version(), platform.libc_ver()[1], platform.machine())'
}

# Every manylinux tag a glibc of that version runs, as pip download's
# --platform flags, one a line: pip widens none of them by itself.
manylinux_platforms() {
  local glibc_minor=${1#2.} arch=$2 minor
  for minor in $(seq 5 "$glibc_minor"); do
    printf -- '--platform\nmanylinux_2_%s_%s\n' "$minor" "$arch"
  done
  printf -- '--platform\n%s\n' "manylinux1_$arch" "manylinux2010_$arch" \
    "manylinux2014_$arch"
}

# Fills the wheelhouse with every wheel the image installs, for the base
# image's interpreter: the locked dependencies that apply to it (downloaded
# again only when the lock or the target changes) and the project's own wheel
# (built every time).
#
# Args: PYTHON_FULL_VERSION (3.11.2), GLIBC_VERSION (2.36), ARCH (x86_64).
build_wheelhouse() {
  local python_version=$1 glibc=$2 arch=$3 key platforms abi
  local stamp="$wheelhouse/.locked-wheels"
  key=$(printf '%s\n' "$python_version" "$glibc" "$arch" \
    "$(sha256sum <"$runtime_lock")" | sha256sum | cut -c1-16)
  if [ "$(cat "$stamp" 2>/dev/null)" != "$key" ]; then
    say "downloading the locked wheels for CPython $python_version, glibc $glibc, $arch ..."
    rm -rf "$wheelhouse"
    mkdir -p "$wheelhouse"
    # pip download would judge the lock's markers by the Python running it.
    "$tools_venv/bin/python" "$repo_root/scripts/lock_for_target.py" \
      "$runtime_lock" "$python_version" "$arch" >"$wheelhouse_requirements"
    mapfile -t platforms < <(manylinux_platforms "$glibc" "$arch")
    abi=$(echo "$python_version" | awk -F. '{ print "cp" $1 $2 }')
    # --no-deps: the lock is complete, and `pip check` in the build proves it.
    if ! "$tools_venv/bin/python" -m pip download --dest "$wheelhouse" \
      --require-hashes --no-deps --only-binary=:all: --implementation cp \
      --python-version "$python_version" --abi "$abi" "${platforms[@]}" \
      --requirement "$wheelhouse_requirements" >"$wheelhouse_log" 2>&1; then
      cat "$wheelhouse_log" >&2
      say "downloading the locked wheels failed; the log is above"
      return 1
    fi
    echo "$key" >"$stamp"
  fi
  build_project_wheel
}

# The last commit's time, which every build artefact carries instead of the
# time it was built (https://reproducible-builds.org/specs/source-date-epoch/).
source_date_epoch() {
  git -C "$repo_root" log -1 --format=%ct 2>/dev/null || echo 315532800
}

# Builds the project's wheel from a clean copy of its sources (setuptools'
# build/ directory would carry deleted modules into it), dated by the last
# commit so that the same sources give the same bytes, and writes its pin and
# hash to project.lock beside it.
build_project_wheel() {
  local src wheels name version epoch
  src=$(mktemp -d "${TMPDIR:-/tmp}/mesh-wheel.XXXXXX")
  tar -C "$repo_root" --exclude=__pycache__ -cf - pyproject.toml README.md mesh_node |
    tar -C "$src" -xf -
  rm -f "$wheelhouse"/mesh_node-*.whl
  epoch=$(source_date_epoch)
  if ! SOURCE_DATE_EPOCH=$epoch "$tools_venv/bin/python" -m pip wheel --quiet \
    --no-deps --no-build-isolation --wheel-dir "$wheelhouse" "$src" \
    >"$wheelhouse_log" 2>&1; then
    cat "$wheelhouse_log" >&2
    rm -rf "$src"
    say "building the project's wheel failed; the log is above"
    return 1
  fi
  rm -rf "$src"
  wheels=("$wheelhouse"/mesh_node-*.whl)
  name=${wheels[0]##*/}
  version=${name#mesh_node-}
  version=${version%%-*}
  printf 'mesh-node==%s \\\n    --hash=sha256:%s\n' "$version" \
    "$(sha256sum "${wheels[0]}" | cut -d' ' -f1)" >"$wheelhouse/project.lock"
}

# hadolint with no rule ignored, on the node's Dockerfile and the compose
# stack's egress proxy: any finding fails.
lint_dockerfile() {
  local findings
  findings=$("$tools_venv/bin/hadolint" --no-color "$dockerfile" \
    "$repo_root/docker/egress.Dockerfile" 2>&1) || true
  if [ -n "$findings" ]; then
    printf '%s\n' "$findings" >&2
    say "hadolint: the Dockerfiles have findings (above)"
    return 1
  fi
  say "hadolint: no findings in docker/Dockerfile and docker/egress.Dockerfile"
}

# Builds the image with no network, so that anything the Dockerfile tried to
# fetch fails the build rather than going unnoticed.
#
# Args: ENGINE, TAG, BASE_IMAGE.
build_image() {
  local engine=$1 tag=$2 base=$3 format=()
  # The OCI format has no HEALTHCHECK; the Docker format keeps it. Without
  # intermediate images, rebuilds leave nothing behind but the tagged image.
  # --timestamp makes the layers of two builds of the same sources the same.
  [ "${engine##*/}" != podman ] ||
    format=(--format docker --layers=false --timestamp "$(source_date_epoch)")
  engine_command "$engine" build "${format[@]}" --network none \
    --build-arg "BASE_IMAGE=$base" --tag "$tag" --file "$dockerfile" "$repo_root"
}

# The egress proxy's policy, filled in by render_squid_conf.
squid_template="$repo_root/config/squid.conf.template"

# Prints the hosts of allowedApis in a security-config.json, one a line: the
# node's default (api.anthropic.com) when the file names none. Each must be a
# plain DNS name, since it becomes a word of the proxy's configuration.
#
# Args: CONFIG.
allowed_apis() {
  "$venv/bin/python" - "$1" <<'PYTHON'
import json
import re
import sys

path = sys.argv[1]
with open(path, encoding="utf-8") as config:
    hosts = json.load(config).get("allowedApis", ["api.anthropic.com"])
label = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
name = re.compile(rf"{label}(?:\.{label})+")
if not isinstance(hosts, list) or not hosts:
    sys.exit(f"{path}: allowedApis names no host: the proxy would allow nothing")
for host in hosts:
    if not isinstance(host, str) or not name.fullmatch(host):
        sys.exit(f"{path}: allowedApis: {host!r} is not a host name")
print("\n".join(dict.fromkeys(host.lower() for host in hosts)))
PYTHON
}

# Prints config/squid.conf.template with its placeholders filled in (on the
# lines that are not comments); the template says what each one means.
#
# Args: LISTEN STATE_DIR HOSTS_FILE NAMESERVERS DEBUG_OPTIONS HOST...
render_squid_conf() {
  local listen=$1 state_dir=$2 hosts_file=$3 nameservers=$4 debug=$5 value
  shift 5
  [ $# -gt 0 ] || {
    say "render_squid_conf: no allowed host"
    return 1
  }
  # sed's replacement would read these characters as its own.
  for value in "$listen" "$state_dir" "$hosts_file" "$nameservers" "$debug" "$@"; do
    case $value in
      '' | *[\|\&\\@]* | *$'\n'*)
        say "render_squid_conf: refusing the value '$value'"
        return 1
        ;;
    esac
  done
  local rendered
  rendered=$(sed -e "/^[[:space:]]*#/!{
s|@LISTEN@|$listen|g
s|@ALLOWED@|$*|g
s|@STATE_DIR@|$state_dir|g
s|@HOSTS_FILE@|$hosts_file|g
s|@NAMESERVERS@|$nameservers|g
s|@DEBUG@|$debug|g
}" "$squid_template")
  if grep -v '^[[:space:]]*#' <<<"$rendered" | grep -q '@[A-Z_]*@'; then
    say "render_squid_conf: $squid_template has a placeholder this script does not fill"
    return 1
  fi
  printf '%s\n' "$rendered"
}
