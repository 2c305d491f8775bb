// `ferry bench calibrate`: the hardware figures `ferry plan` runs on, measured on this machine
// (ferry::calibrate) and written as JSON (docs/plan.md).

#include <cxxopts.hpp>
#include <iostream>

#include "cli/command.h"
#include "ferry/job.h"
#include "ferry/memory.h"
#include "ferry/plan.h"

namespace ferry::cli {
namespace {

int run_calibrate(int argc, char** argv) {
  cxxopts::Options options(argv[0], "Measure the hardware figures `ferry plan` uses and write them as JSON");
  options.add_options()
      ("out", "the calibration file", cxxopts::value<std::string>()->default_value("ferry-calibration.json"))
      ("nvme", "NVMe directories to measure, comma-separated", cxxopts::value<std::vector<std::string>>())
      ("nvme-size", "bytes per NVMe pass, a size such as 1GiB", cxxopts::value<std::string>()->default_value("1GiB"))
      ("repeat", "runs per figure, 1 or more; the median is kept", cxxopts::value<std::string>()->default_value("3"))
      ("quick", "small sizes: about a second on a CPU, rougher figures")
      ("h,help", "show this help");
  auto args = options.parse(argc, argv);
  if (args.count("help")) {
    std::cout << options.help() << "\n";
    return 0;
  }
  CalibrationOptions calibration;
  if (args.count("nvme")) calibration.nvme_directories = args["nvme"].as<std::vector<std::string>>();
  calibration.nvme_bytes = parse_bytes(args["nvme-size"].as<std::string>());
  calibration.repeat = static_cast<unsigned>(parse_integer(args["repeat"].as<std::string>(), "--repeat", 1, 1000));
  calibration.quick = args.count("quick") > 0;
  const Hardware hw = calibrate(calibration, [](const std::string& line) { std::cout << line << "\n" << std::flush; });
  const std::string out = args["out"].as<std::string>();
  hw.save(out);
  std::cout << "wrote " << out << " (ferry plan reads it with --calibration " << out << ")\n";
  return 0;
}

}  // namespace

FERRY_CLI_COMMAND("bench calibrate", "measure the hardware figures ferry plan uses (matmul, PCIe, NVMe, CPU AdamW)",
                  run_calibrate);

}  // namespace ferry::cli
