#include <cstring>
#include <exception>
#include <iostream>
#include <string>

#include "cli/command.h"
#include "ferry/check.h"
#include "ferry/version.h"

namespace ferry::cli {

std::vector<Command>& registry() {
  static std::vector<Command> commands;
  return commands;
}

namespace {

constexpr const char* kDefaultCommand = "finetune";

void print_usage() {
  std::cout << "ferry " << FERRY_VERSION_STRING
            << ": fine-tune models larger than GPU memory\n\nusage: ferry <command> [options]\n\n"
            << "commands:\n";
  for (const Command& command : registry()) {
    std::cout << "  " << command.name << std::string(18 - std::min<size_t>(command.name.size(), 17), ' ')
              << command.summary << "\n";
  }
  std::cout << "\n`ferry <command> --help` shows a command's options.\n";
}

// Finds the command whose name matches the most leading words of argv.
const Command* find_command(int argc, char** argv, int* words_used) {
  const Command* best = nullptr;
  for (const Command& command : registry()) {
    std::string joined;
    for (int words = 1; words < argc && words <= 2; ++words) {
      joined += (words > 1 ? " " : "") + std::string(argv[words]);
      if (joined == command.name && (best == nullptr || words > *words_used)) {
        best = &command;
        *words_used = words;
      }
    }
  }
  return best;
}

}  // namespace
}  // namespace ferry::cli

int main(int argc, char** argv) {
  using namespace ferry::cli;
  if (argc >= 2 && (std::strcmp(argv[1], "--help") == 0 || std::strcmp(argv[1], "-h") == 0)) {
    print_usage();
    return 0;
  }
  if (argc >= 2 && std::strcmp(argv[1], "--version") == 0) {
    std::cout << "ferry " << FERRY_VERSION_STRING << "\n";
    return 0;
  }
  int words_used = 0;
  const Command* command = find_command(argc, argv, &words_used);
  if (command == nullptr && argc >= 2) {
    std::cerr << "ferry: unknown command '" << argv[1] << "'\n\n";
    print_usage();
    return 2;
  }
  std::string program = command ? "ferry " + command->name : std::string("ferry");
  try {
    if (command == nullptr) {
      // With no arguments ferry runs its default job.
      for (const Command& candidate : registry()) {
        if (candidate.name == kDefaultCommand) {
          program = std::string("ferry ") + kDefaultCommand;
          char* args[] = {program.data(), nullptr};
          return candidate.run(1, args);
        }
      }
      print_usage();
      return 0;
    }
    argv[words_used] = program.data();
    return command->run(argc - words_used, argv + words_used);
  } catch (const std::exception& error) {
    std::cerr << "ferry: error: " << error.what() << "\n";
    return 1;
  }
}
