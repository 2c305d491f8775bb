// libFuzzer target: any byte string is a candidate safetensors file. The parser must either
// accept it or throw ferry::Error; anything else (a crash, a sanitizer report, an InternalError)
// is a bug. Run with tools/run_fuzz.sh.

#include <cstddef>
#include <cstdint>

#include "ferry/check.h"
#include "ferry/safetensors.h"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  try {
    ferry::safetensors::parse_header(data, size, size, "fuzz-input");
  } catch (const ferry::Error&) {
  }
  return 0;
}
