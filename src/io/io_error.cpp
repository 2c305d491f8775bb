#include <cstring>

#include "ferry/io.h"

namespace ferry {

const char* to_string(IoBackendKind kind) {
  switch (kind) {
    case IoBackendKind::kIoUring: return "io_uring";
    case IoBackendKind::kLibaio: return "libaio";
    case IoBackendKind::kThreadPool: return "threads";
  }
  return "unknown";
}

IoBackendKind parse_io_backend(std::string_view name) {
  for (IoBackendKind kind :
       {IoBackendKind::kIoUring, IoBackendKind::kLibaio, IoBackendKind::kThreadPool}) {
    if (name == to_string(kind)) return kind;
  }
  throw Error(detail::concat("unknown I/O backend '", name,
                             "': valid backends are io_uring, libaio and threads"));
}

std::string IoError::to_string() const {
  if (!call.empty()) {
    return detail::concat(call, " failed on ", path, ": ", std::strerror(error_number), " (errno ",
                          error_number, ")");
  }
  std::string what = error_number == ENODATA && op == IoOp::kRead
                         ? std::string("read past the end of the file")
                         : std::strerror(error_number);
  return detail::concat(op == IoOp::kRead ? "read" : "write", " of ", length, " bytes at offset ",
                        offset, " in ", path, " failed: ", what, " (errno ", error_number, ")");
}

IoException::IoException(IoError error) : Error(error.to_string()), error_(std::move(error)) {}

}  // namespace ferry
