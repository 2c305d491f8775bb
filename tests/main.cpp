#define CATCH_CONFIG_RUNNER
#include <catch2/catch.hpp>

#include "support/skip.h"

// Catch2's main, with --skip-exit-code for tests that skip themselves (support/skip.h).
int main(int argc, char** argv) {
  Catch::Session session;
  int skip_exit_code = 0;
  session.cli(session.cli() | Catch::clara::Opt(skip_exit_code, "code")["--skip-exit-code"](
                                  "exit with this code when a test skips itself (CTest's SKIP_RETURN_CODE)"));
  if (const int error = session.applyCommandLine(argc, argv); error != 0) return error;
  ferry::testing::set_skip_exit_code(skip_exit_code);
  return session.run();
}
