#include "cli/run_ferry.h"

#include <sys/wait.h>

#include <cstdio>

#include "support/catch.h"

namespace ferry::testing {

FerryRun run_ferry(const std::string& arguments) {
  const std::string command = std::string(FERRY_CLI_PATH) + " " + arguments + " 2>&1";
  FILE* pipe = ::popen(command.c_str(), "r");
  REQUIRE(pipe != nullptr);
  FerryRun run;
  char buffer[4096];
  while (std::fgets(buffer, sizeof buffer, pipe) != nullptr) run.output += buffer;
  const int status = ::pclose(pipe);
  run.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  return run;
}

}  // namespace ferry::testing
