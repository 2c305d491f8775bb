#pragma once

// The built `ferry` binary run as a user runs it, for the CLI's tests.

#include <string>

namespace ferry::testing {

struct FerryRun {
  int exit_code = -1;
  std::string output;  // stdout and stderr
};

// `ferry ARGUMENTS` through the shell (quote what needs it), stdout and stderr together.
FerryRun run_ferry(const std::string& arguments);

}  // namespace ferry::testing
