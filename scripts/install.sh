#!/usr/bin/env bash
# Installs uffd-broker: the broker, the sample plugins, the systemd units, an
# example config (kept if one is there) and the README; or removes them.
#
#   scripts/install.sh [--prefix DIR] [--sysconfdir DIR] [--localstatedir DIR] [--unitdir DIR] [--sysusersdir DIR] [--from BINDIR]
#   scripts/install.sh --uninstall [the same options]
#
# Defaults: --prefix /usr/local (binaries in PREFIX/bin, plugins in
# PREFIX/libexec/uffd-broker, docs in PREFIX/share/doc/uffd-broker),
# --sysconfdir /etc (config in SYSCONFDIR/uffd-broker/config.json),
# --localstatedir /var (the snapshot plugin serves files beneath
# LOCALSTATEDIR/lib/uffd-broker/snapshots), --unitdir /etc/systemd/system,
# --sysusersdir /etc/sysusers.d (the plugins' user uffd-plugin, created then
# with systemd-sysusers or useradd when the directory is the system's own).
# --from installs binaries built already (a bin directory of `swift build`)
# instead of building release ones.
set -euo pipefail
prefix=/usr/local sysconfdir=/etc localstatedir=/var unitdir=/etc/systemd/system sysusersdir=/etc/sysusers.d from="" uninstall=false
while (($#)); do
  case "$1" in
    --prefix) prefix=$2; shift 2 ;;
    --sysconfdir) sysconfdir=$2; shift 2 ;;
    --localstatedir) localstatedir=$2; shift 2 ;;
    --unitdir) unitdir=$2; shift 2 ;;
    --sysusersdir) sysusersdir=$2; shift 2 ;;
    --from) from=$2; shift 2 ;;
    --uninstall) uninstall=true; shift ;;
    -h|--help) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "install.sh: unknown option $1 (see --help)" >&2; exit 64 ;;
  esac
done
# Paths are the caller's (made absolute before moving to the repository), and
# plain: they go into sed replacements, JSON and the unit's ExecStart.
for name in prefix sysconfdir localstatedir unitdir sysusersdir from; do
  [[ -z ${!name} ]] && continue
  [[ ${!name} =~ [[:space:]\|\&\"\\] ]] && { echo "install.sh: --$name ${!name}: no spaces, |, &, \" or \\ please" >&2; exit 64; }
  printf -v "$name" '%s' "$(realpath -m -- "${!name}")"
done
cd "$(dirname "$0")/.."
plugins=(snapshot-plugin swap-plugin zero-fill-plugin)
# The service and the socket units that hand it its sockets.
units=(uffd-broker.service uffd-broker.socket uffd-broker-plugin.socket uffd-broker-control.socket)
sockets=(uffd-broker.socket uffd-broker-plugin.socket uffd-broker-control.socket)
libexec=$prefix/libexec/uffd-broker
config=$sysconfdir/uffd-broker/config.json
snapshots=$localstatedir/lib/uffd-broker/snapshots

if $uninstall; then
  # Units systemd runs are stopped and disabled first (a running broker must not
  # outlive its binary; its sockets would start it again).
  if [[ -d /run/systemd/system && -e $unitdir/uffd-broker.service ]] && command -v systemctl >/dev/null; then
    systemctl disable --now "${sockets[@]}" uffd-broker.service || true
  fi
  rm -f "$prefix/bin/uffd-broker"
  for unit in "${units[@]}"; do rm -f "$unitdir/$unit"; done
  for plugin in "${plugins[@]}"; do rm -f "$libexec/$plugin"; done
  rmdir "$libexec" 2>/dev/null || true
  rm -rf "$prefix/share/doc/uffd-broker"
  rm -f "$sysusersdir/uffd-broker.conf"
  echo "removed uffd-broker from $prefix and $unitdir; kept $config and $snapshots (yours) and the user uffd-plugin (files may be its)"
  exit 0
fi

if [[ -z $from ]]; then
  scripts/setup.sh
  swift build -c release --product uffd-broker >/dev/null
  for plugin in "${plugins[@]}"; do swift build -c release --product "$plugin" >/dev/null; done
  from=$(swift build -c release --show-bin-path)
fi
install -d "$prefix/bin" "$libexec" "$unitdir" "$sysconfdir/uffd-broker" "$prefix/share/doc/uffd-broker"
install -d -m 0755 "$snapshots"
install -m 0755 "$from/uffd-broker" "$prefix/bin/uffd-broker"
for plugin in "${plugins[@]}"; do install -m 0755 "$from/$plugin" "$libexec/$plugin"; done
install -m 0644 README.md "$prefix/share/doc/uffd-broker/README.md"
for unit in "${units[@]}"; do
  sed -e "s|/usr/local/bin/uffd-broker|$prefix/bin/uffd-broker|" -e "s|/etc/uffd-broker/config.json|$config|" \
      -e "s|/usr/local/share/doc/uffd-broker|$prefix/share/doc/uffd-broker|" \
      "packaging/systemd/$unit" > "$unitdir/$unit"
  chmod 0644 "$unitdir/$unit"
done
install -d "$sysusersdir"
install -m 0644 packaging/sysusers.d/uffd-broker.conf "$sysusersdir/uffd-broker.conf"
# The plugins' user, on this system only (a staging directory is for a package to do it).
if [[ $sysusersdir == /etc/sysusers.d || $sysusersdir == /usr/lib/sysusers.d ]] && ! getent passwd uffd-plugin >/dev/null; then
  if command -v systemd-sysusers >/dev/null; then
    systemd-sysusers "$sysusersdir/uffd-broker.conf"
  elif command -v useradd >/dev/null; then
    useradd --system --no-create-home --home-dir / --shell /usr/sbin/nologin --comment "uffd-broker plugins" uffd-plugin
  else
    echo "install.sh: no systemd-sysusers or useradd: create the user uffd-plugin yourself, or the plugins run as nobody" >&2
  fi
fi
if [[ -e $config ]]; then
  echo "kept the existing $config"
else
  sed -e "s|@LIBEXEC@|$libexec|g" -e "s|@SNAPSHOTS@|$snapshots|g" packaging/config.json > "$config"
  chmod 0644 "$config"
fi
"$prefix/bin/uffd-broker" check-config "$config"
echo "installed uffd-broker in $prefix (plugins in $libexec), the units in $unitdir, the config in $config"
echo "start it: systemctl daemon-reload && systemctl enable --now uffd-broker.socket"
