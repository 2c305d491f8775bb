#include "cli/preflight.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include <tbb/blocked_range.h>
#include <tbb/parallel_reduce.h>

#include "ferry/check.h"
#include "ferry/data.h"
#include "ferry/fs.h"

namespace ferry::cli {
namespace {

// Little-endian whatever the host's byte order, as the token file dataset reads it.
std::int64_t token_at(const unsigned char* data, std::int64_t i, int width) {
  const unsigned char* p = data + i * width;
  std::uint32_t value = std::uint32_t{p[0]} | std::uint32_t{p[1]} << 8;
  if (width == 4) value |= std::uint32_t{p[2]} << 16 | std::uint32_t{p[3]} << 24;
  return value;
}

}  // namespace

void check_token_ids(const std::string& path, std::int64_t vocab_size) {
  const int width = data::token_dtype_from_path(path) == data::TokenDtype::kUint16 ? 2 : 4;
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  FERRY_CHECK(fd >= 0, "cannot open token file '", path, "': ", std::strerror(errno));
  struct stat info {};
  const bool stat_ok = ::fstat(fd, &info) == 0;
  const int stat_errno = errno;
  if (!stat_ok || info.st_size == 0) {
    ::close(fd);
    FERRY_CHECK(stat_ok, "cannot stat token file '", path, "': ", std::strerror(stat_errno));
    return;  // the dataset says what is wrong with an empty file
  }
  void* mapped = ::mmap(nullptr, static_cast<std::size_t>(info.st_size), PROT_READ, MAP_SHARED, fd, 0);
  const int map_errno = errno;
  ::close(fd);  // the mapping keeps the file
  FERRY_CHECK(mapped != MAP_FAILED, "cannot memory-map token file '", path, "': ", std::strerror(map_errno));
  const auto* data = static_cast<const unsigned char*>(mapped);
  const std::int64_t tokens = info.st_size / width;
  // Note: the first bad position is what the error names, so the reduction keeps the smallest
  // index of an id out of range (tokens when there is none); each chunk stops at its first.
  constexpr std::int64_t kGrain = std::int64_t{1} << 20;
  const std::int64_t first_bad = tbb::parallel_reduce(
      tbb::blocked_range<std::int64_t>(0, tokens, kGrain), tokens,
      [&](const tbb::blocked_range<std::int64_t>& range, std::int64_t found) {
        for (std::int64_t i = range.begin(); i < range.end() && i < found; ++i) {
          if (token_at(data, i, width) >= vocab_size) return i;
        }
        return found;
      },
      [](std::int64_t a, std::int64_t b) { return std::min(a, b); });
  const std::int64_t bad_id = first_bad < tokens ? token_at(data, first_bad, width) : 0;
  ::munmap(mapped, static_cast<std::size_t>(info.st_size));
  FERRY_CHECK(first_bad == tokens, "token file '", path, "' holds id ", bad_id, " at token ", first_bad, " (byte ",
              first_bad * width, ") of ", tokens, ", but the model's vocabulary has ", vocab_size, " ids (0 to ",
              vocab_size - 1, "): tokenize the data with the model's own tokenizer (`ferry tokenize`)");
}

void check_writable(const std::string& directory, const std::string& what) {
  std::string existing = directory.empty() ? "." : directory;
  while (!fs::exists(existing)) existing = fs::parent_directory(existing);  // "." and "/" exist
  FERRY_CHECK(fs::is_directory(existing), what, " '", directory, "': '", existing, "' is not a directory: give a ",
              "directory path");
  const std::string probe = existing + "/.ferry-write-probe-" + std::to_string(::getpid());
  const int fd = ::open(probe.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
  FERRY_CHECK(fd >= 0, what, " '", directory, "' cannot be written (", std::strerror(errno), " in '", existing,
              "'): give a directory this user may write to");
  ::close(fd);
  ::unlink(probe.c_str());
}

}  // namespace ferry::cli
