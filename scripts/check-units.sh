#!/usr/bin/env bash
# Checks the systemd units in packaging/systemd (the service and its socket
# units) with `systemd-analyze verify` (directives, sections, executables, the
# units they name), pointing them at the built broker instead of the installed
# one. Any complaint fails.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v systemd-analyze >/dev/null || { echo "systemd-analyze is missing (Debian package systemd)" >&2; exit 2; }
bin=$(swift build --show-bin-path)
[[ -x "$bin/uffd-broker" ]] || swift build --product uffd-broker >/dev/null
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
for unit in packaging/systemd/*.service packaging/systemd/*.socket; do
  sed "s|/usr/local/bin/uffd-broker|$bin/uffd-broker|g" "$unit" > "$tmp/$(basename "$unit")"
done
out=$(systemd-analyze verify "$tmp"/*.service "$tmp"/*.socket 2>&1 || true)
if [[ -n "$out" ]]; then echo "$out" >&2; exit 1; fi
echo "systemd units verified"
