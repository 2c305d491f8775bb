#include <fcntl.h>
#include <linux/fs.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <algorithm>
#include <map>
#include <mutex>

#include "ferry/io.h"
#include "io/descriptors.h"
#include "ferry/fs.h"

namespace ferry {
namespace {

IoError whole_file_error(int error_number, IoOp op, const std::string& path, uint64_t length = 0) {
  return IoError{error_number, op, path, 0, length};
}

IoError call_error(int error_number, const std::string& path, std::string call) {
  IoError error{error_number, IoOp::kWrite, path, 0, 0};
  error.call = std::move(call);
  return error;
}

}  // namespace

namespace detail {

FileDescriptors open_descriptors(const std::string& path, OpenMode mode, bool try_direct) {
  int flags = O_CLOEXEC;
  switch (mode) {
    case OpenMode::kRead: flags |= O_RDONLY; break;
    case OpenMode::kReadWrite: flags |= O_RDWR; break;
    case OpenMode::kCreate: flags |= O_RDWR | O_CREAT; break;
  }
  FileDescriptors fds;
  fds.buffered = ::open(path.c_str(), flags, 0644);
  if (fds.buffered < 0) {
    throw IoException(whole_file_error(errno, mode == OpenMode::kRead ? IoOp::kRead : IoOp::kWrite,
                                       path));
  }
  if (try_direct && supports_direct_io(fs::parent_directory(path))) {
    fds.direct = ::open(path.c_str(), (flags & ~O_CREAT) | O_DIRECT);
  }
  return fds;
}

}  // namespace detail

File::File(std::string path, int direct_fd, int buffered_fd)
    : path_(std::move(path)), direct_fd_(direct_fd), buffered_fd_(buffered_fd) {}

File::~File() {
  if (direct_fd_ >= 0) ::close(direct_fd_);
  if (buffered_fd_ >= 0) ::close(buffered_fd_);
}

uint64_t File::size() const {
  struct stat st;
  if (::fstat(buffered_fd_, &st) != 0) {
    throw IoException(whole_file_error(errno, IoOp::kRead, path_));
  }
  return static_cast<uint64_t>(st.st_size);
}

void File::sync() {
  if (::fdatasync(buffered_fd_) != 0) throw IoException(call_error(errno, path_, "fdatasync"));
}

void File::close() {
  int error = 0;
  if (direct_fd_ >= 0 && ::close(direct_fd_) != 0) error = errno;
  if (buffered_fd_ >= 0 && ::close(buffered_fd_) != 0 && error == 0) error = errno;
  direct_fd_ = buffered_fd_ = -1;
  if (error != 0) throw IoException(call_error(error, path_, "close"));
}

void File::write(uint64_t offset, const void* data, size_t length) {
  const auto* cursor = static_cast<const char*>(data);
  size_t done = 0;
  while (done < length) {
    const InjectedFault fault = before_transfer(IoOp::kWrite, offset + done, length - done);
    if (fault.error_number != 0) {
      throw IoException(IoError{fault.error_number, IoOp::kWrite, path_, offset + done, length - done});
    }
    const size_t chunk = std::min(length - done, fault.max_bytes);
    const ssize_t put = ::pwrite(buffered_fd_, cursor + done, chunk, static_cast<off_t>(offset + done));
    if (put < 0 && errno == EINTR) continue;
    if (put <= 0) {
      throw IoException(IoError{put < 0 ? errno : ENOSPC, IoOp::kWrite, path_, offset + done, length - done});
    }
    done += static_cast<size_t>(put);
  }
}

void File::read(uint64_t offset, void* data, size_t length) {
  auto* cursor = static_cast<char*>(data);
  size_t done = 0;
  while (done < length) {
    const InjectedFault fault = before_transfer(IoOp::kRead, offset + done, length - done);
    if (fault.error_number != 0) {
      throw IoException(IoError{fault.error_number, IoOp::kRead, path_, offset + done, length - done});
    }
    const size_t chunk = std::min(length - done, fault.max_bytes);
    const ssize_t got = ::pread(buffered_fd_, cursor + done, chunk, static_cast<off_t>(offset + done));
    if (got < 0 && errno == EINTR) continue;
    if (got <= 0) {
      throw IoException(IoError{got < 0 ? errno : ENODATA, IoOp::kRead, path_, offset + done, length - done});
    }
    done += static_cast<size_t>(got);
  }
}

void File::allocate(uint64_t bytes) {
  int error = ::posix_fallocate(buffered_fd_, 0, static_cast<off_t>(bytes));
  if (error != 0) throw IoException(whole_file_error(error, IoOp::kWrite, path_, bytes));
}

void File::truncate(uint64_t bytes) {
  if (::ftruncate(buffered_fd_, static_cast<off_t>(bytes)) != 0) {
    throw IoException(whole_file_error(errno, IoOp::kWrite, path_, bytes));
  }
}

std::unique_ptr<File> Env::open(const std::string& path, OpenMode mode, bool try_direct) {
  detail::FileDescriptors fds = detail::open_descriptors(path, mode, try_direct);
  return std::make_unique<File>(path, fds.direct, fds.buffered);
}

void Env::rename(const std::string& from, const std::string& to) {
  if (::rename(from.c_str(), to.c_str()) != 0) {
    throw IoException(call_error(errno, from, detail::concat("rename to '", to, "'")));
  }
}

void Env::exchange(const std::string& a, const std::string& b) {
  if (::syscall(SYS_renameat2, AT_FDCWD, a.c_str(), AT_FDCWD, b.c_str(), RENAME_EXCHANGE) != 0) {
    throw IoException(call_error(errno, a, detail::concat("exchange with '", b, "'")));
  }
}

void Env::sync_directory(const std::string& directory) {
  const int fd = ::open(directory.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) throw IoException(call_error(errno, directory, "open of the directory to fsync it"));
  const int result = ::fsync(fd);
  const int error = errno;
  ::close(fd);
  if (result != 0) throw IoException(call_error(error, directory, "fsync of the directory"));
}

Env& Env::posix() {
  static Env env;
  return env;
}

// --- DurableFile ---------------------------------------------------------------------------

DurableFile::DurableFile(Env& env, std::string path) : env_(env), path_(std::move(path)) {
  const std::string temporary = temporary_path();
  ::unlink(temporary.c_str());  // a temporary a crash left behind
  file_ = env_.open(temporary, OpenMode::kCreate, /*try_direct=*/false);
}

DurableFile::~DurableFile() {
  if (committed_) return;
  file_.reset();
  ::unlink(temporary_path().c_str());
}

void DurableFile::write(uint64_t offset, const void* data, size_t length) {
  FERRY_CHECK(!committed_ && file_ != nullptr, "write to '", path_, "' after it was committed");
  file_->write(offset, data, length);
  end_ = std::max<uint64_t>(end_, offset + length);
}

void DurableFile::append(const void* data, size_t length) { write(end_, data, length); }

void DurableFile::commit() {
  FERRY_CHECK(!committed_ && file_ != nullptr, "'", path_, "' was committed twice");
  file_->sync();
  file_->close();
  file_.reset();
  env_.rename(temporary_path(), path_);
  committed_ = true;
  env_.sync_directory(fs::parent_directory(path_));
}

void write_file_durably(Env& env, const std::string& path, std::string_view bytes) {
  DurableFile file(env, path);
  file.write(0, bytes.data(), bytes.size());
  file.commit();
}

bool supports_direct_io(const std::string& directory) {
  static std::mutex mutex;
  static std::map<std::string, bool> cache;
  std::lock_guard<std::mutex> lock(mutex);
  auto found = cache.find(directory);
  if (found != cache.end()) return found->second;

  std::string scratch = directory + "/.ferry-direct-probe-XXXXXX";
  int fd = ::mkstemp(scratch.data());
  FERRY_CHECK(fd >= 0, "cannot create a file in directory '", directory, "': ",
              std::strerror(errno), "; ferry needs a writable directory there");
  ::close(fd);
  bool supported = false;
  int direct_fd = ::open(scratch.c_str(), O_RDWR | O_DIRECT | O_CLOEXEC);
  if (direct_fd >= 0) {
    void* page = nullptr;
    if (::posix_memalign(&page, kIoAlignment, kIoAlignment) == 0) {
      std::memset(page, 0, kIoAlignment);
      supported = ::pwrite(direct_fd, page, kIoAlignment, 0) == static_cast<ssize_t>(kIoAlignment);
      std::free(page);
    }
    ::close(direct_fd);
  }
  ::unlink(scratch.c_str());
  cache.emplace(directory, supported);
  return supported;
}

// --- StripedFile ---------------------------------------------------------------------------

StripedFile::StripedFile(std::vector<std::unique_ptr<File>> members, size_t stripe_bytes)
    : members_(std::move(members)), stripe_bytes_(stripe_bytes) {}

std::unique_ptr<StripedFile> StripedFile::open(Env& env, const std::vector<std::string>& directories,
                                               const std::string& name, OpenMode mode,
                                               size_t stripe_bytes, bool try_direct) {
  FERRY_CHECK(!directories.empty(), "a striped file needs at least one directory; got none for '",
              name, "'");
  FERRY_CHECK(stripe_bytes > 0 && stripe_bytes % kIoAlignment == 0, "stripe size ", stripe_bytes,
              " bytes is invalid: it must be a positive multiple of ", kIoAlignment);
  std::vector<std::unique_ptr<File>> members;
  for (const std::string& directory : directories) {
    FERRY_CHECK(fs::is_directory(directory), "NVMe directory '", directory,
                "' does not exist or is not a directory; create it or pass another one");
    members.push_back(env.open(directory + "/" + name, mode, try_direct));
  }
  return std::unique_ptr<StripedFile>(new StripedFile(std::move(members), stripe_bytes));
}

std::unique_ptr<StripedFile> StripedFile::open(Env& env, const std::string& path, OpenMode mode,
                                               bool try_direct) {
  std::vector<std::unique_ptr<File>> members;
  members.push_back(env.open(path, mode, try_direct));
  // One member: the stripe size only has to exceed any offset.
  constexpr size_t kWholeFile = size_t{1} << 62;
  return std::unique_ptr<StripedFile>(new StripedFile(std::move(members), kWholeFile));
}

bool StripedFile::direct() const {
  for (const auto& member : members_) {
    if (!member->direct()) return false;
  }
  return true;
}

std::string StripedFile::describe() const {
  std::string paths;
  for (const auto& member : members_) paths += (paths.empty() ? "" : ", ") + member->path();
  return members_.size() == 1 ? paths : "[" + paths + "]";
}

void StripedFile::map(uint64_t offset, size_t length, std::vector<Piece>* pieces) const {
  const uint64_t count = members_.size();
  while (length > 0) {
    uint64_t stripe = offset / stripe_bytes_;
    uint64_t within = offset % stripe_bytes_;
    size_t piece = static_cast<size_t>(std::min<uint64_t>(length, stripe_bytes_ - within));
    uint64_t file_offset = (stripe / count) * stripe_bytes_ + within;
    pieces->push_back(Piece{members_[stripe % count].get(), file_offset, offset, piece});
    offset += piece;
    length -= piece;
  }
}

void StripedFile::sync() {
  for (auto& member : members_) member->sync();
}

}  // namespace ferry
