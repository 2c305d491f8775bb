// Durable files through the Env: a fault at every step of a write (the write itself, a full
// disk, fdatasync, close, rename, the directory's fsync) leaves the old file whole and no
// temporary behind; the synchronous File transfers see the same faults the engine's do.

#include <catch2/catch.hpp>

#include <cerrno>
#include <fstream>
#include <sstream>

#include "ferry/fs.h"
#include "ferry/io.h"
#include "ferry/testing/io_fault.h"
#include "support/temp_dir.h"

using namespace ferry;
using ferry::testing::TempDir;

namespace {

std::string contents(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream text;
  text << in.rdbuf();
  return text.str();
}

}  // namespace

TEST_CASE("a durable write replaces the file whole, or leaves it as it was") {
  TempDir dir;
  const std::string path = dir.file("state.json");
  write_file_durably(Env::posix(), path, "old");
  REQUIRE(contents(path) == "old");
  const std::string fresh(100000, 'n');

  struct Fault {
    const char* what;
    std::function<void(FaultInjectingEnv&)> arm;
    bool replaced;  // whether the new file is in place when it fails
  };
  const std::vector<Fault> faults = {
      {"EIO on a write", [](FaultInjectingEnv& env) { env.fail(IoOp::kWrite, "state.json", 0, EIO); }, false},
      {"a full disk", [](FaultInjectingEnv& env) { env.limit_capacity(4096); }, false},
      {"fdatasync fails", [](FaultInjectingEnv& env) { env.fail_call(EnvCall::kSync, "state.json", EIO); }, false},
      {"close fails", [](FaultInjectingEnv& env) { env.fail_call(EnvCall::kClose, "state.json", EIO); }, false},
      {"the rename fails", [](FaultInjectingEnv& env) { env.fail_call(EnvCall::kRename, "state.json", EXDEV); },
       false},
      {"creating the temporary fails",
       [](FaultInjectingEnv& env) { env.fail_call(EnvCall::kCreate, "state.json", ENOSPC); }, false},
      {"the directory's fsync fails",
       [&](FaultInjectingEnv& env) { env.fail_call(EnvCall::kSyncDirectory, dir.path(), EIO); }, true},
  };
  for (const Fault& fault : faults) {
    INFO(fault.what);
    write_file_durably(Env::posix(), path, "old");
    FaultInjectingEnv env;
    fault.arm(env);
    CHECK_THROWS_AS(write_file_durably(env, path, fresh), IoException);
    CHECK(env.faults_injected() > 0);
    CHECK(contents(path) == (fault.replaced ? fresh : "old"));
    CHECK_FALSE(fs::exists(path + ".tmp"));
  }
}

TEST_CASE("a failed fdatasync names the call, the path and the errno") {
  TempDir dir;
  FaultInjectingEnv env;
  env.fail_call(EnvCall::kSync, "latest", EIO);
  CHECK_THROWS_WITH(write_file_durably(env, dir.file("latest"), "checkpoints/step-000001\n"),
                    Catch::Contains("fdatasync failed on " + dir.file("latest.tmp")) &&
                        Catch::Contains("Input/output error"));
}

TEST_CASE("a DurableFile not committed leaves nothing behind") {
  TempDir dir;
  {
    DurableFile file(Env::posix(), dir.file("shard"));
    file.append("abc", 3);
    file.append("def", 3);
    CHECK(file.written_bytes() == 6);
    CHECK(fs::exists(dir.file("shard.tmp")));
  }
  CHECK_FALSE(fs::exists(dir.file("shard.tmp")));
  CHECK_FALSE(fs::exists(dir.file("shard")));
  DurableFile file(Env::posix(), dir.file("shard"));
  file.append("abc", 3);
  file.write(10, "z", 1);
  file.commit();
  CHECK(contents(dir.file("shard")) == std::string("abc\0\0\0\0\0\0\0z", 11));
}

TEST_CASE("synchronous transfers continue short ones and report faults with the offset") {
  TempDir dir;
  FaultInjectingEnv env;
  env.short_transfers(IoOp::kWrite, 7);
  env.short_transfers(IoOp::kRead, 5);
  std::unique_ptr<File> file = env.open(dir.file("log"), OpenMode::kCreate, false);
  const std::string text = "one record, then another, then a third";
  file->write(0, text.data(), text.size());
  std::string back(text.size(), '\0');
  file->read(0, back.data(), back.size());
  CHECK(back == text);
  CHECK(env.faults_injected() > 0);

  env.fail(IoOp::kWrite, "log", 100, ENOSPC);
  try {
    file->write(96, text.data(), 10);
    FAIL("no error");
  } catch (const IoException& error) {
    CHECK(error.error().error_number == ENOSPC);
    CHECK(error.error().offset == 96);
    CHECK(error.error().path == dir.file("log"));
  }
}

TEST_CASE("every call a save makes is seen by the hook, in order") {
  TempDir dir;
  FaultInjectingEnv env;
  std::vector<std::string> calls;
  env.on_each_call([&](const std::string& what, const std::string&) { calls.push_back(what); });
  write_file_durably(env, dir.file("config.json"), "{}");
  CHECK(calls == std::vector<std::string>{"create", "write", "fdatasync", "close", "rename",
                                          "fsync of the directory"});
}
