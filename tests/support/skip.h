#pragma once

#include <string>

namespace ferry::testing {

// Note: Catch2 2.x has no way for a test to report "skipped". A test that cannot run on this
// machine calls skip() instead of returning as if it had passed. Under CTest, which runs each
// test case in a process of its own and passes --skip-exit-code (registered as the test's
// SKIP_RETURN_CODE), the process ends with that code and ctest lists the test as skipped; run
// by hand, the reason is printed as a warning and skip() returns true so that the test returns.
bool skip(const std::string& reason);

// skip(reason) on a machine without a usable CUDA device; false where there is one.
bool skip_without_cuda(const std::string& reason);

// The exit code skip() ends the process with (0: warn and return), from --skip-exit-code.
void set_skip_exit_code(int code);

}  // namespace ferry::testing
