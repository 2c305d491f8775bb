#pragma once

// The built `ferry` binary as a user runs it, for the CLI's tests.

#include <sys/wait.h>

#include <cstdio>
#include <string>

#include "support/catch.h"

namespace ferry::testing {

struct Run {
  int exit_code = -1;
  std::string output;  // stdout and stderr
};

inline Run run_ferry(const std::string& arguments) {
  const std::string command = std::string(FERRY_CLI_PATH) + " " + arguments + " 2>&1";
  FILE* pipe = ::popen(command.c_str(), "r");
  REQUIRE(pipe != nullptr);
  Run run;
  char buffer[4096];
  while (std::fgets(buffer, sizeof buffer, pipe) != nullptr) run.output += buffer;
  const int status = ::pclose(pipe);
  run.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  return run;
}

}  // namespace ferry::testing
