# shellcheck shell=bash
# Shared set-up for the scripts: a virtualenv with the project and its
# development tools, and a redis-server binary. Sourced, not run.

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv="$repo_root/.venv"

say() { printf '%s\n' "$*" >&2; }

find_python() {
  for candidate in python3.13 python3.12 python3.11 python3; do
    if command -v "$candidate" >/dev/null 2>&1 &&
      "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
        command -v "$candidate"
        return 0
    fi
  done
  say "mesh-node needs Python 3.11 or newer; none was found on PATH."
  return 1
}

# Installs the project into .venv, again only when pyproject.toml changed.
ensure_venv() {
  local stamp="$venv/.installed" digest
  digest=$(sha256sum "$repo_root/pyproject.toml" | cut -d' ' -f1)
  if [ -x "$venv/bin/python" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$digest" ]; then
    return 0
  fi
  local python
  python=$(find_python)
  say "setting up $venv ..."
  [ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
  if ! "$venv/bin/python" -m pip install --quiet -e "${repo_root}[dev]" \
    >"$venv/install.log" 2>&1; then
    cat "$venv/install.log" >&2
    say "installing the project into $venv failed; the log is above"
    return 1
  fi
  echo "$digest" >"$stamp"
}

# Installs a command from the distribution when it is missing:
# ensure_command COMMAND [APT_PACKAGE [APK_PACKAGE [DNF_PACKAGE [BREW_FORMULA]]]]
ensure_command() {
  local command=$1 apt=${2:-$1} apk=${3:-${2:-$1}} dnf=${4:-${2:-$1}} brew=${5:-${2:-$1}}
  command -v "$command" >/dev/null 2>&1 && return 0
  say "$command is missing; installing it ..."
  local sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  if command -v apt-get >/dev/null 2>&1; then
    $sudo apt-get update -qq && $sudo apt-get install -y -qq "$apt" >/dev/null
  elif command -v apk >/dev/null 2>&1; then
    $sudo apk add --quiet "$apk"
  elif command -v dnf >/dev/null 2>&1; then
    $sudo dnf install -y -q "$dnf"
  elif command -v brew >/dev/null 2>&1; then
    brew install "$brew"
  fi
  command -v "$command" >/dev/null 2>&1 || {
    say "could not install $command; install it and run this again"
    return 1
  }
}

ensure_redis_server() {
  ensure_command redis-server redis-server redis redis redis
}

# Prints a TCP port on 127.0.0.1 that is free right now.
free_port() {
  "$venv/bin/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# The bench extra (the peer, psutil, matplotlib) is no part of the node, so
# ensure_venv leaves it out; the benchmarks add it once.
ensure_bench_extra() {
  if ! "$venv/bin/python" -c 'import taskiq_redis, psutil, matplotlib' 2>/dev/null; then
    say "installing the bench extra into $venv ..."
    if ! "$venv/bin/python" -m pip install --quiet -e "${repo_root}[dev,bench]" \
      >"$venv/install-bench.log" 2>&1; then
      cat "$venv/install-bench.log" >&2
      say "installing the bench extra failed; the log is above"
      exit 1
    fi
  fi
}
