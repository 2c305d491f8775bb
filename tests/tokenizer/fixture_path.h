#pragma once

// Where the tokenizer fixtures are: tests/tokenizer/fixtures in the source tree.

#include <unistd.h>

#include <climits>
#include <string>

namespace ferry::testing {

// Note: __FILE__ is relative to the build directory when the build names sources that way (Ninja
// does), and the test binary lives in <build>/tests, so a relative path is resolved from there.
inline std::string tokenizer_fixtures() {
  const std::string file = __FILE__;
  const std::string directory = file.substr(0, file.rfind('/')) + "/fixtures";
  if (!directory.empty() && directory[0] == '/') return directory;
  char executable[PATH_MAX] = {};
  const ssize_t length = readlink("/proc/self/exe", executable, sizeof executable - 1);
  const std::string exe(executable, length > 0 ? static_cast<std::size_t>(length) : 0);
  return exe.substr(0, exe.rfind('/')) + "/../" + directory;
}

}  // namespace ferry::testing
