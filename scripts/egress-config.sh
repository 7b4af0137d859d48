#!/usr/bin/env bash
# Renders config/squid.compose.conf, the compose stack's egress policy, from
# config/squid.conf.template and the allowedApis of config/security-config.json.
# Run it after changing either; with --check it only says whether the
# committed file is current (the tests run it so).
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "$0")/lib.sh"
# shellcheck source=scripts/image-lib.sh
source "$(dirname "$0")/image-lib.sh"
cd "$repo_root"
ensure_venv

target=config/squid.compose.conf
mapfile -t hosts < <(allowed_apis config/security-config.json)
# In the stack: port 3128 on the internal network, the engine's resolver
# (Docker's 127.0.0.11) for the allowed names, logs on the service's tmpfs.
rendered=$(
  printf '# Rendered by scripts/egress-config.sh from config/squid.conf.template:\n'
  printf '# edit those, not this file.\n'
  render_squid_conf 3128 /var/run/squid /etc/hosts 127.0.0.11 ALL,1 "${hosts[@]}"
)
if [ "${1:-}" = --check ]; then
  if [ "$rendered" != "$(cat "$target" 2>/dev/null)" ]; then
    say "$target is stale: run scripts/egress-config.sh"
    exit 1
  fi
  exit 0
fi
printf '%s\n' "$rendered" >"$target"
say "wrote $target for: ${hosts[*]}"
