// `ferry plan` reads a job as `ferry finetune` does, and gives the verdict finetune's check gives
// on the same job: run both on the same flags and compare.

#include <string>

#include "cli/run_ferry.h"
#include "support/catch.h"
#include "support/temp_dir.h"

namespace ferry::cli {
namespace {

using Catch::Contains;
using testing::run_ferry;

struct Verdicts {
  testing::FerryRun plan, finetune;
};

Verdicts both(const std::string& job, const testing::TempDir& dir) {
  return {run_ferry("plan " + job), run_ferry("finetune " + job + " --steps 1 --eval-problems 1 --export none --out " +
                                              dir.file("run"))};
}

TEST_CASE("plan and finetune agree: a job that fits runs, one that does not is refused by both") {
  testing::TempDir dir;
  const std::string demo = "--hardware h100 --batch 4 --device cpu";
  const Verdicts fits = both(demo, dir);
  INFO(fits.plan.output << "\n---\n" << fits.finetune.output);
  CHECK(fits.plan.exit_code == 0);
  CHECK(fits.plan.output.find("DOES NOT FIT") == std::string::npos);
  CHECK(fits.finetune.exit_code == 0);

  testing::TempDir small;
  const Verdicts short_of_host = both(demo + " --host-budget 64KiB", small);
  INFO(short_of_host.plan.output << "\n---\n" << short_of_host.finetune.output);
  CHECK(short_of_host.plan.exit_code == 3);
  CHECK_THAT(short_of_host.plan.output, Contains("DOES NOT FIT"));
  CHECK(short_of_host.finetune.exit_code != 0);
  CHECK_THAT(short_of_host.finetune.output, Contains("does not fit its budgets"));
}

TEST_CASE("an NVMe budget of 0 is the NVMe directories' free space, for plan and finetune alike") {
  testing::TempDir dir;
  // gpt3-175b's states in fuyou need terabytes on NVMe, more than a test machine's disk has.
  const std::string job = "--model gpt3-175b --mode fuyou --hardware h100 --batch 1 --seq 128 --activations nvme "
                          "--fuyou-host-blocks 0 --nvme " + dir.path() + " --nvme-budget 0";
  const Verdicts verdicts = both(job, dir);
  INFO(verdicts.plan.output << "\n---\n" << verdicts.finetune.output);
  CHECK(verdicts.plan.exit_code == 3);
  CHECK_THAT(verdicts.plan.output, Contains("nvme tier: needs"));
  CHECK(verdicts.finetune.exit_code != 0);
  CHECK_THAT(verdicts.finetune.output, Contains("does not fit its budgets") && Contains("nvme tier"));
}

TEST_CASE("plan reads the job's flags and file strictly, as finetune does") {
  const testing::FerryRun typo = run_ferry("plan --hardware h100 --stpes 3");
  CHECK(typo.exit_code != 0);
  CHECK_THAT(typo.output, Contains("unknown flag '--stpes' (did you mean 'steps'?)"));
  const testing::FerryRun bad = run_ferry("plan --hardware h100 --zo-gpu-blocks 99999999999999999999");
  CHECK(bad.exit_code != 0);
  CHECK_THAT(bad.output, Contains("--zo-gpu-blocks 99999999999999999999 is invalid: beyond 2^63"));
  const testing::FerryRun max_batch = run_ferry("plan --hardware h100 --max-batch 2.5");
  CHECK(max_batch.exit_code != 0);
  CHECK_THAT(max_batch.output, Contains("--max-batch 2.5 is invalid: not a whole number"));
}

}  // namespace
TEST_CASE("plan --gpus N plans one rank of a data-parallel job, and needs the link's bandwidth for it") {
  const testing::FerryRun ranks = run_ferry("plan --hardware h100 --mode zero-offload --gpus 4 --link-gbps 150");
  INFO(ranks.output);
  CHECK(ranks.exit_code == 0);
  CHECK_THAT(ranks.output, Contains("ranks: 4 data-parallel") && Contains("collectives") && Contains("over 4 ranks"));
  const testing::FerryRun no_link = run_ferry("plan --hardware h100 --mode zero-offload --gpus 4");
  CHECK(no_link.exit_code != 0);
  CHECK_THAT(no_link.output, Contains("--gpus 4") && Contains("--link-gbps"));
  const testing::FerryRun none = run_ferry("plan --hardware h100 --gpus 0 --link-gbps 150");
  CHECK(none.exit_code != 0);
  CHECK_THAT(none.output, Contains("--gpus"));
}

}  // namespace ferry::cli
