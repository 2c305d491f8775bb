#pragma once

// Test data for byte-level round trips: `count` bytes from a seeded generator.

#include <cstdint>
#include <random>

#include <torch/types.h>

namespace ferry {

inline torch::Tensor random_bytes(std::uint64_t count, unsigned seed) {
  std::mt19937 generator(seed);
  torch::Tensor bytes = torch::empty({static_cast<std::int64_t>(count)}, torch::kUInt8);
  auto* data = bytes.data_ptr<std::uint8_t>();
  for (std::uint64_t i = 0; i < count; ++i) data[i] = static_cast<std::uint8_t>(generator());
  return bytes;
}

}  // namespace ferry
