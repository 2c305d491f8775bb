#include "data/shuffle.h"

#include <numeric>
#include <utility>

#include "ferry/check.h"

namespace ferry::data {

uint64_t SplitMix64::next() {
  uint64_t z = (state_ += 0x9e3779b97f4a7c15ULL);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

uint64_t SplitMix64::below(uint64_t bound) {
  FERRY_ASSERT(bound > 0);
  // The largest multiple of bound that fits: values at or above it would favour small results.
  uint64_t limit = UINT64_MAX - UINT64_MAX % bound;
  uint64_t value = next();
  while (value >= limit) {
    value = next();
  }
  return value % bound;
}

std::vector<int64_t> epoch_order(int64_t size, uint64_t seed, int64_t epoch, bool shuffle) {
  std::vector<int64_t> order(size);
  std::iota(order.begin(), order.end(), int64_t{0});
  if (!shuffle) {
    return order;
  }
  // Hashing the seed before adding the epoch keeps (seed, epoch) pairs from sharing a stream,
  // and hashing the sum makes neighbouring epochs' streams unrelated.
  SplitMix64 rng(SplitMix64(SplitMix64(seed).next() + static_cast<uint64_t>(epoch)).next());
  for (int64_t i = size - 1; i > 0; --i) {
    int64_t j = static_cast<int64_t>(rng.below(static_cast<uint64_t>(i) + 1));
    std::swap(order[i], order[j]);
  }
  return order;
}

}  // namespace ferry::data
