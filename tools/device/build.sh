#!/usr/bin/env bash
# Run THERE (the GPU machine: Ubuntu 24.04, CUDA 13, PyTorch 2.11 in /opt/torch/.venv, no
# network): unpacks .device-debs/ into a scratch prefix, builds ferry against that PyTorch's
# LibTorch in build-gpu/, and, with `test`, runs the test suite. Prints the environment lines
# to source for running the built binaries afterwards:
#   tools/device/build.sh test && source build-gpu/env.sh && build-gpu/ferry info
set -euo pipefail
cd "$(dirname "$0")/../.."
[[ -d .device-debs ]] || { echo "no .device-debs/: run tools/device/fetch-debs.sh here and carry it" >&2; exit 1; }

# Note: the image points CC/CXX/CUDAHOSTCXX at a gcc in /opt/gcc whose libstdc++ code ends up
# inside libferry.so; loaded into Python next to torch, those copies crash on the first formatted
# error message (docs/python.md). The system gcc 13 links against the shared libstdc++ instead.
if [[ -x /usr/bin/g++ ]]; then
  export CC=/usr/bin/gcc CXX=/usr/bin/g++ CUDAHOSTCXX=/usr/bin/g++
fi

prefix=${FERRY_DEVICE_PREFIX:-/tmp/ferry-deps}
mkdir -p "$prefix"
for deb in .device-debs/*.deb; do dpkg -x "$deb" "$prefix"; done
sed -i "s#^prefix=/usr#prefix=$prefix/usr#" "$prefix"/usr/lib/x86_64-linux-gnu/pkgconfig/*.pc

torch_prefix=$(python3 -c 'import torch; print(torch.utils.cmake_prefix_path)')
mkdir -p build-gpu
cat > build-gpu/env.sh <<ENV
export CC=${CC:-cc} CXX=${CXX:-c++} CUDAHOSTCXX=${CUDAHOSTCXX:-c++}
export CMAKE_PREFIX_PATH=$torch_prefix:$prefix/usr
export PKG_CONFIG_PATH=$prefix/usr/lib/x86_64-linux-gnu/pkgconfig
export LD_LIBRARY_PATH=$prefix/usr/lib/x86_64-linux-gnu:\${LD_LIBRARY_PATH:-}
ENV
source build-gpu/env.sh

cmake -S . -B build-gpu -G Ninja -DCMAKE_BUILD_TYPE=Release ${FERRY_CMAKE_ARGS:-}
ninja -C build-gpu
if [[ ${1:-} == test ]]; then
  # Note: libgomp's threads spin while they wait; with several test processes side by side that
  # starves them (docs/gpu-machine.md).
  OMP_WAIT_POLICY=PASSIVE ctest --test-dir build-gpu --output-on-failure -j "$(nproc)"
fi
