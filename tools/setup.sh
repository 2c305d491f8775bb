#!/usr/bin/env bash
# Installs ferry's build and test dependencies from Debian 12's own packages (run as root).
# Safe to run again: apt-get skips what is already there.
set -euo pipefail

packages=(
  build-essential cmake ninja-build pkg-config
  libtorch-dev libgloo-dev
  liburing-dev libaio-dev libtbb-dev
  libcxxopts-dev catch2 nlohmann-json3-dev libyaml-cpp-dev
  libpcre2-dev libutf8proc-dev libsentencepiece-dev
  clang-14 libclang-rt-14-dev
  python3-dev python3-torch pybind11-dev python3-setuptools python3-pytest
)

missing=()
for package in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" ||
    missing+=("$package")
done
if ((${#missing[@]})); then
  if [[ $(id -u) -ne 0 ]]; then
    echo "ferry setup: missing packages: ${missing[*]}; run this script as root" >&2
    exit 1
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
