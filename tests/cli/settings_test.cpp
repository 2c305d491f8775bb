// The job settings' table and its strict readers (src/cli/settings.cpp), and job files typed by
// YAML's core schema read through them.

#include <fstream>

#include "cli/job_file.h"
#include "cli/settings.h"
#include "ferry/engine.h"
#include "support/catch.h"
#include "support/temp_dir.h"

namespace ferry::cli {
namespace {

using Json = nlohmann::json;
using Catch::Contains;

TEST_CASE("every engine setting is in the job settings' table, with a phrase for its range") {
  for (const std::string& key : engine_config_keys()) {
    INFO(key);
    REQUIRE(find_setting(key) != nullptr);
    CHECK_FALSE(valid_range(key).empty());
  }
  CHECK(valid_range("log_every") == "an integer >= 1");
  CHECK(valid_range("demo_digits") == "an integer from 1 to 9");
  CHECK(valid_range("dropout") == "auto or a number in [0, 1)");
  CHECK(valid_range("fuyou_host_blocks") == "auto or an integer >= 0");
  CHECK(valid_range("zo_eps") == "a number > 0");
  CHECK(valid_range("loss_scale") == "null or true or false");
  CHECK(job_defaults().contains("steps"));
  CHECK_FALSE(job_defaults().contains("beta1"));  // a job-file setting without a flag
}

TEST_CASE("integers are read exactly or refused, never truncated") {
  CHECK(read_setting("steps", "100", "--steps 100") == 100);
  CHECK(read_setting("steps", "1e2", "--steps 1e2") == 100);
  CHECK(read_setting("steps", 1e2, "steps in job.yaml") == 100);
  CHECK(read_setting("steps", "+7", "--steps +7") == 7);
  CHECK_THROWS_WITH(read_setting("steps", "3.5", "--steps 3.5"),
                    Contains("--steps 3.5 is invalid: not a whole number") && Contains("an integer >= 1"));
  CHECK_THROWS_WITH(read_setting("steps", 3.5, "steps = 3.5 in job.yaml"), Contains("steps = 3.5 in job.yaml"));
  CHECK_THROWS_WITH(read_setting("steps", "1e-1", "--steps 1e-1"), Contains("not a whole number"));
  CHECK_THROWS_WITH(read_setting("steps", "10x", "--steps 10x"), Contains("not an integer"));
  CHECK_THROWS_WITH(read_setting("steps", "", "--steps ''"), Contains("not an integer"));
  CHECK_THROWS_WITH(read_setting("steps", "99999999999999999999", "--steps 99999999999999999999"),
                    Contains("beyond 2^63"));
  CHECK_THROWS_WITH(read_setting("steps", 1e30, "steps = 1e30 in job.yaml"), Contains("beyond 2^63"));
  CHECK_THROWS_WITH(read_setting("steps", "0", "--steps 0"), Contains("steps must be an integer >= 1"));
  CHECK_THROWS_WITH(read_setting("log_every", "0", "--log-every 0"),
                    Contains("--log-every 0 is invalid") && Contains("log_every must be an integer >= 1"));
  CHECK_THROWS_WITH(read_setting("demo_digits", "12", "--demo-digits 12"), Contains("from 1 to 9"));
  CHECK_THROWS_WITH(read_setting("steps", true, "steps = true in job.yaml"), Contains("an integer >= 1"));
  CHECK(read_setting("fuyou_host_blocks", "auto", "--fuyou-host-blocks auto") == "auto");
  CHECK(read_setting("fuyou_host_blocks", "3", "--fuyou-host-blocks 3") == 3);
  CHECK_THROWS_WITH(read_setting("fuyou_host_blocks", "many", "--fuyou-host-blocks many"),
                    Contains("auto or an integer >= 0"));
}

TEST_CASE("numbers, booleans and sizes are read strictly, and every error names the setting") {
  CHECK(read_setting("lr", "3e-4", "--lr 3e-4") == 3e-4);
  CHECK_THROWS_WITH(read_setting("lr", "abc", "--lr abc"),
                    Contains("--lr abc is invalid: not a number") && Contains("lr must be a number >= 0"));
  CHECK_THROWS_WITH(read_setting("lr", "1e-3x", "--lr 1e-3x"), Contains("not a number"));
  CHECK_THROWS_WITH(read_setting("lr", "nan", "--lr nan"), Contains("--lr nan"));
  CHECK_THROWS_WITH(read_setting("lr", "-1", "--lr -1"), Contains("lr must be a number >= 0"));
  CHECK_THROWS_WITH(read_setting("lr", "fast", "lr = \"fast\" in job.yaml"), Contains("lr = \"fast\" in job.yaml"));
  CHECK_THROWS_WITH(read_setting("beta1", 1.0, "beta1 = 1.0 in job.yaml"), Contains("a number in [0, 1)"));
  CHECK(read_setting("dropout", "auto", "--dropout auto") == "auto");
  CHECK(read_setting("dropout", "0.1", "--dropout 0.1") == 0.1);
  CHECK_THROWS_WITH(read_setting("dropout", "1", "--dropout 1"), Contains("auto or a number in [0, 1)"));
  CHECK(read_setting("answer_only", "false", "--answer-only false") == false);
  CHECK_THROWS_WITH(read_setting("answer_only", "yes", "--answer-only yes"), Contains("true or false"));
  CHECK(read_setting("loss_scale", nullptr, "loss_scale = null in job.yaml").is_null());
  CHECK(read_setting("gpu_budget", "24GiB", "--gpu-budget 24GiB") == "24GiB");
  CHECK_THROWS_WITH(read_setting("gpu_budget", "0.0001", "--gpu-budget 0.0001"),
                    Contains("--gpu-budget 0.0001 is invalid") && Contains("less than one byte"));
  CHECK_THROWS_WITH(read_setting("host_budget", 1e30, "host_budget = 1e30 in job.yaml"),
                    Contains("host_budget = 1e30") && Contains("2^63"));
  CHECK_THROWS_WITH(read_setting("host_budget", "lots", "--host-budget lots"), Contains("--host-budget lots"));
  CHECK(read_setting("nvme", Json::array({"/a", "/b"}), "nvme in job.yaml").size() == 2);
  CHECK_THROWS_WITH(read_setting("model", 7, "model = 7 in job.yaml"), Contains("model must be text"));
}

TEST_CASE("a near miss of a setting's name gets \"did you mean\"") {
  const std::vector<std::string> names = {"steps", "seq", "save_every", "log_every", "lr"};
  CHECK(did_you_mean("stpes", names) == " (did you mean 'steps'?)");
  CHECK(did_you_mean("log_evry", names) == " (did you mean 'log_every'?)");
  CHECK(did_you_mean("steps", names).empty());
  CHECK(did_you_mean("learning_rate", names).empty());
  CHECK(did_you_mean("xy", names).empty());  // short names: two edits are most of the name
}

TEST_CASE("the strict readers for flags outside the table name the flag and the range") {
  CHECK(parse_integer("12", "--layers", 0, 100) == 12);
  CHECK_THROWS_WITH(parse_integer("12.5", "--layers", 0, 100), Contains("--layers 12.5 is invalid: not a whole number"));
  CHECK_THROWS_WITH(parse_integer("120", "--layers", 0, 100), Contains("from 0 to 100"));
  CHECK(parse_number("0.5", "--ratio") == 0.5);
  CHECK_THROWS_WITH(parse_number("half", "--ratio"), Contains("--ratio half is invalid"));
}

TEST_CASE("a job file's values are read by YAML's core schema, then checked as their settings") {
  testing::TempDir dir;
  std::ofstream(dir.file("job.yaml")) << "steps: 1e2\nlr: 3e-4\nmodel: tiny-llama\nseq: \"abc\"\n";
  const Json job = read_job_file(dir.file("job.yaml"));
  CHECK(read_setting("steps", job["steps"], "steps in job.yaml") == 100);
  CHECK(read_setting("lr", job["lr"], "lr in job.yaml") == 3e-4);
  CHECK_THROWS_WITH(read_setting("seq", job["seq"], "seq = \"abc\" in job.yaml"),
                    Contains("seq = \"abc\" in job.yaml is invalid: not an integer") && Contains("seq must be"));
}

}  // namespace
}  // namespace ferry::cli
