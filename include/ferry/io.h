#pragma once

// ferry's I/O engine: large asynchronous reads and writes of aligned spans against files that
// may be striped over several directories (one per SSD). Three backends sit behind one
// interface and are chosen at run time by probing, in order: io_uring, libaio, a pread/pwrite
// thread pool. See docs/io.md.

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "ferry/check.h"

namespace ferry {

constexpr size_t kIoAlignment = 4096;  // O_DIRECT offsets, lengths and buffers align to this

enum class IoBackendKind { kIoUring, kLibaio, kThreadPool };

const char* to_string(IoBackendKind kind);
// Parses "io_uring", "libaio" or "threads"; throws ferry::Error naming the valid names.
IoBackendKind parse_io_backend(std::string_view name);

enum class IoOp { kRead, kWrite };

// The third error channel (docs/style.md, rule 3): what failed, where, and the errno behind it.
struct IoError {
  int error_number = 0;  // errno; ENODATA for a read past the end of the file
  IoOp op = IoOp::kRead;
  std::string path;
  uint64_t offset = 0;
  uint64_t length = 0;
  // For a call other than a transfer ("fsync", "close", "rename to '<path>'", "fsync of the
  // directory"): what failed; empty for a read or a write.
  std::string call = {};

  std::string to_string() const;
};

class IoException : public Error {
 public:
  explicit IoException(IoError error);
  const IoError& error() const { return error_; }

 private:
  IoError error_;
};

// Why a backend can or cannot run here, and what would fix it.
struct BackendProbe {
  IoBackendKind kind;
  bool usable = false;
  std::string reason;  // empty when usable
  std::string fix;     // empty when usable or when nothing can be done
};

struct IoOptions {
  std::optional<IoBackendKind> backend;  // force one backend; probing still explains failures
  unsigned queue_depth = 8;              // transfers in flight at once
  size_t block_bytes = size_t{1} << 20;  // large requests are split into transfers of this size
  bool direct_io = true;                 // O_DIRECT where the directory supports it
};

// ---------------------------------------------------------------------------------------------
// The Env/File seam. Every byte ferry moves to or from disk goes through a File opened by an
// Env, so tests can swap in FaultInjectingEnv (io_fault.h) and see EIO, short transfers and a
// full disk come out of the real engine.

enum class OpenMode { kRead, kReadWrite, kCreate /* read-write, created if missing */ };

// Returned by File::before_transfer: a substitute outcome for one transfer. error_number != 0
// fails the transfer with that errno and touches no disk; otherwise at most max_bytes move.
struct InjectedFault {
  int error_number = 0;
  size_t max_bytes = SIZE_MAX;
};

class File {
 public:
  File(std::string path, int direct_fd, int buffered_fd);
  virtual ~File();
  File(const File&) = delete;
  File& operator=(const File&) = delete;

  const std::string& path() const { return path_; }
  bool direct() const { return direct_fd_ >= 0; }
  // Note: both descriptors refer to the same inode. Aligned transfers use direct_fd (when
  // O_DIRECT is supported); unaligned heads and tails use buffered_fd. Linux keeps the page
  // cache coherent with O_DIRECT for non-overlapping, non-concurrent ranges, which is all the
  // engine issues for one file.
  int direct_fd() const { return direct_fd_; }
  int buffered_fd() const { return buffered_fd_; }

  uint64_t size() const;
  virtual void sync();             // fdatasync; throws IoException
  // Closes both descriptors and reports what close() reports (NFS and some FUSE filesystems
  // report a failed write-back only there); throws IoException. The destructor closes too, but
  // cannot report.
  virtual void close();
  void allocate(uint64_t bytes);   // reserves disk space up front (fallocate); throws IoException
  void truncate(uint64_t bytes);   // throws IoException

  // Synchronous transfers through the buffered descriptor, for small files and logs: every
  // byte moves (short transfers continue) or IoException says why. Faults from before_transfer
  // apply as they do to the engine's transfers.
  void write(uint64_t offset, const void* data, size_t length);
  void read(uint64_t offset, void* data, size_t length);

  virtual InjectedFault before_transfer(IoOp op, uint64_t offset, size_t length) { return {}; }

 private:
  std::string path_;
  int direct_fd_;
  int buffered_fd_;
};

class Env {
 public:
  virtual ~Env() = default;
  // Opens `path`; with try_direct, also an O_DIRECT descriptor when the directory supports it.
  // Throws IoException naming the path and errno.
  virtual std::unique_ptr<File> open(const std::string& path, OpenMode mode, bool try_direct);
  // rename(2): `to` is replaced atomically. Throws IoException naming both paths.
  virtual void rename(const std::string& from, const std::string& to);
  // Swaps two existing paths atomically (renameat2 RENAME_EXCHANGE): a directory put in place of
  // another with no moment where neither is there. Throws IoException.
  virtual void exchange(const std::string& a, const std::string& b);
  // fsync of a directory: what was created, renamed or removed in it is durable on return.
  virtual void sync_directory(const std::string& directory);

  // The process-wide POSIX Env.
  static Env& posix();
};

// `env`, or the POSIX Env when it is null.
inline Env& env_or_posix(Env* env) { return env != nullptr ? *env : Env::posix(); }

// ---------------------------------------------------------------------------------------------
// Durable files. Every file ferry writes (checkpoints, exports, trainer_state.json, `latest`,
// manifests, calibration files, traces) is written one way: into "<path>.tmp", every write and
// the close checked, fdatasync, renamed over `path`, and the directory fsynced. A crash or a
// failure at any point leaves the old file or the new one, never a torn one.

// A file being written durably. Not committed, its destructor removes the temporary.
class DurableFile {
 public:
  DurableFile(Env& env, std::string path);
  ~DurableFile();
  DurableFile(const DurableFile&) = delete;
  DurableFile& operator=(const DurableFile&) = delete;

  const std::string& path() const { return path_; }
  std::string temporary_path() const { return path_ + ".tmp"; }

  void write(uint64_t offset, const void* data, size_t length);
  void append(const void* data, size_t length);  // at the end of what was written so far
  uint64_t written_bytes() const { return end_; }
  // fdatasync, close, rename over path(), fsync of its directory. Throws IoException; the
  // temporary is removed then, and path() is as it was.
  void commit();

 private:
  Env& env_;
  std::string path_;
  std::unique_ptr<File> file_;
  uint64_t end_ = 0;
  bool committed_ = false;
};

// The whole file at once, as DurableFile writes it.
void write_file_durably(Env& env, const std::string& path, std::string_view bytes);

// Whether O_DIRECT works in `directory` (tmpfs and some overlay filesystems refuse it), found
// by opening a scratch file there. Results are cached per directory.
bool supports_direct_io(const std::string& directory);

// A logical file striped RAID-0 style over one file in each of several directories:
// stripe k (of stripe_bytes) lives in directory k % n at offset (k / n) * stripe_bytes.
class StripedFile {
 public:
  static std::unique_ptr<StripedFile> open(Env& env, const std::vector<std::string>& directories,
                                           const std::string& name, OpenMode mode,
                                           size_t stripe_bytes = size_t{1} << 20,
                                           bool try_direct = true);
  // A single file: one member, no striping.
  static std::unique_ptr<StripedFile> open(Env& env, const std::string& path, OpenMode mode,
                                           bool try_direct = true);

  size_t stripe_bytes() const { return stripe_bytes_; }
  const std::vector<std::unique_ptr<File>>& members() const { return members_; }
  bool direct() const;
  std::string describe() const;  // the member paths, for messages

  struct Piece {
    File* file;
    uint64_t file_offset;
    uint64_t logical_offset;
    size_t length;
  };
  // Splits [offset, offset + length) into per-member pieces, in logical order.
  void map(uint64_t offset, size_t length, std::vector<Piece>* pieces) const;

  void sync();  // every member

 private:
  StripedFile(std::vector<std::unique_ptr<File>> members, size_t stripe_bytes);

  std::vector<std::unique_ptr<File>> members_;
  size_t stripe_bytes_;
};

// ---------------------------------------------------------------------------------------------

namespace detail {
class IoRequest;
class IoBackend;
class IoScheduler;
}  // namespace detail

// A handle on one submitted request. Copyable; the request lives until its last ticket and
// the engine are done with it.
class IoTicket {
 public:
  IoTicket() = default;
  bool valid() const { return request_ != nullptr; }
  bool done() const;
  // Blocks until the request finished; throws IoException if it failed.
  void wait() const;
  // Blocks until the request finished; returns its error instead of throwing.
  std::optional<IoError> wait_for_result() const;

 private:
  friend class IoEngine;
  explicit IoTicket(std::shared_ptr<detail::IoRequest> request) : request_(std::move(request)) {}
  std::shared_ptr<detail::IoRequest> request_;
};

// Runs on the engine's completion thread once the whole request finished. Keep it short and
// never wait on another ticket inside it. `error` is null on success.
using IoCallback = std::function<void(const IoError* error)>;

// Statistics are plain counters, readable at any time without locks.
struct IoStats {
  uint64_t bytes_read = 0;
  uint64_t bytes_written = 0;
  uint64_t requests = 0;
  uint64_t transfers = 0;            // pieces handed to the backend
  uint64_t resubmitted = 0;          // short transfers continued
  uint64_t retried = 0;              // EAGAIN / EINTR retries
  uint64_t buffered_transfers = 0;   // unaligned pieces that bypassed O_DIRECT
  uint64_t fixed_buffer_transfers = 0;
  uint64_t failed_requests = 0;
  double busy_seconds = 0;           // wall time with at least one transfer in flight
};

class IoEngine {
 public:
  // Probes the backends in order (or only the forced one) and starts the first usable one.
  // Throws ferry::Error listing every probe's reason when a forced backend cannot run.
  static std::unique_ptr<IoEngine> create(const IoOptions& options = {});
  // Probes every backend without starting one: what `ferry` prints.
  static std::vector<BackendProbe> probe_all(const IoOptions& options = {});

  ~IoEngine();
  IoEngine(const IoEngine&) = delete;
  IoEngine& operator=(const IoEngine&) = delete;

  IoBackendKind kind() const;
  const std::vector<BackendProbe>& probes() const { return probes_; }
  const IoOptions& options() const { return options_; }
  // One line on how the backend runs (fixed buffers, queue depth), for logs.
  std::string describe() const;

  // Both return at once; the buffer must stay valid until the request is done. Many requests
  // may be in flight from many threads.
  IoTicket read(StripedFile& file, uint64_t offset, void* buffer, size_t length,
                IoCallback callback = {});
  IoTicket write(StripedFile& file, uint64_t offset, const void* buffer, size_t length,
                 IoCallback callback = {});

  // Registers [base, base + bytes) (at most 1 GiB) so transfers inside it use the backend's
  // fixed-buffer path where it has one (io_uring). Safe to call while I/O is in flight.
  void register_buffer(void* base, size_t bytes);
  void unregister_buffer(void* base);

  // Waits until every request submitted so far has finished.
  void drain();

  IoStats stats() const;

 private:
  IoEngine(IoOptions options, std::vector<BackendProbe> probes,
           std::unique_ptr<detail::IoBackend> backend);
  IoTicket submit(IoOp op, StripedFile& file, uint64_t offset, void* buffer, size_t length,
                  IoCallback callback);

  IoOptions options_;
  std::vector<BackendProbe> probes_;
  std::unique_ptr<detail::IoScheduler> scheduler_;
};

}  // namespace ferry
