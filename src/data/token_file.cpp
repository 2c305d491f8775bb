#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "ferry/check.h"
#include "ferry/data.h"

namespace ferry::data {
namespace {

bool ends_with(const std::string& text, const std::string& suffix) {
  return text.size() >= suffix.size() &&
         text.compare(text.size() - suffix.size(), suffix.size(), suffix) == 0;
}

int64_t token_bytes(TokenDtype dtype) { return dtype == TokenDtype::kUint16 ? 2 : 4; }

const char* dtype_name(TokenDtype dtype) {
  return dtype == TokenDtype::kUint16 ? "uint16" : "uint32";
}

// A whole file mapped read-only; an empty file maps nothing.
class MappedFile {
 public:
  explicit MappedFile(const std::string& path) {
    int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    FERRY_CHECK(fd >= 0, "cannot open token file ", path, ": ", std::strerror(errno));
    // The mapping keeps the file open, so the descriptor closes when the constructor ends.
    struct CloseOnExit {
      int fd;
      ~CloseOnExit() { ::close(fd); }
    } close_on_exit{fd};
    struct stat info {};
    FERRY_CHECK(::fstat(fd, &info) == 0, "cannot stat token file ", path, ": ",
                std::strerror(errno));
    FERRY_CHECK(S_ISREG(info.st_mode), "token file ", path, " is not a regular file");
    if (info.st_size > 0) {
      void* data = ::mmap(nullptr, info.st_size, PROT_READ, MAP_SHARED, fd, 0);
      FERRY_CHECK(data != MAP_FAILED, "cannot memory-map token file ", path, " (",
                  info.st_size, " bytes): ", std::strerror(errno));
      data_ = data;
      size_bytes_ = static_cast<size_t>(info.st_size);
    }
  }
  ~MappedFile() {
    if (size_bytes_ > 0) {
      ::munmap(data_, size_bytes_);
    }
  }
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;

  const unsigned char* data() const { return static_cast<const unsigned char*>(data_); }
  size_t size_bytes() const { return size_bytes_; }

 private:
  void* data_ = nullptr;
  size_t size_bytes_ = 0;
};

class TokenFileDataset final : public Dataset {
 public:
  TokenFileDataset(const std::string& path, int64_t example_tokens, TokenDtype dtype)
      : name_(path), file_(path), example_tokens_(example_tokens), dtype_(dtype) {
    FERRY_CHECK(example_tokens > 0, "example_tokens for token file ", path, " is ",
                example_tokens, ": it must be at least 1");
    int64_t bytes = static_cast<int64_t>(file_.size_bytes());
    FERRY_CHECK(bytes % token_bytes(dtype) == 0, "token file ", path, " has ", bytes,
                " bytes, not a multiple of ", token_bytes(dtype), " (", dtype_name(dtype),
                " tokens): it is truncated or holds another dtype");
    total_tokens_ = bytes / token_bytes(dtype);
  }

  int64_t size() const override { return (total_tokens_ + example_tokens_ - 1) / example_tokens_; }

  Example get(int64_t index) const override {
    FERRY_CHECK(index >= 0 && index < size(), "example index ", index, " of ", name_,
                " is out of range: valid are 0 to ", size() - 1);
    int64_t begin = index * example_tokens_;
    int64_t end = std::min(begin + example_tokens_, total_tokens_);
    Example example;
    example.tokens.reserve(end - begin);
    for (int64_t i = begin; i < end; ++i) {
      example.tokens.push_back(token_at(i));
    }
    return example;
  }

  const std::string& name() const override { return name_; }

 private:
  // Little-endian whatever the host's byte order.
  int64_t token_at(int64_t i) const {
    const unsigned char* p = file_.data() + i * token_bytes(dtype_);
    uint32_t value = uint32_t{p[0]} | uint32_t{p[1]} << 8;
    if (dtype_ == TokenDtype::kUint32) {
      value |= uint32_t{p[2]} << 16 | uint32_t{p[3]} << 24;
    }
    return value;
  }

  std::string name_;
  MappedFile file_;
  int64_t example_tokens_;
  TokenDtype dtype_;
  int64_t total_tokens_ = 0;
};

}  // namespace

TokenDtype token_dtype_from_path(const std::string& path) {
  FERRY_CHECK(ends_with(path, ".bin"), "cannot tell the token dtype of ", path,
              ": token files end in .bin (uint16), .u32.bin or .uint32.bin (uint32)");
  if (ends_with(path, ".u32.bin") || ends_with(path, ".uint32.bin")) {
    return TokenDtype::kUint32;
  }
  return TokenDtype::kUint16;
}

std::shared_ptr<const Dataset> open_token_file(const std::string& path, int64_t example_tokens,
                                               std::optional<TokenDtype> dtype) {
  return std::make_shared<TokenFileDataset>(path, example_tokens,
                                            dtype ? *dtype : token_dtype_from_path(path));
}

}  // namespace ferry::data
