#pragma once

// Random numbers that are the same on every platform and standard library. std::shuffle and
// the std:: distributions are implementation-defined, and an exact resume position must mean
// the same batches wherever a job resumes.

#include <cstdint>
#include <vector>

namespace ferry::data {

// splitmix64 (Steele, Lea and Flood, 2014).
class SplitMix64 {
 public:
  explicit SplitMix64(uint64_t seed) : state_(seed) {}

  uint64_t next();
  // Uniform in [0, bound), by rejection rather than a biased modulo. bound must be positive.
  uint64_t below(uint64_t bound);

 private:
  uint64_t state_;
};

// The order in which epoch `epoch` visits the examples 0 .. size - 1: a Fisher-Yates
// permutation drawn from (seed, epoch), or the identity without shuffling.
std::vector<int64_t> epoch_order(int64_t size, uint64_t seed, int64_t epoch, bool shuffle);

}  // namespace ferry::data
