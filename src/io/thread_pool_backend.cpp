#include <tbb/concurrent_queue.h>
#include <unistd.h>

#include <cerrno>
#include <thread>

#include "io/backend.h"

namespace ferry::detail {
namespace {

// Note: blocking pread/pwrite run on plain threads fed by oneTBB's bounded queue, not as TBB
// tasks: a task blocked in a syscall holds a worker that the CPU optimizer's parallel_for
// needs, and TBB's arena concurrency is capped at the core count, which would cap the queue
// depth too.
class ThreadPoolBackend final : public IoBackend {
 public:
  explicit ThreadPoolBackend(const IoOptions& options) : depth_(options.queue_depth) {}

  IoBackendKind kind() const override { return IoBackendKind::kThreadPool; }
  std::string describe() const override {
    return "pread/pwrite pool, " + std::to_string(depth_) + " threads";
  }

  void start(CompletionSink* sink) override {
    for (unsigned i = 0; i < depth_; ++i) {
      workers_.emplace_back([this, sink] { work(sink); });
    }
  }

  int submit(const std::vector<Transfer*>& batch) override {
    for (Transfer* transfer : batch) queue_.push(transfer);
    return 0;
  }

  void stop() override {
    for (size_t i = 0; i < workers_.size(); ++i) queue_.push(nullptr);
    for (std::thread& worker : workers_) worker.join();
  }

 private:
  void work(CompletionSink* sink) {
    for (;;) {
      Transfer* t = nullptr;
      queue_.pop(t);
      if (t == nullptr) return;
      ssize_t moved = t->op == IoOp::kRead
                          ? ::pread(t->fd, t->buffer, t->submitted, static_cast<off_t>(t->offset))
                          : ::pwrite(t->fd, t->buffer, t->submitted, static_cast<off_t>(t->offset));
      sink->complete(t, moved >= 0 ? static_cast<int64_t>(moved) : -int64_t{errno});
    }
  }

  const unsigned depth_;
  tbb::concurrent_bounded_queue<Transfer*> queue_;
  std::vector<std::thread> workers_;
};

}  // namespace

std::unique_ptr<IoBackend> make_thread_pool_backend(const IoOptions& options) {
  return std::make_unique<ThreadPoolBackend>(options);
}

}  // namespace ferry::detail
