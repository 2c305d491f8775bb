#include "ferry/check.h"

namespace ferry::detail {

void throw_internal_error(const char* condition, const char* file, int line,
                          const std::string& message) {
  throw InternalError(concat("ferry internal error: ", condition, " failed at ", file, ":", line,
                             message.empty() ? "" : ": ", message,
                             " (this is a bug in ferry; please report it)"));
}

}  // namespace ferry::detail
