#include "io/scheduler.h"

#include <algorithm>
#include <cerrno>

namespace ferry::detail {
namespace {

constexpr int kMaxRetries = 64;
constexpr size_t kMaxRegisteredBytes = size_t{1} << 30;  // io_uring's limit for one fixed buffer
// A transfer whose request failed earlier ends without I/O.
constexpr int64_t kCancelled = INT64_MIN;

bool aligned(uint64_t value) { return value % kIoAlignment == 0; }
bool aligned(const char* pointer) { return aligned(reinterpret_cast<uintptr_t>(pointer)); }

}  // namespace

std::optional<IoError> IoRequest::wait() {
  if (!done()) {
    std::unique_lock<std::mutex> lock(done_mutex_);
    done_signal_.wait(lock, [this] { return done(); });
  }
  return error_;
}

void IoRequest::finish() {
  if (callback_) callback_(error_ ? &*error_ : nullptr);
  {
    std::lock_guard<std::mutex> lock(done_mutex_);
    done_.store(true, std::memory_order_release);
  }
  done_signal_.notify_all();
}

IoScheduler::IoScheduler(const IoOptions& options, std::unique_ptr<IoBackend> backend)
    : options_(options), backend_(std::move(backend)) {
  backend_->start(this);
}

IoScheduler::~IoScheduler() {
  drain();
  backend_->stop();
}

std::shared_ptr<IoRequest> IoScheduler::submit(IoOp op, StripedFile& file, uint64_t offset,
                                               char* buffer, size_t length, IoCallback callback) {
  auto request = std::make_shared<IoRequest>(op, std::move(callback));
  requests_.fetch_add(1, std::memory_order_relaxed);
  std::vector<Outcome> outcomes;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    split(request.get(), file, offset, buffer, length);
    if (!request->transfers_.empty()) {
      request->unfinished_ = request->transfers_.size();
      live_.emplace(request.get(), request);
      for (auto& transfer : request->transfers_) queued_.push_back(transfer.get());
      pump_locked(&outcomes);
    }
  }
  if (request->transfers_.empty()) request->finish();
  settle(std::move(outcomes));
  return request;
}

void IoScheduler::split(IoRequest* request, StripedFile& file, uint64_t offset, char* buffer,
                        size_t length) {
  std::vector<StripedFile::Piece> pieces;
  file.map(offset, length, &pieces);
  for (const StripedFile::Piece& piece : pieces) {
    char* piece_buffer = buffer + (piece.logical_offset - offset);
    for (size_t done = 0; done < piece.length;) {
      size_t chunk = std::min(options_.block_bytes, piece.length - done);
      uint64_t file_offset = piece.file_offset + done;
      char* chunk_buffer = piece_buffer + done;
      bool direct = piece.file->direct() && aligned(file_offset) && aligned(chunk_buffer);
      size_t direct_length = direct ? chunk / kIoAlignment * kIoAlignment : 0;
      if (direct_length > 0) {
        add_transfer(request, piece.file, file_offset, chunk_buffer, direct_length, true);
      }
      if (chunk > direct_length) {
        add_transfer(request, piece.file, file_offset + direct_length,
                     chunk_buffer + direct_length, chunk - direct_length, false);
      }
      done += chunk;
    }
  }
}

void IoScheduler::add_transfer(IoRequest* request, File* file, uint64_t offset, char* buffer,
                               size_t length, bool direct) {
  auto transfer = std::make_unique<Transfer>();
  transfer->request = request;
  transfer->op = request->op_;
  transfer->file = file;
  transfer->fd = direct ? file->direct_fd() : file->buffered_fd();
  transfer->offset = offset;
  transfer->buffer = buffer;
  transfer->length = length;
  transfer->fixed_slot = fixed_slot_locked(buffer, length);
  if (!direct) buffered_transfers_.fetch_add(1, std::memory_order_relaxed);
  if (transfer->fixed_slot >= 0) fixed_buffer_transfers_.fetch_add(1, std::memory_order_relaxed);
  request->transfers_.push_back(std::move(transfer));
}

int IoScheduler::fixed_slot_locked(const char* buffer, size_t length) const {
  auto after = std::upper_bound(regions_.begin(), regions_.end(), buffer,
                                [](const char* b, const Region& r) { return b < r.base; });
  if (after == regions_.begin()) return -1;
  const Region& region = *std::prev(after);
  return buffer + length <= region.base + region.bytes ? region.slot : -1;
}

bool IoScheduler::prepare_locked(Transfer* transfer, std::vector<Outcome>* outcomes) {
  if (transfer->request->error_) {
    outcomes->push_back({transfer, kCancelled});
    return false;
  }
  InjectedFault fault = transfer->file->before_transfer(transfer->op, transfer->offset,
                                                        transfer->length);
  if (fault.error_number != 0) {
    outcomes->push_back({transfer, -int64_t{fault.error_number}});
    return false;
  }
  size_t bytes = std::min(transfer->length, fault.max_bytes);
  if (transfer->fd == transfer->file->direct_fd()) {
    // Note: after a short transfer the rest may no longer be aligned for O_DIRECT; it then
    // continues through the buffered descriptor of the same file.
    size_t direct_bytes = bytes / kIoAlignment * kIoAlignment;
    if (direct_bytes == 0 || !aligned(transfer->offset) || !aligned(transfer->buffer)) {
      transfer->fd = transfer->file->buffered_fd();
      buffered_transfers_.fetch_add(1, std::memory_order_relaxed);
    } else {
      bytes = direct_bytes;
    }
  }
  transfer->submitted = bytes;
  return true;
}

void IoScheduler::pump_locked(std::vector<Outcome>* outcomes) {
  std::vector<Transfer*> batch;
  while (in_flight_ < options_.queue_depth && !queued_.empty()) {
    Transfer* transfer = queued_.front();
    queued_.pop_front();
    note_in_flight_locked(+1);
    if (prepare_locked(transfer, outcomes)) batch.push_back(transfer);
  }
  if (batch.empty()) return;
  transfers_.fetch_add(batch.size(), std::memory_order_relaxed);
  int error = backend_->submit(batch);
  if (error < 0) {
    for (Transfer* transfer : batch) outcomes->push_back({transfer, error});
  }
}

void IoScheduler::complete(Transfer* transfer, int64_t result) {
  settle({Outcome{transfer, result}});
}

void IoScheduler::settle(std::vector<Outcome> outcomes) {
  while (!outcomes.empty()) {
    std::vector<std::shared_ptr<IoRequest>> finished;
    std::vector<Outcome> next;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      for (const Outcome& outcome : outcomes) {
        if (auto request = apply_locked(outcome)) finished.push_back(std::move(request));
      }
      pump_locked(&next);
    }
    for (auto& request : finished) {
      request->finish();
      std::lock_guard<std::mutex> lock(mutex_);
      if (--finishing_ == 0 && live_.empty()) idle_.notify_all();
    }
    outcomes = std::move(next);
  }
}

std::shared_ptr<IoRequest> IoScheduler::apply_locked(const Outcome& outcome) {
  Transfer* transfer = outcome.transfer;
  int64_t result = outcome.result;
  note_in_flight_locked(-1);
  if (result == kCancelled) return retire_locked(transfer, std::nullopt);
  if ((result == -EAGAIN || result == -EINTR) && transfer->retries < kMaxRetries) {
    ++transfer->retries;
    retried_.fetch_add(1, std::memory_order_relaxed);
    queued_.push_front(transfer);
    return nullptr;
  }
  if (result <= 0) {
    // A read that returns 0 bytes hit the end of the file: fail, never zero-fill.
    int error_number = result < 0 ? static_cast<int>(-result)
                                  : (transfer->op == IoOp::kRead ? ENODATA : EIO);
    return retire_locked(transfer, IoError{error_number, transfer->op, transfer->file->path(),
                                           transfer->offset, transfer->length});
  }
  size_t moved = static_cast<size_t>(result);
  FERRY_ASSERT(moved <= transfer->submitted, "backend moved more bytes than submitted");
  (transfer->op == IoOp::kRead ? bytes_read_ : bytes_written_)
      .fetch_add(moved, std::memory_order_relaxed);
  transfer->offset += moved;
  transfer->buffer += moved;
  transfer->length -= moved;
  if (transfer->length == 0) return retire_locked(transfer, std::nullopt);
  resubmitted_.fetch_add(1, std::memory_order_relaxed);
  queued_.push_front(transfer);
  return nullptr;
}

std::shared_ptr<IoRequest> IoScheduler::retire_locked(Transfer* transfer,
                                                      std::optional<IoError> error) {
  IoRequest* request = transfer->request;
  if (error && !request->error_) request->error_ = std::move(error);
  if (--request->unfinished_ > 0) return nullptr;
  auto found = live_.find(request);
  FERRY_ASSERT(found != live_.end(), "a finished request was not live");
  std::shared_ptr<IoRequest> finished = std::move(found->second);
  live_.erase(found);
  ++finishing_;
  if (finished->error_) failed_requests_.fetch_add(1, std::memory_order_relaxed);
  return finished;
}

void IoScheduler::note_in_flight_locked(int delta) {
  auto now = std::chrono::steady_clock::now();
  if (in_flight_ == 0 && delta > 0) busy_since_ = now;
  in_flight_ += delta;
  if (in_flight_ == 0) {
    double busy = std::chrono::duration<double>(now - busy_since_).count();
    busy_seconds_.store(busy_seconds_.load(std::memory_order_relaxed) + busy,
                        std::memory_order_relaxed);
  }
}

void IoScheduler::drain() {
  std::unique_lock<std::mutex> lock(mutex_);
  idle_.wait(lock, [this] { return live_.empty() && finishing_ == 0; });
}

void IoScheduler::register_buffer(void* base, size_t bytes) {
  FERRY_CHECK(bytes > 0 && bytes <= kMaxRegisteredBytes, "a registered I/O buffer must hold 1 byte to 1 GiB; got ",
              bytes, " bytes");
  std::lock_guard<std::mutex> lock(mutex_);
  int slot = backend_->register_buffer(base, bytes);
  if (slot < 0) return;
  Region region{static_cast<char*>(base), bytes, slot};
  auto at = std::upper_bound(regions_.begin(), regions_.end(), region.base,
                             [](const char* b, const Region& r) { return b < r.base; });
  regions_.insert(at, region);
}

void IoScheduler::unregister_buffer(void* base) {
  std::lock_guard<std::mutex> lock(mutex_);
  auto found = std::find_if(regions_.begin(), regions_.end(),
                            [base](const Region& r) { return r.base == base; });
  if (found == regions_.end()) return;
  backend_->unregister_buffer(found->slot);
  regions_.erase(found);
}

IoStats IoScheduler::stats() const {
  IoStats stats;
  stats.bytes_read = bytes_read_.load(std::memory_order_relaxed);
  stats.bytes_written = bytes_written_.load(std::memory_order_relaxed);
  stats.requests = requests_.load(std::memory_order_relaxed);
  stats.transfers = transfers_.load(std::memory_order_relaxed);
  stats.resubmitted = resubmitted_.load(std::memory_order_relaxed);
  stats.retried = retried_.load(std::memory_order_relaxed);
  stats.buffered_transfers = buffered_transfers_.load(std::memory_order_relaxed);
  stats.fixed_buffer_transfers = fixed_buffer_transfers_.load(std::memory_order_relaxed);
  stats.failed_requests = failed_requests_.load(std::memory_order_relaxed);
  stats.busy_seconds = busy_seconds_.load(std::memory_order_relaxed);
  return stats;
}

}  // namespace ferry::detail
