#!/usr/bin/env bash
# The README's two commands:
#   tools/run.sh main   set up, build, and run the main job on its built-in default
#   tools/run.sh test   set up, build, and run the whole test suite
set -euo pipefail
cd "$(dirname "$0")/.."

what=${1:-}
if [[ $what != main && $what != test ]]; then
  echo "usage: tools/run.sh main|test" >&2
  exit 2
fi

tools/setup.sh
jobs=$(nproc)
tests=$([[ $what == test ]] && echo ON || echo OFF)
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DFERRY_BUILD_TESTS=$tests -DFERRY_SANITIZED_TESTS=$tests
cmake --build build -j "$jobs"

if [[ $what == main ]]; then
  exec ./build/ferry
fi
ctest --test-dir build --output-on-failure -j "$jobs"
# The Python extension over the library just built, and its tests (docs/python.md). Debian's
# interpreter, which has python3-torch: not whatever python3 comes first on PATH.
(cd python && FERRY_BUILD_DIR="$PWD/../build" MAX_JOBS="$jobs" /usr/bin/python3 setup.py -q build_ext --inplace)
/usr/bin/python3 -m pytest -q tests/python
# The safetensors header parser under libFuzzer, briefly (tests/fuzz).
FERRY_FUZZ_BUILD_DIR="$PWD/build/fuzz" tools/run_fuzz.sh 30
