#include <libaio.h>

#include <atomic>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <thread>

#include "io/backend.h"

namespace ferry::detail {
namespace {

struct Context {
  io_context_t handle = nullptr;
  ~Context() {
    if (handle != nullptr) io_destroy(handle);
  }
};

// Note: one iocb per transfer, owned by the backend from io_submit until its event is reaped.
struct AioOp {
  iocb control;
  Transfer* transfer;
};

class AioBackend final : public IoBackend {
 public:
  explicit AioBackend(const IoOptions& options) : depth_(options.queue_depth) {
    int ret = io_setup(static_cast<int>(depth_), &context_.handle);
    if (ret < 0) throw unavailable(-ret);
  }

  IoBackendKind kind() const override { return IoBackendKind::kLibaio; }
  std::string describe() const override {
    return "libaio, queue depth " + std::to_string(depth_);
  }

  void start(CompletionSink* sink) override {
    sink_ = sink;
    reaper_ = std::thread([this] { reap(); });
  }

  int submit(const std::vector<Transfer*>& batch) override {
    std::vector<iocb*> controls;
    controls.reserve(batch.size());
    for (Transfer* t : batch) {
      auto op = std::make_unique<AioOp>();
      op->transfer = t;
      t->op == IoOp::kRead
          ? io_prep_pread(&op->control, t->fd, t->buffer, t->submitted, static_cast<long long>(t->offset))
          : io_prep_pwrite(&op->control, t->fd, t->buffer, t->submitted, static_cast<long long>(t->offset));
      op->control.data = op.get();
      controls.push_back(&op.release()->control);
    }
    size_t submitted = 0;
    while (submitted < controls.size()) {
      int ret = io_submit(context_.handle, static_cast<long>(controls.size() - submitted),
                          controls.data() + submitted);
      if (ret == -EAGAIN || ret == -EINTR) {
        std::this_thread::yield();
        continue;
      }
      if (ret < 0) {
        // io_submit fails part-way only on EFAULT or EINVAL for one iocb: a bug, not I/O.
        FERRY_ASSERT(submitted == 0, "io_submit failed part-way through a batch: ",
                     std::strerror(-ret));
        for (iocb* control : controls) {
          std::unique_ptr<AioOp> reclaimed(static_cast<AioOp*>(control->data));
        }
        return ret;
      }
      submitted += static_cast<size_t>(ret);
    }
    return 0;
  }

  void stop() override {
    stopping_.store(true, std::memory_order_release);
    reaper_.join();
  }

 private:
  static BackendUnavailable unavailable(int error) {
    switch (error) {
      case EAGAIN: {
        std::ifstream max_file("/proc/sys/fs/aio-max-nr");
        std::string max;
        max_file >> max;
        return {"io_setup failed with EAGAIN: fs.aio-max-nr (" + max + ") is exhausted",
                "raise it with `sysctl -w fs.aio-max-nr=1048576`"};
      }
      case ENOSYS:
        return {"the kernel has no native AIO (ENOSYS)", "build the kernel with CONFIG_AIO=y"};
      case EPERM:
        return {"io_setup was refused (EPERM): a seccomp filter blocks it",
                "allow io_setup/io_submit/io_getevents in the seccomp profile"};
      default:
        return {std::string("io_setup failed: ") + std::strerror(error), ""};
    }
  }

  void reap() {
    std::vector<io_event> events(depth_);
    timespec timeout{0, 20 * 1000 * 1000};
    while (!stopping_.load(std::memory_order_acquire)) {
      int ret = io_getevents(context_.handle, 1, static_cast<long>(depth_), events.data(), &timeout);
      if (ret == -EINTR) continue;
      FERRY_ASSERT(ret >= 0, "io_getevents failed: ", std::strerror(-ret));
      for (int i = 0; i < ret; ++i) {
        std::unique_ptr<AioOp> op(static_cast<AioOp*>(events[i].data));
        // res holds bytes moved, or -errno, in an unsigned long.
        sink_->complete(op->transfer, static_cast<int64_t>(static_cast<long>(events[i].res)));
      }
    }
  }

  const unsigned depth_;
  Context context_;
  CompletionSink* sink_ = nullptr;
  std::atomic<bool> stopping_{false};
  std::thread reaper_;
};

}  // namespace

std::unique_ptr<IoBackend> make_aio_backend(const IoOptions& options) {
  return std::make_unique<AioBackend>(options);
}

}  // namespace ferry::detail
