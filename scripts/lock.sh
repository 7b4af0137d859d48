#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Refreshes the lock files with hashes, the only step of the image's life that
# resolves versions:
#   requirements/runtime.lock  what the image installs: pyproject.toml's
#                              [project.dependencies], every file hashed
#   requirements/tools.lock    the host's tools that lock, build and check the
#                              image (requirements/tools.in)
#
#   scripts/lock.sh            keep the pins, fill in what changed
#   scripts/lock.sh --upgrade  move every pin to its newest release
#
# Run it after changing the dependencies in pyproject.toml (the image build
# fails its `pip check` on a stale lock), then commit both files. Both are
# resolved for every Python from 3.11 on, with markers, since the image's
# Python is the base image's (3.11.2 on Debian 12, 3.12 on python:3.12-slim)
# rather than this machine's. uv takes its index from UV_DEFAULT_INDEX, not
# from pip's configuration.
set -euo pipefail
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"
cd "$repo_root"

uv=$(command -v uv || true)
if [ -f requirements/tools.lock ]; then
  # shellcheck source=image-lib.sh
  source "$repo_root/scripts/image-lib.sh"
  ensure_tools_venv
  uv="$tools_venv/bin/uv"
fi
[ -n "$uv" ] || {
  say "lock.sh needs uv for its first tools.lock: pip install uv, then run it again"
  exit 2
}

compile=("$uv" pip compile --quiet --universal --python-version 3.11
  --generate-hashes --custom-compile-command scripts/lock.sh "$@")

say "== requirements/runtime.lock"
"${compile[@]}" --output-file requirements/runtime.lock pyproject.toml
say "== requirements/tools.lock"
"${compile[@]}" --output-file requirements/tools.lock requirements/tools.in
