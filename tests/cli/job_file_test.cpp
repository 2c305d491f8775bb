// Job files: YAML typed by its core schema, or JSON, read into the values the job settings'
// strict readers then check (src/cli/job_file.cpp).

#include <fstream>

#include "cli/job_file.h"
#include "ferry/job.h"
#include "support/catch.h"
#include "support/temp_dir.h"

namespace ferry::cli {
namespace {

using Json = nlohmann::json;
using Catch::Contains;

TEST_CASE("a job file's values are read by YAML's core schema, then checked as their settings") {
  testing::TempDir dir;
  std::ofstream(dir.file("job.yaml")) << "steps: 1e2\nlr: 3e-4\nmodel: tiny-llama\nseq: \"abc\"\n";
  const Json job = read_job_file(dir.file("job.yaml"));
  CHECK(read_job_setting("steps", job["steps"], "steps in job.yaml") == 100);
  CHECK(read_job_setting("lr", job["lr"], "lr in job.yaml") == 3e-4);
  CHECK_THROWS_WITH(read_job_setting("seq", job["seq"], "seq = \"abc\" in job.yaml"),
                    Contains("seq = \"abc\" in job.yaml is invalid: not an integer") && Contains("seq must be"));
}

}  // namespace
}  // namespace ferry::cli
