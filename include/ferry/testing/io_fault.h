#pragma once

// A fault-injecting Env for tests (after LevelDB's and TigerBeetle's): files it opens are real
// files on a real disk, but the transfers the engine issues against them can be made to fail
// with an errno, move fewer bytes than asked, or hit a full disk, and so can the calls around
// them (open, fdatasync, close, rename, the directory's fsync).

#include <cstdint>
#include <functional>
#include <mutex>
#include <string>
#include <vector>

#include "ferry/io.h"

namespace ferry {

// The calls of an Env and its files other than transfers.
enum class EnvCall { kCreate, kSync, kClose, kRename, kSyncDirectory };
const char* to_string(EnvCall call);

class FaultInjectingEnv : public Env {
 public:
  std::unique_ptr<File> open(const std::string& path, OpenMode mode, bool try_direct) override;
  void rename(const std::string& from, const std::string& to) override;
  void exchange(const std::string& a, const std::string& b) override;
  void sync_directory(const std::string& directory) override;

  // Transfers of `op` on files whose path contains `path_part` and whose range reaches
  // `from_offset` fail with `error_number`, `times` times (-1: always).
  void fail(IoOp op, const std::string& path_part, uint64_t from_offset, int error_number,
            int times = -1);
  // Every transfer of `op` moves at most `max_bytes` (the engine must continue the rest).
  void short_transfers(IoOp op, size_t max_bytes);
  // Each file holds at most `bytes`: writes beyond fail with ENOSPC after a short write.
  void limit_capacity(uint64_t bytes);
  // `call` on a path containing `path_part` fails with `error_number`, `times` times (-1:
  // always). kCreate: opening a file for writing; kRename: the source or the target of a
  // rename or an exchange; kSyncDirectory: the directory's path.
  void fail_call(EnvCall call, const std::string& path_part, int error_number, int times = -1);
  // Called before every transfer and every call above, with what it is ("write", "read", or
  // to_string(call)) and the path, before any fault is decided: a test may count them, or end
  // the process there (a crash at an exact point of a save).
  void on_each_call(std::function<void(const std::string& what, const std::string& path)> hook);
  void clear();

  uint64_t faults_injected() const;

  // Called by the files this Env opened.
  InjectedFault decide(const std::string& path, IoOp op, uint64_t offset, size_t length);
  // 0, or the errno `call` on `path` (and `other`, a rename's target) fails with.
  int decide_call(EnvCall call, const std::string& path, const std::string& other = "");

 private:
  struct CallRule {
    EnvCall call;
    std::string path_part;
    int error_number;
    int times;
  };

  struct FailRule {
    IoOp op;
    std::string path_part;
    uint64_t from_offset;
    int error_number;
    int times;
  };

  mutable std::mutex mutex_;
  std::vector<FailRule> rules_;
  std::vector<CallRule> call_rules_;
  std::function<void(const std::string&, const std::string&)> hook_;
  size_t short_read_bytes_ = SIZE_MAX;
  size_t short_write_bytes_ = SIZE_MAX;
  uint64_t capacity_bytes_ = UINT64_MAX;
  uint64_t injected_ = 0;
};

}  // namespace ferry
