#pragma once

// Element types as safetensors spells them. Kept free of torch so that the checkpoint format and
// the planner's size arithmetic can be used (and fuzzed) without LibTorch.

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

namespace ferry {

enum class DType : std::uint8_t {
  kBool,
  kU8,
  kI8,
  kI16,
  kU16,
  kI32,
  kU32,
  kI64,
  kU64,
  kF16,
  kBF16,
  kF32,
  kF64,
  kF8E4M3,
  kF8E5M2,
};

std::size_t dtype_size(DType dtype);

// "F32", "BF16", ... exactly as in a safetensors header.
std::string_view dtype_name(DType dtype);

// The inverse of dtype_name; nullopt for a name safetensors does not define.
std::optional<DType> parse_dtype(std::string_view name);

// All names parse_dtype accepts, comma separated, for error messages.
std::string valid_dtype_names();

}  // namespace ferry
