#include <cerrno>

#include "ferry/io_fault.h"
#include "io/descriptors.h"

namespace ferry {
namespace {

class FaultyFile final : public File {
 public:
  FaultyFile(std::string path, detail::FileDescriptors fds, FaultInjectingEnv* env)
      : File(std::move(path), fds.direct, fds.buffered), env_(env) {}

  InjectedFault before_transfer(IoOp op, uint64_t offset, size_t length) override {
    return env_->decide(path(), op, offset, length);
  }

 private:
  FaultInjectingEnv* env_;
};

}  // namespace

std::unique_ptr<File> FaultInjectingEnv::open(const std::string& path, OpenMode mode,
                                              bool try_direct) {
  return std::make_unique<FaultyFile>(path, detail::open_descriptors(path, mode, try_direct), this);
}

void FaultInjectingEnv::fail(IoOp op, const std::string& path_part, uint64_t from_offset,
                             int error_number, int times) {
  std::lock_guard<std::mutex> lock(mutex_);
  rules_.push_back(FailRule{op, path_part, from_offset, error_number, times});
}

void FaultInjectingEnv::short_transfers(IoOp op, size_t max_bytes) {
  std::lock_guard<std::mutex> lock(mutex_);
  (op == IoOp::kRead ? short_read_bytes_ : short_write_bytes_) = max_bytes;
}

void FaultInjectingEnv::limit_capacity(uint64_t bytes) {
  std::lock_guard<std::mutex> lock(mutex_);
  capacity_bytes_ = bytes;
}

void FaultInjectingEnv::clear() {
  std::lock_guard<std::mutex> lock(mutex_);
  rules_.clear();
  short_read_bytes_ = short_write_bytes_ = SIZE_MAX;
  capacity_bytes_ = UINT64_MAX;
}

uint64_t FaultInjectingEnv::faults_injected() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return injected_;
}

InjectedFault FaultInjectingEnv::decide(const std::string& path, IoOp op, uint64_t offset,
                                        size_t length) {
  std::lock_guard<std::mutex> lock(mutex_);
  for (FailRule& rule : rules_) {
    if (rule.op != op || rule.times == 0 || path.find(rule.path_part) == std::string::npos ||
        offset + length <= rule.from_offset) {
      continue;
    }
    if (rule.times > 0) --rule.times;
    ++injected_;
    return InjectedFault{rule.error_number};
  }
  InjectedFault fault;
  if (op == IoOp::kWrite && offset + length > capacity_bytes_) {
    ++injected_;
    if (offset >= capacity_bytes_) return InjectedFault{ENOSPC};
    fault.max_bytes = static_cast<size_t>(capacity_bytes_ - offset);
  }
  size_t short_bytes = op == IoOp::kRead ? short_read_bytes_ : short_write_bytes_;
  if (short_bytes < length && short_bytes < fault.max_bytes) {
    ++injected_;
    fault.max_bytes = short_bytes;
  }
  return fault;
}

}  // namespace ferry
