#pragma once

// Which kernels run (the ISA) and on how many threads (the optim task arena).

#include <cstdint>
#include <functional>

#include "optim/kernels.h"

namespace ferry::optim::detail {

// Tiles are the unit of parallel work: 16K fp32 elements is 64 KiB per stream, so the up to
// seven streams of one tile stay within a core's L2. Tile boundaries do not depend on the
// thread count, which keeps grad_stats' summation order fixed.
constexpr std::int64_t kTileElements = 16384;

const KernelTable& active_kernels();

// Calls body once for each tile of [0, size), in parallel on the optim arena.
void parallel_tiles(std::int64_t size, const std::function<void(Tile)>& body);

// Calls body once for each index of [0, count), in parallel on the optim arena.
void parallel_indices(std::int64_t count, const std::function<void(std::int64_t)>& body);

}  // namespace ferry::optim::detail
