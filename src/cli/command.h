#pragma once

// The ferry CLI is a list of subcommands ("finetune", "bench io", ...). Each lives in its own
// file under src/cli/ and registers itself with FERRY_CLI_COMMAND, so adding one touches no
// shared table.

#include <functional>
#include <string>
#include <vector>

namespace ferry::cli {

struct Command {
  std::string name;     // one or two words: "plan", "bench io"
  std::string summary;  // one line for `ferry --help`
  std::function<int(int argc, char** argv)> run;  // argv[0] is "ferry <name>"
};

std::vector<Command>& registry();

struct Registration {
  explicit Registration(Command command) { registry().push_back(std::move(command)); }
};

}  // namespace ferry::cli

#define FERRY_CLI_CONCAT_INNER(a, b) a##b
#define FERRY_CLI_CONCAT(a, b) FERRY_CLI_CONCAT_INNER(a, b)
#define FERRY_CLI_COMMAND(name, summary, function)                                   \
  static const ::ferry::cli::Registration FERRY_CLI_CONCAT(ferry_cli_command_, __LINE__)( \
      ::ferry::cli::Command{name, summary, function})
