// `ferry bench zo` as the lead runs it: a preset cut to fewer blocks, each row beside the plan of
// what ran and of the whole preset.

#include <string>

#include "cli/run_ferry.h"
#include "support/catch.h"

namespace ferry::cli {
namespace {

using Catch::Contains;
using Run = testing::FerryRun;
using testing::run_ferry;

TEST_CASE("bench zo cuts a preset with --layers and compares each row with the plan of it and of the whole") {
  const Run run = run_ferry("bench zo --models tiny-opt --layers 1 --placements gpu,host --batch 2 --seq 16 "
                            "--warmup 0 --steps 1 --hardware h200");
  INFO(run.output);
  REQUIRE(run.exit_code == 0);
  CHECK_THAT(run.output, Contains("| tiny-opt  | gpu ") && Contains("| tiny-opt  | host "));
  CHECK_THAT(run.output, Contains("; plan predicts ") && Contains("(measured / predicted ") &&
                             Contains("; the whole model (2 blocks), these settings: fits"));
  CHECK_THAT(run.output, !Contains("failed"));
}

}  // namespace
}  // namespace ferry::cli
