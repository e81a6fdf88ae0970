#!/usr/bin/env bash
# Installs the Debian packages the build needs, if they are missing:
# libprotobuf-c (runtime of the generated wire code), protoc-c (to check it is
# current), zlib (the swap plugin's compression), libsystemd (the broker's
# notifications to systemd), protoc and python3-protobuf (the Python plugin
# SDK's generated code and its tests).
set -euo pipefail
needed=(libprotobuf-c-dev protobuf-c-compiler zlib1g-dev libsystemd-dev protobuf-compiler python3-protobuf)
missing=()
for package in "${needed[@]}"; do
  dpkg -s "$package" >/dev/null 2>&1 || missing+=("$package")
done
if ((${#missing[@]})); then
  echo "installing ${missing[*]}" >&2
  sudo=""; [[ $(id -u) -ne 0 ]] && sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi
