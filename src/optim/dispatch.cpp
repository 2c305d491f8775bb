#include "optim/dispatch.h"

#include <oneapi/tbb/blocked_range.h>
#include <oneapi/tbb/parallel_for.h>
#include <oneapi/tbb/task_arena.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <string>

#include "ferry/check.h"

namespace ferry::optim {

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kScalar: return "scalar";
    case Isa::kAvx2: return "avx2";
    case Isa::kAvx512: return "avx512";
  }
  return "unknown";
}

std::string missing_cpu_features(Isa isa) {
  std::string missing;
  auto require = [&](bool present, const char* feature) {
    if (!present) missing += (missing.empty() ? "" : ", ") + std::string(feature);
  };
  switch (isa) {
    case Isa::kScalar:
      break;
    case Isa::kAvx2:
      require(__builtin_cpu_supports("avx2"), "avx2");
      require(__builtin_cpu_supports("f16c"), "f16c");
      break;
    case Isa::kAvx512:
      require(__builtin_cpu_supports("avx512f"), "avx512f");
      require(__builtin_cpu_supports("avx512bw"), "avx512bw");
      require(__builtin_cpu_supports("avx512vl"), "avx512vl");
      break;
  }
  return missing;
}

bool isa_supported(Isa isa) { return missing_cpu_features(isa).empty(); }

Isa best_isa() {
  for (Isa isa : {Isa::kAvx512, Isa::kAvx2}) {
    if (isa_supported(isa)) return isa;
  }
  return Isa::kScalar;
}

Isa parse_isa(const std::string& name) {
  for (Isa isa : {Isa::kScalar, Isa::kAvx2, Isa::kAvx512}) {
    if (name == isa_name(isa)) return isa;
  }
  FERRY_CHECK(false, "unknown optimizer ISA '", name, "'; valid: scalar, avx2, avx512");
  return Isa::kScalar;
}

namespace {

void check_supported(Isa isa, const char* source) {
  const std::string missing = missing_cpu_features(isa);
  FERRY_CHECK(missing.empty(), source, " asks for the ", isa_name(isa),
              " optimizer kernels but this CPU lacks ", missing, "; the best it has is ",
              isa_name(best_isa()));
}

Isa initial_isa() {
  const char* requested = std::getenv("FERRY_OPTIM_ISA");
  if (requested == nullptr || *requested == '\0') return best_isa();
  const Isa isa = parse_isa(requested);
  check_supported(isa, "FERRY_OPTIM_ISA");
  return isa;
}

std::atomic<Isa>& isa_setting() {
  static std::atomic<Isa> isa{initial_isa()};
  return isa;
}

// Note: tbb::task_arena::automatic is passed by value here; binding it to a reference (as
// make_shared's forwarding does) needs a definition oneTBB does not export.
std::shared_ptr<tbb::task_arena> make_arena(int threads) {
  const int concurrency = threads == 0 ? int{tbb::task_arena::automatic} : threads;
  return std::make_shared<tbb::task_arena>(concurrency);
}

// The arena is replaced, never changed, so a step that already holds it runs to completion.
struct ArenaSetting {
  std::mutex mutex;
  int threads = 0;
  std::shared_ptr<tbb::task_arena> arena = make_arena(0);
};

ArenaSetting& arena_setting() {
  static ArenaSetting setting;
  return setting;
}

std::shared_ptr<tbb::task_arena> current_arena() {
  ArenaSetting& setting = arena_setting();
  std::lock_guard<std::mutex> lock(setting.mutex);
  return setting.arena;
}

}  // namespace

Isa active_isa() { return isa_setting().load(); }

void set_isa(Isa isa) {
  check_supported(isa, "set_isa");
  isa_setting().store(isa);
}

void set_num_threads(int threads) {
  FERRY_CHECK(threads >= 0, "optimizer thread count ", threads,
              " is invalid; use a positive count, or 0 for one thread per core");
  ArenaSetting& setting = arena_setting();
  std::lock_guard<std::mutex> lock(setting.mutex);
  setting.threads = threads;
  setting.arena = make_arena(threads);
}

int num_threads() {
  ArenaSetting& setting = arena_setting();
  std::lock_guard<std::mutex> lock(setting.mutex);
  return setting.threads == 0 ? tbb::this_task_arena::max_concurrency() : setting.threads;
}

namespace detail {

const KernelTable& active_kernels() {
  switch (active_isa()) {
    case Isa::kScalar: return scalar_kernels();
    case Isa::kAvx2: return avx2_kernels();
    case Isa::kAvx512: return avx512_kernels();
  }
  FERRY_ASSERT(false, "unknown ISA ", static_cast<int>(active_isa()));
  return scalar_kernels();
}

void parallel_tiles(std::int64_t size, const std::function<void(Tile)>& body) {
  const std::int64_t tiles = (size + kTileElements - 1) / kTileElements;
  if (tiles <= 1) {
    if (size > 0) body(Tile{0, size});
    return;
  }
  const std::shared_ptr<tbb::task_arena> arena = current_arena();
  arena->execute([&] {
    tbb::parallel_for(tbb::blocked_range<std::int64_t>(0, tiles),
                      [&](const tbb::blocked_range<std::int64_t>& range) {
                        for (std::int64_t t = range.begin(); t != range.end(); ++t) {
                          body(Tile{t * kTileElements, std::min(size, (t + 1) * kTileElements)});
                        }
                      });
  });
}

void parallel_indices(std::int64_t count, const std::function<void(std::int64_t)>& body) {
  if (count <= 0) return;
  const std::shared_ptr<tbb::task_arena> arena = current_arena();
  arena->execute([&] {
    tbb::parallel_for(tbb::blocked_range<std::int64_t>(0, count),
                      [&](const tbb::blocked_range<std::int64_t>& range) {
                        for (std::int64_t i = range.begin(); i != range.end(); ++i) body(i);
                      });
  });
}

}  // namespace detail
}  // namespace ferry::optim
