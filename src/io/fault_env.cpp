#include <cerrno>

#include "ferry/testing/io_fault.h"
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

  void sync() override {
    if (int error = env_->decide_call(EnvCall::kSync, path())) fail(error, "fdatasync");
    File::sync();
  }

  void close() override {
    if (int error = env_->decide_call(EnvCall::kClose, path())) {
      File::close();
      fail(error, "close");
    }
    File::close();
  }

 private:
  [[noreturn]] void fail(int error_number, const char* call) {
    IoError error{error_number, IoOp::kWrite, path(), 0, 0};
    error.call = call;
    throw IoException(error);
  }

  FaultInjectingEnv* env_;
};

[[noreturn]] void throw_call_error(int error_number, const std::string& path, std::string call) {
  IoError error{error_number, IoOp::kWrite, path, 0, 0};
  error.call = std::move(call);
  throw IoException(error);
}

}  // namespace

const char* to_string(EnvCall call) {
  switch (call) {
    case EnvCall::kCreate: return "create";
    case EnvCall::kSync: return "fdatasync";
    case EnvCall::kClose: return "close";
    case EnvCall::kRename: return "rename";
    case EnvCall::kSyncDirectory: return "fsync of the directory";
  }
  return "?";
}

std::unique_ptr<File> FaultInjectingEnv::open(const std::string& path, OpenMode mode,
                                              bool try_direct) {
  if (mode != OpenMode::kRead) {
    if (int error = decide_call(EnvCall::kCreate, path)) throw_call_error(error, path, "open for writing");
  }
  return std::make_unique<FaultyFile>(path, detail::open_descriptors(path, mode, try_direct), this);
}

void FaultInjectingEnv::rename(const std::string& from, const std::string& to) {
  if (int error = decide_call(EnvCall::kRename, from, to)) throw_call_error(error, from, "rename to '" + to + "'");
  Env::rename(from, to);
}

void FaultInjectingEnv::exchange(const std::string& a, const std::string& b) {
  if (int error = decide_call(EnvCall::kRename, a, b)) throw_call_error(error, a, "exchange with '" + b + "'");
  Env::exchange(a, b);
}

void FaultInjectingEnv::sync_directory(const std::string& directory) {
  if (int error = decide_call(EnvCall::kSyncDirectory, directory)) {
    throw_call_error(error, directory, "fsync of the directory");
  }
  Env::sync_directory(directory);
}

void FaultInjectingEnv::fail_call(EnvCall call, const std::string& path_part, int error_number,
                                  int times) {
  std::lock_guard<std::mutex> lock(mutex_);
  call_rules_.push_back(CallRule{call, path_part, error_number, times});
}

void FaultInjectingEnv::on_each_call(
    std::function<void(const std::string& what, const std::string& path)> hook) {
  std::lock_guard<std::mutex> lock(mutex_);
  hook_ = std::move(hook);
}

int FaultInjectingEnv::decide_call(EnvCall call, const std::string& path, const std::string& other) {
  std::function<void(const std::string&, const std::string&)> hook;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    hook = hook_;
  }
  if (hook) hook(to_string(call), path);
  std::lock_guard<std::mutex> lock(mutex_);
  for (CallRule& rule : call_rules_) {
    const bool matches = path.find(rule.path_part) != std::string::npos ||
                         (!other.empty() && other.find(rule.path_part) != std::string::npos);
    if (rule.call != call || rule.times == 0 || !matches) continue;
    if (rule.times > 0) --rule.times;
    ++injected_;
    return rule.error_number;
  }
  return 0;
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
  call_rules_.clear();
  hook_ = nullptr;
  short_read_bytes_ = short_write_bytes_ = SIZE_MAX;
  capacity_bytes_ = UINT64_MAX;
}

uint64_t FaultInjectingEnv::faults_injected() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return injected_;
}

InjectedFault FaultInjectingEnv::decide(const std::string& path, IoOp op, uint64_t offset,
                                        size_t length) {
  std::function<void(const std::string&, const std::string&)> hook;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    hook = hook_;
  }
  if (hook) hook(op == IoOp::kRead ? "read" : "write", path);
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
