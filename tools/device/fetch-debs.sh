#!/usr/bin/env bash
# Run HERE (Debian 12, with network to Debian's mirrors): downloads the Debian packages the GPU
# machine lacks into .device-debs/ (git-ignored), to be sent there with the device tool's
# `carry` argument. See docs/gpu-machine.md.
set -euo pipefail
cd "$(dirname "$0")/../.."
mkdir -p .device-debs
cd .device-debs
apt-get download \
  liburing2 liburing-dev libtbb12 libtbbmalloc2 libtbbbind-2-5 libtbb-dev libaio1 libaio-dev \
  nlohmann-json3-dev catch2 libcxxopts-dev libyaml-cpp0.7 libyaml-cpp-dev \
  libpcre2-8-0 libpcre2-16-0 libpcre2-32-0 libpcre2-posix3 libpcre2-dev libutf8proc2 libutf8proc-dev \
  libsentencepiece0 libsentencepiece-dev libgloo0 libgloo-dev
ls -1 *.deb
