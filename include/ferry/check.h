#pragma once

// The first two of ferry's three error channels (docs/style.md, rule 3):
//  - FERRY_CHECK for user and configuration errors: throws ferry::Error with a message that
//    names the bad value and what would be valid.
//  - FERRY_ASSERT for internal invariants: stays on in release builds and throws
//    ferry::InternalError, which always means a bug in ferry.
// The third channel, I/O results, is ferry::IoError in io.h.

#include <sstream>
#include <stdexcept>
#include <string>

namespace ferry {

class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

class InternalError : public std::logic_error {
 public:
  using std::logic_error::logic_error;
};

namespace detail {

template <typename... Parts>
std::string concat(const Parts&... parts) {
  std::ostringstream out;
  (out << ... << parts);
  return out.str();
}

[[noreturn]] void throw_internal_error(const char* condition, const char* file, int line,
                                       const std::string& message);

}  // namespace detail
}  // namespace ferry

#define FERRY_CHECK(condition, ...)                                 \
  do {                                                              \
    if (!(condition)) {                                             \
      throw ::ferry::Error(::ferry::detail::concat(__VA_ARGS__));   \
    }                                                               \
  } while (false)

#define FERRY_ASSERT(condition, ...)                                                  \
  do {                                                                                \
    if (!(condition)) {                                                               \
      ::ferry::detail::throw_internal_error(#condition, __FILE__, __LINE__,           \
                                            ::ferry::detail::concat("", ##__VA_ARGS__)); \
    }                                                                                 \
  } while (false)
