#include <liburing.h>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <thread>

#include "io/backend.h"

namespace ferry::detail {
namespace {

constexpr uint64_t kStopMarker = 0;  // user_data of the NOP that ends the reaper
constexpr unsigned kFixedSlots = 64;

std::string read_sysctl(const char* path) {
  std::ifstream in(path);
  std::string value;
  in >> value;
  return value;
}

// Owns an initialised ring, so a constructor that throws after io_uring_queue_init frees it.
struct Ring {
  io_uring ring{};
  bool initialised = false;
  ~Ring() {
    if (initialised) io_uring_queue_exit(&ring);
  }
};

// Note: io_uring is single-producer on the submission side and single-consumer on the
// completion side. The scheduler's lock serialises submit(); only reaper_ touches the
// completion queue.
class UringBackend final : public IoBackend {
 public:
  explicit UringBackend(const IoOptions& options) : depth_(options.queue_depth) {
    std::string disabled = read_sysctl("/proc/sys/kernel/io_uring_disabled");
    if (disabled == "2") {
      throw BackendUnavailable{"io_uring is disabled by sysctl kernel.io_uring_disabled=2",
                               "run `sysctl -w kernel.io_uring_disabled=0` as root"};
    }
    int ret = io_uring_queue_init(depth_, &ring_, 0);
    if (ret < 0) throw unavailable(-ret, disabled);
    owner_.initialised = true;
    require_opcodes();
    // Registered buffers are optional: without a sparse table (kernel < 5.19) transfers use
    // plain reads and writes.
    int sparse = io_uring_register_buffers_sparse(&ring_, kFixedSlots);
    fixed_note_ = sparse == 0 ? "fixed buffers" : std::string("no fixed buffers (") +
                                                       std::strerror(-sparse) + ")";
    if (sparse == 0) slot_used_.assign(kFixedSlots, false);
  }

  IoBackendKind kind() const override { return IoBackendKind::kIoUring; }
  std::string describe() const override {
    return "io_uring, queue depth " + std::to_string(depth_) + ", " + fixed_note_;
  }

  void start(CompletionSink* sink) override {
    sink_ = sink;
    reaper_ = std::thread([this] { reap(); });
  }

  int submit(const std::vector<Transfer*>& batch) override {
    for (Transfer* t : batch) {
      io_uring_sqe* sqe = io_uring_get_sqe(&ring_);
      FERRY_ASSERT(sqe != nullptr, "io_uring submission queue full with ", depth_, " entries");
      bool read = t->op == IoOp::kRead;
      unsigned length = static_cast<unsigned>(t->submitted);
      if (t->fixed_slot >= 0) {
        read ? io_uring_prep_read_fixed(sqe, t->fd, t->buffer, length, t->offset, t->fixed_slot)
             : io_uring_prep_write_fixed(sqe, t->fd, t->buffer, length, t->offset, t->fixed_slot);
      } else {
        read ? io_uring_prep_read(sqe, t->fd, t->buffer, length, t->offset)
             : io_uring_prep_write(sqe, t->fd, t->buffer, length, t->offset);
      }
      io_uring_sqe_set_data(sqe, t);
    }
    return submit_all();
  }

  void stop() override {
    io_uring_sqe* sqe = io_uring_get_sqe(&ring_);
    FERRY_ASSERT(sqe != nullptr, "no submission entry for the stop marker");
    io_uring_prep_nop(sqe);
    io_uring_sqe_set_data64(sqe, kStopMarker);
    FERRY_ASSERT(submit_all() == 0, "could not submit the stop marker");
    reaper_.join();
  }

  int register_buffer(void* base, size_t bytes) override {
    for (unsigned slot = 0; slot < slot_used_.size(); ++slot) {
      if (slot_used_[slot]) continue;
      iovec region{base, bytes};
      if (io_uring_register_buffers_update_tag(&ring_, slot, &region, nullptr, 1) != 1) return -1;
      slot_used_[slot] = true;
      return static_cast<int>(slot);
    }
    return -1;
  }

  void unregister_buffer(int slot) override {
    iovec empty{nullptr, 0};
    io_uring_register_buffers_update_tag(&ring_, static_cast<unsigned>(slot), &empty, nullptr, 1);
    slot_used_[static_cast<size_t>(slot)] = false;
  }

 private:
  static BackendUnavailable unavailable(int error, const std::string& disabled) {
    switch (error) {
      case EPERM:
        return {disabled == "1" ? "io_uring is limited to a group by kernel.io_uring_disabled=1"
                                : "io_uring_setup was refused (EPERM): a seccomp filter (Docker's "
                                  "default profile) blocks it",
                disabled == "1" ? "run `sysctl -w kernel.io_uring_disabled=0` as root"
                                : "allow io_uring_setup/io_uring_enter/io_uring_register in the "
                                  "container's seccomp profile"};
      case ENOMEM:
        return {"io_uring_setup failed with ENOMEM: the locked-memory limit is too small for the "
                "ring",
                "raise it with `ulimit -l unlimited` (or LimitMEMLOCK= in systemd)"};
      case ENOSYS:
        return {"the kernel has no io_uring (ENOSYS)", "use Linux 5.6 or newer"};
      default:
        return {std::string("io_uring_setup failed: ") + std::strerror(error), ""};
    }
  }

  void require_opcodes() {
    io_uring_probe* probe = io_uring_get_probe_ring(&ring_);
    if (probe == nullptr) {
      throw BackendUnavailable{"the kernel cannot report io_uring opcodes", "use Linux 5.6 or newer"};
    }
    bool ok = true;
    for (int op : {IORING_OP_READ, IORING_OP_WRITE, IORING_OP_READ_FIXED, IORING_OP_WRITE_FIXED,
                   IORING_OP_NOP}) {
      ok = ok && io_uring_opcode_supported(probe, op);
    }
    io_uring_free_probe(probe);
    if (!ok) {
      throw BackendUnavailable{"the kernel's io_uring lacks IORING_OP_READ/WRITE",
                               "use Linux 5.6 or newer"};
    }
  }

  int submit_all() {
    while (io_uring_sq_ready(&ring_) > 0) {
      int ret = io_uring_submit(&ring_);
      if (ret == -EAGAIN || ret == -EBUSY || ret == -EINTR) {
        std::this_thread::yield();
        continue;
      }
      if (ret < 0) return ret;
    }
    return 0;
  }

  void reap() {
    for (;;) {
      io_uring_cqe* cqe = nullptr;
      int ret = io_uring_wait_cqe(&ring_, &cqe);
      if (ret == -EINTR || ret == -EAGAIN) continue;
      FERRY_ASSERT(ret == 0, "io_uring_wait_cqe failed: ", std::strerror(-ret));
      uint64_t data = io_uring_cqe_get_data64(cqe);
      int64_t result = cqe->res;
      io_uring_cqe_seen(&ring_, cqe);
      if (data == kStopMarker) return;
      sink_->complete(reinterpret_cast<Transfer*>(data), result);
    }
  }

  const unsigned depth_;
  Ring owner_;
  io_uring& ring_ = owner_.ring;
  std::string fixed_note_;
  std::vector<bool> slot_used_;
  CompletionSink* sink_ = nullptr;
  std::thread reaper_;
};

}  // namespace

std::unique_ptr<IoBackend> make_uring_backend(const IoOptions& options) {
  return std::make_unique<UringBackend>(options);
}

}  // namespace ferry::detail
