#!/usr/bin/env bash
# Installs the Debian 12 packages l4c builds with. Idempotent and quiet when all
# are present; run as root (or through sudo) on a fresh machine.
set -euo pipefail

packages=(
  cmake ninja-build g++ make python3 lld
  llvm-22-dev libmlir-22-dev mlir-22-tools llvm-22-tools lld-22
  libflatbuffers-dev flatbuffers-compiler
  libgtest-dev libgmock-dev libbenchmark-dev
  zlib1g-dev libzstd-dev libxml2-dev libedit-dev libcurl4-openssl-dev
)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" \
    || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0

echo "setup: installing ${missing[*]}"
sudo=""
[ "$(id -u)" -ne 0 ] && sudo="sudo"
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
