#pragma once

// A fault-injecting Env for tests (after LevelDB's and TigerBeetle's): files it opens are real
// files on a real disk, but the transfers the engine issues against them can be made to fail
// with an errno, move fewer bytes than asked, or hit a full disk.

#include <cstdint>
#include <mutex>
#include <string>
#include <vector>

#include "ferry/io.h"

namespace ferry {

class FaultInjectingEnv : public Env {
 public:
  std::unique_ptr<File> open(const std::string& path, OpenMode mode, bool try_direct) override;

  // Transfers of `op` on files whose path contains `path_part` and whose range reaches
  // `from_offset` fail with `error_number`, `times` times (-1: always).
  void fail(IoOp op, const std::string& path_part, uint64_t from_offset, int error_number,
            int times = -1);
  // Every transfer of `op` moves at most `max_bytes` (the engine must continue the rest).
  void short_transfers(IoOp op, size_t max_bytes);
  // Each file holds at most `bytes`: writes beyond fail with ENOSPC after a short write.
  void limit_capacity(uint64_t bytes);
  void clear();

  uint64_t faults_injected() const;

  // Called by the files this Env opened.
  InjectedFault decide(const std::string& path, IoOp op, uint64_t offset, size_t length);

 private:
  struct FailRule {
    IoOp op;
    std::string path_part;
    uint64_t from_offset;
    int error_number;
    int times;
  };

  mutable std::mutex mutex_;
  std::vector<FailRule> rules_;
  size_t short_read_bytes_ = SIZE_MAX;
  size_t short_write_bytes_ = SIZE_MAX;
  uint64_t capacity_bytes_ = UINT64_MAX;
  uint64_t injected_ = 0;
};

}  // namespace ferry
