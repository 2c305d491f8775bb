#include <catch2/catch.hpp>

#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

#include "ferry/io.h"
#include "ferry/memory.h"

using namespace ferry;

TEST_CASE("blocks are aligned for O_DIRECT and counted against the budget") {
  HostArena arena({.budget_bytes = 4 << 20, .chunk_bytes = 1 << 20});
  HostBlock a = arena.allocate(10);
  HostBlock b = arena.allocate(5000);
  CHECK(reinterpret_cast<uintptr_t>(a.data()) % 4096 == 0);
  CHECK(reinterpret_cast<uintptr_t>(b.data()) % 4096 == 0);
  CHECK(a.bytes() == 4096);
  CHECK(b.bytes() == 8192);
  std::memset(b.data(), 1, b.bytes());

  HostArenaStats stats = arena.stats();
  CHECK(stats.in_use_bytes == 4096 + 8192);
  CHECK(stats.mapped_bytes == (1 << 20));
  CHECK(stats.chunks == 1);
  a.reset();
  CHECK(arena.stats().in_use_bytes == 8192);
  CHECK(arena.stats().peak_in_use_bytes == 4096 + 8192);
}

TEST_CASE("a request beyond the budget is refused with a message naming both") {
  HostArena arena({.budget_bytes = 3 << 20, .chunk_bytes = 1 << 20, .name = "staging"});
  HostBlock first = arena.allocate(2 << 20);
  CHECK_THROWS_AS(arena.allocate(2 << 20), BudgetExceeded);
  CHECK_THROWS_WITH(arena.allocate(2 << 20),
                    Catch::Contains("staging memory budget exceeded") &&
                        Catch::Contains("2.00 MiB") && Catch::Contains("3.00 MiB"));
  CHECK_FALSE(arena.try_allocate(2 << 20));
  CHECK(arena.stats().refusals == 3);
  CHECK(arena.stats().peak_mapped_bytes <= (3 << 20));

  // Freed space is reused, and fully free chunks are unmapped to make room for a bigger one.
  first.reset();
  HostBlock whole = arena.allocate(3 << 20);
  CHECK(arena.stats().mapped_bytes == (3 << 20));
}

TEST_CASE("chunks hold a whole number of the blocks that map them, leaving no remainder to waste") {
  // 151 MiB blocks, as a llama-2.7b job's bf16 bundles: 1 GiB chunks would hold 6 each and
  // strand 118 MiB per chunk; chunks of 6 blocks fill the budget but for the last one's rest.
  constexpr size_t kMiB = size_t{1} << 20;
  HostArena arena({.budget_bytes = 4096 * kMiB, .chunk_bytes = 1024 * kMiB, .page_lock = false});
  std::vector<HostBlock> blocks;
  while (HostBlock block = arena.try_allocate(151 * kMiB)) blocks.push_back(std::move(block));
  CHECK(blocks.size() == 4096 / 151);
  CHECK(arena.stats().mapped_bytes <= 4096 * kMiB);
  // Twice the size (an fp32 master) fits a chunk cut for the smaller blocks exactly.
  blocks.erase(blocks.begin(), blocks.begin() + 6);
  HostBlock master = arena.allocate(302 * kMiB);
  HostBlock state = arena.allocate(302 * kMiB);
  HostBlock other_state = arena.allocate(302 * kMiB);
  CHECK_FALSE(arena.try_allocate(151 * kMiB));
}

TEST_CASE("freed neighbours coalesce into one range") {
  HostArena arena({.budget_bytes = 1 << 20, .chunk_bytes = 1 << 20});
  std::vector<HostBlock> blocks;
  for (int i = 0; i < 256; ++i) blocks.push_back(arena.allocate(4096));
  CHECK_FALSE(arena.try_allocate(4096));
  for (size_t i = 0; i < blocks.size(); i += 2) blocks[i].reset();
  CHECK_FALSE(arena.try_allocate(8192));  // fragmented
  for (size_t i = 1; i < blocks.size(); i += 2) blocks[i].reset();
  HostBlock all = arena.allocate(1 << 20);
  CHECK(all.bytes() == (1 << 20));
}

TEST_CASE("many threads allocate and free under the budget") {
  HostArena arena({.budget_bytes = 16 << 20, .chunk_bytes = 4 << 20});
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&arena, t] {
      for (int i = 0; i < 200; ++i) {
        HostBlock block = arena.allocate(static_cast<size_t>((i % 7 + 1) * 4096 * (t + 1)));
        std::memset(block.data(), t, block.bytes());
      }
    });
  }
  for (auto& thread : threads) thread.join();
  HostArenaStats stats = arena.stats();
  CHECK(stats.in_use_bytes == 0);
  CHECK(stats.peak_mapped_bytes <= (16 << 20));
  CHECK(stats.allocations == 800);
}

TEST_CASE("chunks are registered with the I/O engine as fixed buffers") {
  IoOptions options;
  options.backend = IoBackendKind::kIoUring;
  auto engine = IoEngine::create(options);
  {
    HostArena arena({.budget_bytes = 2 << 20, .chunk_bytes = 1 << 20}, engine.get());
    HostBlock block = arena.allocate(4096);
    CHECK(arena.stats().page_lock != "disabled");
  }
  CHECK(engine->stats().failed_requests == 0);
}

TEST_CASE("bad arena settings and sizes give clear errors") {
  CHECK_THROWS_WITH(HostArena({.budget_bytes = 0}), Catch::Contains("budget is 0 bytes"));
  CHECK_THROWS_WITH(HostArena({.budget_bytes = 1 << 20, .chunk_bytes = 12345}),
                    Catch::Contains("chunk size 12345"));
  CHECK(parse_bytes("24GiB") == (uint64_t{24} << 30));
  CHECK(parse_bytes("512 MiB") == (uint64_t{512} << 20));
  CHECK(parse_bytes("1.5GB") == 1500000000u);
  CHECK(parse_bytes("4096") == 4096u);
  CHECK_THROWS_WITH(parse_bytes("lots"), Catch::Contains("'lots'") && Catch::Contains("24GiB"));
  CHECK(parse_bytes("0") == 0u);
  CHECK(parse_bytes("1e9") == 1000000000u);
  CHECK(parse_bytes("0.5KiB") == 512u);
  // Refused rather than rounded: below a byte would read as 0 ("no limit"), 2^63 and more do not fit.
  CHECK_THROWS_WITH(parse_bytes("0.0001"), Catch::Contains("'0.0001'") && Catch::Contains("less than one byte"));
  CHECK_THROWS_WITH(parse_bytes("1e30"), Catch::Contains("'1e30'") && Catch::Contains("2^63"));
  CHECK_THROWS_WITH(parse_bytes("8EiB"), Catch::Contains("'8EiB'"));
  CHECK_THROWS_WITH(parse_bytes("16777216TiB"), Catch::Contains("2^63"));
  CHECK_THROWS_WITH(parse_bytes("4096.5"), Catch::Contains("whole number of bytes"));
  CHECK_THROWS_WITH(parse_bytes("-1GiB"), Catch::Contains("'-1GiB'"));
  CHECK_THROWS_WITH(parse_bytes("nan"), Catch::Contains("'nan'"));
  CHECK_THROWS_WITH(parse_bytes("12GiBx"), Catch::Contains("'12GiBx'"));
  CHECK(format_bytes(3 << 20) == "3.00 MiB");
}
