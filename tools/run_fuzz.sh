#!/usr/bin/env bash
# Builds the safetensors header fuzzer with clang++ in its own build directory and runs it.
#
#   tools/run_fuzz.sh [SECONDS]        (default 60; CI runs it briefly)
#
# Needs clang++ with libFuzzer (Debian: apt-get install clang-14). A crash leaves its input as
# crash-* in the build directory and makes this script fail.
set -euo pipefail

seconds="${1:-60}"
root="$(cd "$(dirname "$0")/.." && pwd)"
build="${FERRY_FUZZ_BUILD_DIR:-$root/build-fuzz}"
cxx="$(command -v clang++ || command -v clang++-14 || true)"
if [[ -z "$cxx" ]]; then
  echo "run_fuzz.sh: clang++ not found; install it with: apt-get install clang-14" >&2
  exit 1
fi
cc="$(dirname "$cxx")/$(basename "$cxx" | sed 's/clang++/clang/')"

cmake -S "$root" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DCMAKE_CXX_COMPILER="$cxx" -DCMAKE_C_COMPILER="$cc" \
  -DFERRY_BUILD_FUZZERS=ON -DFERRY_BUILD_EXAMPLES=OFF >/dev/null
ninja -C "$build" -j1 safetensors_header_fuzz

# Seeds: a valid two-tensor file and an empty one; the fuzzer mutates from there.
corpus="$build/fuzz-corpus/safetensors_header"
mkdir -p "$corpus"
write_seed() {  # NAME HEADER DATA_BYTES
  local length=${#2}
  {
    printf "$(printf '\\x%02x\\x%02x\\x%02x\\x%02x' $((length & 255)) $((length >> 8 & 255)) \
      $((length >> 16 & 255)) $((length >> 24 & 255)))\\x00\\x00\\x00\\x00"
    printf '%s' "$2"
    head -c "$3" /dev/zero
  } >"$corpus/$1"
}
write_seed valid '{"__metadata__":{"format":"pt"},"a":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]},"b":{"dtype":"BF16","shape":[3],"data_offsets":[16,22]}}  ' 22
write_seed empty '{}      ' 0

cd "$build"
"$build/tests/fuzz/safetensors_header_fuzz" -max_total_time="$seconds" -max_len=4096 \
  -print_final_stats=1 "$corpus"
