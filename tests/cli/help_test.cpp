// Every subcommand's --help describes every option it has, and `ferry finetune --help` lists
// every job setting under its group, with its default and valid range.

#include <regex>
#include <sstream>

#include "cli/run_ferry.h"
#include "ferry/job.h"
#include "support/catch.h"
#include "support/temp_dir.h"

namespace ferry::cli {
namespace {

using Catch::Contains;
using testing::run_ferry;

// The subcommands `ferry --help` lists: "  finetune          fine-tune a model ...".
std::vector<std::string> subcommands() {
  const testing::FerryRun run = run_ferry("--help");
  REQUIRE(run.exit_code == 0);
  std::vector<std::string> names;
  std::istringstream lines(run.output);
  const std::regex command(R"(^  ([a-z]+( [a-z]+)?)\s{2,}\S.*$)");
  for (std::string line; std::getline(lines, line);) {
    std::smatch match;
    if (std::regex_match(line, match, command)) names.push_back(match[1]);
  }
  return names;
}

struct OptionLine {
  std::string flag, description;
};

// cxxopts' option lines: "  -h, --help          show this help", "      --steps arg   ...". A
// flag too long for the column has its description on the next line.
std::vector<OptionLine> option_lines(const std::string& help) {
  std::vector<OptionLine> options;
  std::istringstream lines(help);
  const std::regex option(R"(^\s+(-\w, )?--([\w-]+)( arg| \[=arg\(=\w+\)\])?(\s+(.*))?$)");
  bool continued = false;
  for (std::string line; std::getline(lines, line);) {
    std::smatch match;
    if (continued) {
      options.back().description = line.substr(std::min(line.size(), line.find_first_not_of(' ')));
      continued = false;
    } else if (std::regex_match(line, match, option)) {
      options.push_back({match[2], match[5]});
      continued = options.back().description.empty();
    }
  }
  return options;
}

TEST_CASE("every option of every subcommand has a description in its --help") {
  const std::vector<std::string> commands = subcommands();
  REQUIRE(commands.size() >= 10);
  for (const std::string& command : commands) {
    INFO("ferry " << command << " --help");
    const testing::FerryRun run = run_ferry(command + " --help");
    REQUIRE(run.exit_code == 0);
    const std::vector<OptionLine> options = option_lines(run.output);
    CHECK_FALSE(options.empty());
    for (const OptionLine& option : options) {
      INFO("--" << option.flag);
      std::istringstream description(option.description);
      std::size_t words = 0;
      for (std::string word; description >> word;) ++words;
      CHECK(words >= 2);
    }
  }
}

TEST_CASE("finetune and plan --help list every job setting under its group, with its default and range") {
  for (const char* command : {"finetune", "plan"}) {
    INFO(command);
    const testing::FerryRun run = run_ferry(std::string(command) + " --help");
    REQUIRE(run.exit_code == 0);
    std::size_t previous_group = 0;
    for (const std::string& group : job_setting_groups()) {
      const std::size_t at = run.output.find("\n " + group + " options:\n");
      INFO(group);
      REQUIRE(at != std::string::npos);
      CHECK(at > previous_group);
      previous_group = at;
    }
    const std::vector<OptionLine> options = option_lines(run.output);
    for (const JobSetting& setting : job_settings()) {
      if (!setting.flag || setting.key == "pack") continue;
      std::string flag = setting.key;
      std::replace(flag.begin(), flag.end(), '_', '-');
      INFO("--" << flag);
      const bool listed = std::any_of(options.begin(), options.end(), [&](const OptionLine& option) {
        return option.flag == flag;
      });
      CHECK(listed);
    }
    // Spaces and continuation lines joined: the text may wrap.
    const std::string joined = std::regex_replace(run.output, std::regex(R"(\s+)"), " ");
    CHECK_THAT(joined, Contains("--steps arg optimizer steps of the run (auto: --epochs over the data) (default: auto; "
                                "valid: auto or an integer >= 1)"));
  }
}

TEST_CASE("a subcommand's numbers are read strictly, the error naming the flag, the value and the range") {
  testing::TempDir dir;
  struct Case {
    std::string arguments, message;
  };
  const Case cases[] = {
      {"bench optim --repeats 0", "--repeats 0 is invalid: out of range: give an integer from 1 to 1000"},
      {"bench zo --steps 2.5", "--steps 2.5 is invalid: not a whole number"},
      {"bench zo --lora-rank 1.5", "--lora-rank 1.5 is invalid"},
      {"bench zo --base-storage fp8", "--base-storage fp8 stores a LoRA base: give --lora-rank too"},
      {"bench tokenizer --tokenizer t --data d --repeat x", "--repeat x is invalid: not an integer"},
      {"bench calibrate --repeat 0 --out " + dir.file("hw.json"), "--repeat 0 is invalid"},
      {"bench io --path " + dir.path() + " --size 4MiB --repeat 2x", "--repeat 2x is invalid: not an integer"},
  };
  for (const Case& bad : cases) {
    INFO(bad.arguments);
    const testing::FerryRun run = run_ferry(bad.arguments);
    CHECK(run.exit_code != 0);
    CHECK_THAT(run.output, Contains(bad.message));
  }
}

}  // namespace
}  // namespace ferry::cli
