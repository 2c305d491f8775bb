// `ferry bench finetune` as the lead runs it: flags read strictly, each error naming the flag,
// and LoRA rows beside the plain LoRA loop's, on a tiny model on whatever device there is.

#include <string>

#include "cli/run_ferry.h"
#include "support/catch.h"

namespace ferry::cli {
namespace {

using Catch::Contains;
using Run = testing::FerryRun;
using testing::run_ferry;

const std::string kTiny = "bench finetune --model tiny-llama --batches 2 --seq 16 --warmup 0 --steps 1";

// One case for each way a flag is read: a stray word, a boolean, an integer, a setting of the
// finetune table (integer, number, size), a list, a name, and the LoRA checks.
TEST_CASE("bench finetune refuses bad flags, naming the flag, the value and what is valid") {
  struct Case {
    std::string arguments, message;
  };
  const Case cases[] = {
      {"--baseline false", "unexpected argument 'false'"},
      {"--baseline=maybe", "--baseline maybe is invalid: give true or false"},
      {"--steps 2.5", "--steps 2.5 is invalid: not a whole number"},
      {"--seq 0", "--seq 0 is invalid: seq must be an integer >= 1"},
      {"--batches 2,x", "--batches x is invalid: not an integer"},
      {"--host-budget 1e30", "2^63"},
      {"--modes gpu,fast", "--modes fast: "},
      {"--dtype F8", "--dtype F8 is invalid: give F32 or BF16"},
      {"--lora-rank 4 --lora-alpha 0", "--lora-alpha 0 is invalid"},
      {"--lora-rank 4 --lora-targets qkv", "'qkv'"},
      {"--base-storage fp8", "--base-storage fp8 stores a LoRA base: give --lora-rank too"},
      {"--lora-rank 4 --base-home disk", "--base-home disk is invalid: give plan, host or nvme"},
  };
  for (const Case& bad : cases) {
    INFO(bad.arguments);
    const Run run = run_ferry(kTiny + " " + bad.arguments);
    CHECK(run.exit_code == 1);
    CHECK_THAT(run.output, Contains(bad.message));
    CHECK_THAT(run.output, !Contains("| ferry"));  // refused before any run
  }
}

TEST_CASE("bench finetune with LoRA runs the plain LoRA loop beside ferry's, and --baseline=false runs it not") {
  const std::string lora = kTiny + " --modes gpu --lora-rank 4 --lora-alpha 8";
  Run run = run_ferry(lora);
  INFO(run.output);
  REQUIRE(run.exit_code == 0);
  CHECK_THAT(run.output, Contains("LoRA rank 4, alpha 8 on 7 linears a block"));
  CHECK_THAT(run.output, Contains("| plain LibTorch LoRA, bf16") && Contains("1.00x"));
  CHECK_THAT(run.output, Contains("adapter parameters"));
  CHECK_THAT(run.output, Contains("| ferry gpu LoRA, bf16"));
  CHECK_THAT(run.output, !Contains("failed"));

  run = run_ferry(lora + " --baseline=false");
  INFO(run.output);
  REQUIRE(run.exit_code == 0);
  CHECK_THAT(run.output, !Contains("plain LibTorch"));
  CHECK_THAT(run.output, Contains("| ferry gpu LoRA, bf16"));
}

TEST_CASE("bench finetune streams an fp8 LoRA base from host memory and prints the step's PCIe bound") {
  const Run run = run_ferry(kTiny + " --modes gpu,auto --lora-rank 4 --base-storage fp8 --base-home host "
                            "--keep-graph 0 --baseline=false");
  INFO(run.output);
  REQUIRE(run.exit_code == 0);
  CHECK_THAT(run.output, Contains("PCIe measured: up "));
  CHECK_THAT(run.output, Contains("| ferry gpu LoRA, bf16, fp8 base "));
  CHECK_THAT(run.output, Contains("| ferry auto LoRA, bf16, fp8 base, base on host "));
  CHECK_THAT(run.output, Contains("|   PCIe per step: up ") && Contains("(the gpu row, keeps 0 graphs)") &&
                             Contains("step / bound = "));
  CHECK_THAT(run.output, !Contains("failed"));
}

TEST_CASE("bench finetune plans an auto row from FLOPs, then from a profile, and predicts the whole preset") {
  const Run run = run_ferry(kTiny + " --modes auto --layers 1 --trace-blocks --calibration h200 --baseline=false");
  INFO(run.output);
  REQUIRE(run.exit_code == 0);
  CHECK_THAT(run.output, Contains("| ferry auto, bf16") && Contains("(measured / predicted ") &&
                             Contains(", profiled compute); from FLOPs alone ") &&
                             Contains("traced (the device syncs at each part)") &&
                             Contains("the whole model (2 blocks) with these block times: fits"));
  const Run unprofiled = run_ferry(kTiny + " --modes auto --calibration h200 --baseline=false --profile=false");
  INFO(unprofiled.output);
  REQUIRE(unprofiled.exit_code == 0);
  CHECK_THAT(unprofiled.output, Contains("| ferry auto, bf16") && !Contains("profiled compute"));
  const Run unknown = run_ferry(kTiny + " --modes auto --calibration h300");
  CHECK(unknown.exit_code == 1);
  CHECK_THAT(unknown.output, Contains("unknown hardware preset 'h300' (valid: h100, h100-zo2, h200, rtx4090-fuyou"));
}

}  // namespace
}  // namespace ferry::cli
