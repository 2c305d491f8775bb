#include <catch2/catch.hpp>

#include <cerrno>
#include <cstring>
#include <random>

#include "ferry/io.h"
#include "ferry/testing/io_fault.h"
#include "ferry/memory.h"
#include "support/temp_dir.h"

using namespace ferry;
using ferry::testing::TempDir;

namespace {

std::unique_ptr<IoEngine> engine_for(IoBackendKind kind) {
  IoOptions options;
  options.backend = kind;
  options.queue_depth = 4;
  options.block_bytes = 64 << 10;
  return IoEngine::create(options);
}

std::vector<char> pattern(size_t count) {
  std::vector<char> bytes(count);
  for (size_t i = 0; i < count; ++i) bytes[i] = static_cast<char>(i * 131 + 7);
  return bytes;
}

}  // namespace

TEST_CASE("an injected EIO reaches the caller with errno, path, offset and length") {
  IoBackendKind kind = GENERATE(IoBackendKind::kIoUring, IoBackendKind::kLibaio,
                                IoBackendKind::kThreadPool);
  INFO("backend " << to_string(kind));
  auto engine = engine_for(kind);
  TempDir dir;
  FaultInjectingEnv env;
  auto file = StripedFile::open(env, {dir.subdir("a"), dir.subdir("b")}, "states",
                                OpenMode::kCreate, 64 << 10);
  std::vector<char> data = pattern(512 << 10);
  engine->write(*file, 0, data.data(), data.size()).wait();

  env.fail(IoOp::kRead, "/b/states", 64 << 10, EIO);
  std::vector<char> back(data.size());
  std::optional<IoError> error = engine->read(*file, 0, back.data(), back.size()).wait_for_result();
  REQUIRE(error.has_value());
  CHECK(error->error_number == EIO);
  CHECK(error->op == IoOp::kRead);
  CHECK(error->path == dir.subdir("b") + "/states");
  CHECK(error->offset >= (64 << 10));
  CHECK(error->length > 0);
  CHECK_THROWS_WITH(engine->read(*file, 0, back.data(), back.size()).wait(),
                    Catch::Contains("Input/output error") && Catch::Contains("/b/states") &&
                        Catch::Contains("offset"));
  CHECK(engine->stats().failed_requests == 2);

  // Once the fault is gone, the same engine and file work again.
  env.clear();
  engine->read(*file, 0, back.data(), back.size()).wait();
  CHECK(back == data);
}

TEST_CASE("short transfers are continued until every byte moved") {
  IoBackendKind kind = GENERATE(IoBackendKind::kIoUring, IoBackendKind::kLibaio,
                                IoBackendKind::kThreadPool);
  INFO("backend " << to_string(kind));
  auto engine = engine_for(kind);
  TempDir dir;
  FaultInjectingEnv env;
  HostArena arena({.budget_bytes = 8 << 20, .chunk_bytes = 4 << 20});
  auto file = StripedFile::open(env, dir.file("short"), OpenMode::kCreate);

  env.short_transfers(IoOp::kWrite, 4096 + 100);
  env.short_transfers(IoOp::kRead, 3 * 4096);
  const size_t size = (1 << 20) + 1234;
  std::vector<char> data = pattern(size);
  HostBlock out = arena.allocate(size);
  HostBlock in = arena.allocate(size);
  std::memcpy(out.data(), data.data(), size);
  engine->write(*file, 0, out.data(), size).wait();
  engine->read(*file, 0, in.data(), size).wait();
  CHECK(std::memcmp(in.data(), data.data(), size) == 0);
  CHECK(env.faults_injected() > 0);
  CHECK(engine->stats().resubmitted > 0);
}

TEST_CASE("a full disk fails the write with ENOSPC") {
  IoBackendKind kind = GENERATE(IoBackendKind::kIoUring, IoBackendKind::kLibaio,
                                IoBackendKind::kThreadPool);
  INFO("backend " << to_string(kind));
  auto engine = engine_for(kind);
  TempDir dir;
  FaultInjectingEnv env;
  env.limit_capacity(256 << 10);
  auto file = StripedFile::open(env, dir.file("full"), OpenMode::kCreate);
  std::vector<char> data = pattern(1 << 20);
  std::optional<IoError> error = engine->write(*file, 0, data.data(), data.size()).wait_for_result();
  REQUIRE(error.has_value());
  CHECK(error->error_number == ENOSPC);
  CHECK(error->op == IoOp::kWrite);
  CHECK(error->path == dir.file("full"));
  CHECK(error->offset >= (256 << 10));

  // What fits still writes.
  engine->write(*file, 0, data.data(), 256 << 10).wait();
}

TEST_CASE("a transient fault is retried away only when it is EAGAIN") {
  auto engine = engine_for(IoBackendKind::kThreadPool);
  TempDir dir;
  FaultInjectingEnv env;
  auto file = StripedFile::open(env, dir.file("again"), OpenMode::kCreate);
  std::vector<char> data = pattern(200 << 10);
  env.fail(IoOp::kWrite, "again", 0, EAGAIN, 3);
  engine->write(*file, 0, data.data(), data.size()).wait();
  CHECK(engine->stats().retried == 3);

  env.fail(IoOp::kWrite, "again", 0, EAGAIN);  // forever: gives up with EAGAIN
  std::optional<IoError> error = engine->write(*file, 0, data.data(), data.size()).wait_for_result();
  REQUIRE(error.has_value());
  CHECK(error->error_number == EAGAIN);
}
