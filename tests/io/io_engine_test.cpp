#include <catch2/catch.hpp>

#include <atomic>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <random>
#include <thread>

#include "ferry/io.h"
#include "ferry/memory.h"
#include "support/temp_dir.h"

using namespace ferry;
using ferry::testing::TempDir;

namespace {

std::vector<char> random_bytes(size_t count, uint32_t seed) {
  std::mt19937 generator(seed);
  std::vector<char> bytes(count);
  for (char& byte : bytes) byte = static_cast<char>(generator());
  return bytes;
}

std::unique_ptr<IoEngine> engine_for(IoBackendKind kind, unsigned depth = 8,
                                     size_t block_bytes = 1 << 20) {
  IoOptions options;
  options.backend = kind;
  options.queue_depth = depth;
  options.block_bytes = block_bytes;
  return IoEngine::create(options);
}

std::string read_whole(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

}  // namespace

TEST_CASE("every backend round-trips bytes at many sizes, offsets and alignments") {
  IoBackendKind kind = GENERATE(IoBackendKind::kIoUring, IoBackendKind::kLibaio,
                                IoBackendKind::kThreadPool);
  INFO("backend " << to_string(kind));
  auto engine = engine_for(kind, 4, 64 << 10);
  REQUIRE(engine->kind() == kind);
  TempDir dir;
  HostArena arena({.budget_bytes = 64 << 20, .chunk_bytes = 16 << 20}, engine.get());
  auto file = StripedFile::open(Env::posix(), dir.file("data"), OpenMode::kCreate);

  uint32_t seed = 1;
  for (size_t size : {size_t{1}, size_t{100}, size_t{4095}, size_t{4096}, size_t{4097},
                      size_t{65536 + 123}, size_t{1 << 20}, size_t{(3 << 20) + 5}}) {
    for (uint64_t offset : {uint64_t{0}, uint64_t{4096}, uint64_t{12345}, uint64_t{5 << 20}}) {
      for (size_t misalign : {size_t{0}, size_t{1}}) {
        INFO("size " << size << " offset " << offset << " misalign " << misalign);
        std::vector<char> expected = random_bytes(size, seed++);
        HostBlock out = arena.allocate(size + misalign);
        HostBlock in = arena.allocate(size + misalign);
        std::memcpy(out.as<char>() + misalign, expected.data(), size);
        engine->write(*file, offset, out.as<char>() + misalign, size).wait();
        std::memset(in.data(), 0x5a, in.bytes());
        engine->read(*file, offset, in.as<char>() + misalign, size).wait();
        REQUIRE(std::memcmp(in.as<char>() + misalign, expected.data(), size) == 0);
      }
    }
  }
  IoStats stats = engine->stats();
  CHECK(stats.failed_requests == 0);
  CHECK(stats.buffered_transfers > 0);  // unaligned heads and tails
  if (file->direct()) CHECK(stats.transfers > stats.buffered_transfers);
  if (kind == IoBackendKind::kIoUring && engine->describe().find("no fixed") == std::string::npos) {
    CHECK(stats.fixed_buffer_transfers > 0);
  }
}

TEST_CASE("a striped file lays stripes round-robin over its directories") {
  IoBackendKind kind = GENERATE(IoBackendKind::kIoUring, IoBackendKind::kLibaio,
                                IoBackendKind::kThreadPool);
  INFO("backend " << to_string(kind));
  auto engine = engine_for(kind);
  TempDir dir;
  std::vector<std::string> directories = {dir.subdir("a"), dir.subdir("b"), dir.subdir("c")};
  constexpr size_t kStripe = 64 << 10;
  auto file = StripedFile::open(Env::posix(), directories, "blob", OpenMode::kCreate, kStripe);

  const size_t size = 10 * kStripe + 777;
  std::vector<char> expected = random_bytes(size, 42);
  engine->write(*file, 0, expected.data(), size).wait();

  std::vector<std::string> members;
  for (const std::string& directory : directories) members.push_back(read_whole(directory + "/blob"));
  for (size_t stripe = 0; stripe * kStripe < size; ++stripe) {
    size_t length = std::min(kStripe, size - stripe * kStripe);
    const std::string& member = members[stripe % 3];
    size_t at = (stripe / 3) * kStripe;
    REQUIRE(member.size() >= at + length);
    REQUIRE(std::memcmp(member.data() + at, expected.data() + stripe * kStripe, length) == 0);
  }

  // A read that starts and ends inside stripes crosses members correctly.
  std::vector<char> middle(5 * kStripe + 99);
  engine->read(*file, kStripe / 2 + 3, middle.data(), middle.size()).wait();
  REQUIRE(std::memcmp(middle.data(), expected.data() + kStripe / 2 + 3, middle.size()) == 0);
}

TEST_CASE("many threads submit at once, with callbacks and tickets") {
  IoBackendKind kind = GENERATE(IoBackendKind::kIoUring, IoBackendKind::kLibaio,
                                IoBackendKind::kThreadPool);
  INFO("backend " << to_string(kind));
  auto engine = engine_for(kind, 16, 64 << 10);
  TempDir dir;
  auto file = StripedFile::open(Env::posix(), {dir.subdir("x"), dir.subdir("y")}, "shared",
                                OpenMode::kCreate, 128 << 10);
  constexpr int kThreads = 8;
  constexpr int kRounds = 20;
  constexpr size_t kRegion = 300 << 10;
  std::atomic<int> callbacks{0};
  std::atomic<int> mismatches{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      std::vector<char> back(kRegion);
      for (int round = 0; round < kRounds; ++round) {
        std::vector<char> data = random_bytes(kRegion, static_cast<uint32_t>(t * 1000 + round));
        uint64_t offset = static_cast<uint64_t>(t) * kRegion;
        IoTicket written = engine->write(*file, offset, data.data(), kRegion,
                                         [&](const IoError* error) {
                                           if (error == nullptr) ++callbacks;
                                         });
        written.wait();
        engine->read(*file, offset, back.data(), kRegion).wait();
        if (back != data) ++mismatches;
      }
    });
  }
  for (auto& thread : threads) thread.join();
  engine->drain();
  CHECK(mismatches == 0);
  CHECK(callbacks == kThreads * kRounds);
}

TEST_CASE("reading past the end of a file is an error, not zero-fill") {
  IoBackendKind kind = GENERATE(IoBackendKind::kIoUring, IoBackendKind::kLibaio,
                                IoBackendKind::kThreadPool);
  auto engine = engine_for(kind);
  TempDir dir;
  auto file = StripedFile::open(Env::posix(), dir.file("short"), OpenMode::kCreate);
  std::vector<char> data = random_bytes(10000, 7);
  engine->write(*file, 0, data.data(), data.size()).wait();

  std::vector<char> back(20000, 0x11);
  std::optional<IoError> error = engine->read(*file, 8192, back.data(), back.size()).wait_for_result();
  REQUIRE(error.has_value());
  CHECK(error->error_number == ENODATA);
  CHECK(error->path == dir.file("short"));
  CHECK_THROWS_WITH(engine->read(*file, 8192, back.data(), back.size()).wait(),
                    Catch::Contains("read past the end of the file") &&
                        Catch::Contains(dir.file("short")));
}

TEST_CASE("probing explains each backend and forcing picks one") {
  std::vector<BackendProbe> probes = IoEngine::probe_all();
  REQUIRE(probes.size() == 3);
  CHECK(probes[0].kind == IoBackendKind::kIoUring);
  CHECK(probes[1].kind == IoBackendKind::kLibaio);
  CHECK(probes[2].kind == IoBackendKind::kThreadPool);
  CHECK(probes[2].usable);
  for (const BackendProbe& probe : probes) CHECK(probe.usable == probe.reason.empty());

  for (IoBackendKind kind : {IoBackendKind::kIoUring, IoBackendKind::kLibaio,
                             IoBackendKind::kThreadPool}) {
    if (!probes[static_cast<size_t>(kind)].usable) continue;
    CHECK(engine_for(kind)->kind() == kind);
  }
  auto automatic = IoEngine::create();
  for (const BackendProbe& probe : probes) {
    if (probe.usable) {
      CHECK(automatic->kind() == probe.kind);
      break;
    }
  }
}

TEST_CASE("bad I/O settings give errors that name the value") {
  CHECK_THROWS_WITH(parse_io_backend("spdk"), Catch::Contains("'spdk'") &&
                                                  Catch::Contains("io_uring, libaio and threads"));
  IoOptions options;
  options.queue_depth = 0;
  CHECK_THROWS_WITH(IoEngine::create(options), Catch::Contains("queue depth 0"));
  options.queue_depth = 8;
  options.block_bytes = 1000;
  CHECK_THROWS_WITH(IoEngine::create(options), Catch::Contains("block size 1000"));
  TempDir dir;
  CHECK_THROWS_WITH(StripedFile::open(Env::posix(), {dir.file("missing")}, "f", OpenMode::kCreate),
                    Catch::Contains("does not exist"));
  CHECK_THROWS_WITH(StripedFile::open(Env::posix(), {dir.path()}, "f", OpenMode::kCreate, 1000),
                    Catch::Contains("stripe size 1000"));
  CHECK_THROWS_AS(StripedFile::open(Env::posix(), dir.file("absent"), OpenMode::kRead),
                  IoException);
}
