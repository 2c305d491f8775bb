#include <iostream>
#include <mutex>

#include "ferry/io.h"
#include "io/backend.h"
#include "io/scheduler.h"

namespace ferry {
namespace {

constexpr IoBackendKind kProbeOrder[] = {IoBackendKind::kIoUring, IoBackendKind::kLibaio,
                                         IoBackendKind::kThreadPool};

void validate(const IoOptions& options) {
  FERRY_CHECK(options.queue_depth >= 1 && options.queue_depth <= 4096, "I/O queue depth ",
              options.queue_depth, " is out of range: use 1 to 4096");
  FERRY_CHECK(options.block_bytes >= kIoAlignment && options.block_bytes % kIoAlignment == 0 &&
                  options.block_bytes <= (size_t{1} << 30),
              "I/O block size ", options.block_bytes, " bytes is invalid: use a multiple of ",
              kIoAlignment, " up to 1 GiB");
}

std::unique_ptr<detail::IoBackend> make_backend(IoBackendKind kind, const IoOptions& options) {
  switch (kind) {
    case IoBackendKind::kIoUring: return detail::make_uring_backend(options);
    case IoBackendKind::kLibaio: return detail::make_aio_backend(options);
    case IoBackendKind::kThreadPool: return detail::make_thread_pool_backend(options);
  }
  FERRY_ASSERT(false, "unknown backend kind");
  return nullptr;
}

// Tries one backend; fills the probe and returns the backend if it can run.
std::unique_ptr<detail::IoBackend> try_backend(IoBackendKind kind, const IoOptions& options,
                                               BackendProbe* probe) {
  probe->kind = kind;
  try {
    auto backend = make_backend(kind, options);
    probe->usable = true;
    return backend;
  } catch (const detail::BackendUnavailable& unavailable) {
    probe->reason = unavailable.reason;
    probe->fix = unavailable.fix;
    return nullptr;
  }
}

void log_choice_once(const detail::IoBackend& backend, const std::vector<BackendProbe>& probes) {
  static std::once_flag logged;
  std::call_once(logged, [&] {
    std::cerr << "[ferry] I/O backend: " << backend.describe() << "\n";
    for (const BackendProbe& probe : probes) {
      if (probe.usable) continue;
      std::cerr << "[ferry]   skipped " << to_string(probe.kind) << ": " << probe.reason
                << (probe.fix.empty() ? "" : "; fix: " + probe.fix) << "\n";
    }
  });
}

}  // namespace

std::vector<BackendProbe> IoEngine::probe_all(const IoOptions& options) {
  validate(options);
  std::vector<BackendProbe> probes;
  for (IoBackendKind kind : kProbeOrder) {
    BackendProbe probe;
    try_backend(kind, options, &probe);
    probes.push_back(std::move(probe));
  }
  return probes;
}

std::unique_ptr<IoEngine> IoEngine::create(const IoOptions& options) {
  validate(options);
  std::vector<BackendProbe> probes;
  std::unique_ptr<detail::IoBackend> chosen;
  for (IoBackendKind kind : kProbeOrder) {
    if (options.backend && *options.backend != kind) continue;
    BackendProbe probe;
    chosen = try_backend(kind, options, &probe);
    probes.push_back(std::move(probe));
    if (chosen) break;
  }
  if (!chosen) {
    const BackendProbe& failed = probes.back();
    throw Error(detail::concat("the forced I/O backend ", to_string(failed.kind),
                               " cannot run here: ", failed.reason,
                               failed.fix.empty() ? "" : "; fix: " + failed.fix,
                               "; or choose another backend (io_uring, libaio, threads)"));
  }
  if (!options.backend) log_choice_once(*chosen, probes);
  return std::unique_ptr<IoEngine>(new IoEngine(options, std::move(probes), std::move(chosen)));
}

IoEngine::IoEngine(IoOptions options, std::vector<BackendProbe> probes,
                   std::unique_ptr<detail::IoBackend> backend)
    : options_(std::move(options)),
      probes_(std::move(probes)),
      scheduler_(std::make_unique<detail::IoScheduler>(options_, std::move(backend))) {}

IoEngine::~IoEngine() = default;

IoBackendKind IoEngine::kind() const { return scheduler_->backend().kind(); }

std::string IoEngine::describe() const { return scheduler_->backend().describe(); }

IoTicket IoEngine::read(StripedFile& file, uint64_t offset, void* buffer, size_t length,
                        IoCallback callback) {
  return submit(IoOp::kRead, file, offset, buffer, length, std::move(callback));
}

IoTicket IoEngine::write(StripedFile& file, uint64_t offset, const void* buffer, size_t length,
                         IoCallback callback) {
  // The buffer is only read from; the scheduler's transfers carry one pointer type.
  return submit(IoOp::kWrite, file, offset, const_cast<void*>(buffer), length,
                std::move(callback));
}

IoTicket IoEngine::submit(IoOp op, StripedFile& file, uint64_t offset, void* buffer,
                          size_t length, IoCallback callback) {
  return IoTicket(scheduler_->submit(op, file, offset, static_cast<char*>(buffer), length,
                                     std::move(callback)));
}

void IoEngine::register_buffer(void* base, size_t bytes) {
  scheduler_->register_buffer(base, bytes);
}

void IoEngine::unregister_buffer(void* base) { scheduler_->unregister_buffer(base); }

void IoEngine::drain() { scheduler_->drain(); }

IoStats IoEngine::stats() const { return scheduler_->stats(); }

bool IoTicket::done() const { return request_ == nullptr || request_->done(); }

void IoTicket::wait() const {
  if (auto error = wait_for_result()) throw IoException(std::move(*error));
}

std::optional<IoError> IoTicket::wait_for_result() const {
  FERRY_CHECK(request_ != nullptr, "waiting on an empty IoTicket");
  return request_->wait();
}

}  // namespace ferry
