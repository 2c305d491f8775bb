// The job settings' table, its strict readers and the defaults every front end shares
// (src/engine/job.cpp).

#include "ferry/engine.h"
#include "ferry/job.h"
#include "support/catch.h"

namespace ferry {
namespace {

using Json = nlohmann::json;
using Catch::Contains;

TEST_CASE("every engine setting is in the job settings' table, with a phrase for its range") {
  for (const std::string& key : engine_config_keys()) {
    INFO(key);
    REQUIRE(find_job_setting(key) != nullptr);
    CHECK_FALSE(job_setting_range(key).empty());
  }
  CHECK(job_setting_range("log_every") == "an integer >= 1");
  CHECK(job_setting_range("demo_digits") == "an integer from 1 to 9");
  CHECK(job_setting_range("dropout") == "auto or a number in [0, 1)");
  CHECK(job_setting_range("fuyou_host_blocks") == "auto or an integer >= 0");
  CHECK(job_setting_range("zo_eps") == "a number > 0");
  CHECK(job_setting_range("loss_scale") == "null or true or false");
  CHECK(job_defaults().contains("steps"));
  CHECK_FALSE(job_defaults().contains("beta1"));  // the engine's default
}

TEST_CASE("every setting has a group and one line of help, and the groups are few and in order") {
  for (const JobSetting& setting : job_settings()) {
    INFO(setting.key);
    CHECK_FALSE(setting.group.empty());
    CHECK(setting.help.size() >= 10);
    CHECK(setting.help.find('\n') == std::string::npos);
  }
  CHECK(job_setting_groups() == std::vector<std::string>{"Model", "Data", "Optimization", "LoRA",
                                                        "Memory and offload", "zo2", "Checkpoints and export",
                                                        "Logging"});
}

TEST_CASE("complete_job: real-job defaults, the demo's and zo2's where they apply, then what is given") {
  const Json real = complete_job({{"model", "llama-7b"}, {"data", "train.jsonl"}});
  CHECK(real["precision"] == "auto");
  CHECK(real["batch"] == 8);
  CHECK(real["seq"] == 1024);
  CHECK(real["steps"] == "auto");
  CHECK(real["epochs"] == 1.0);
  CHECK(real["lr"] == 5e-5);
  CHECK(real["schedule"] == "cosine");
  CHECK(real["warmup"] == "auto");
  CHECK(real["max_grad_norm"] == 1.0);
  CHECK(real["out"] == "runs/job");
  CHECK(job_warmup_steps(real, 1000) == 30);  // warmup_ratio 0.03
  CHECK(job_warmup_steps(complete_job({{"warmup", 7}}), 1000) == 7);

  const Json demo = complete_job(Json::object());
  CHECK(demo["data"] == "demo");
  CHECK(demo["precision"] == "fp32");
  CHECK(demo["steps"] == 400);
  CHECK(demo["lr"] == 3e-3);
  CHECK(demo["warmup"] == 20);
  CHECK(demo["out"] == "runs/demo");
  CHECK(complete_job({{"batch", 4}})["batch"] == 4);
  CHECK(complete_job({{"epochs", 2.0}})["steps"] == "auto");  // the demo's 400 steps give way
  CHECK(complete_job({{"warmup_ratio", 0.1}})["warmup"] == "auto");
  CHECK(complete_job({{"model", "tiny-gpt2"}})["seq"] == 1024);  // another model on the demo data: a real job

  const Json zo2 = complete_job({{"data", "train.jsonl"}, {"mode", "zo2"}});
  CHECK(zo2["optimizer"] == "sgd");
  CHECK(zo2["max_grad_norm"] == 0.0);
  CHECK(zo2["weight_decay"] == 0.0);
  CHECK(zo2["lr"] == 1e-7);
  CHECK(complete_job({{"data", "x.jsonl"}, {"mode", "zo2"}, {"lora_rank", 8}})["lr"] == 1e-4);
  CHECK(complete_job({{"data", "x.jsonl"}, {"lora_rank", 16}})["lr"] == 2e-4);
  CHECK(complete_job({{"data", "x.jsonl"}, {"optimizer", "sgd"}})["lr"] == 1e-2);
  CHECK(complete_job({{"data", "x.jsonl"}, {"mode", "zo2"}, {"max_grad_norm", 0.5}})["max_grad_norm"] == 0.5);
}

TEST_CASE("complete_job refuses unknown keys and settings that say one thing twice") {
  CHECK_THROWS_WITH(complete_job({{"stpes", 3}}), Contains("unknown setting 'stpes' (did you mean 'steps'?)"));
  CHECK_THROWS_WITH(complete_job({{"learning_rate", 3}}), Contains("valid settings: ") && Contains("lora_rank"));
  CHECK_THROWS_WITH(complete_job({{"steps", 100}, {"epochs", 2.0}}),
                    Contains("steps = 100 and epochs = 2.0 both set the run's length: give one of them"));
  CHECK_THROWS_WITH(complete_job({{"warmup", 10}, {"warmup_ratio", 0.1}}), Contains("both set the warm-up"));
  CHECK_NOTHROW(complete_job({{"steps", "auto"}, {"epochs", 2.0}}));
}

TEST_CASE("precision auto is the device's: fp32 on the CPU") {
  CHECK(engine_config_from_json(R"({"precision": "auto", "device": "cpu"})").precision == Precision::kF32);
  CHECK(preferred_precision(torch::Device(torch::kCUDA)) == Precision::kBF16);
}

TEST_CASE("integers are read exactly or refused, never truncated") {
  CHECK(read_job_setting("steps", "100", "--steps 100") == 100);
  CHECK(read_job_setting("steps", "1e2", "--steps 1e2") == 100);
  CHECK(read_job_setting("steps", 1e2, "steps in job.yaml") == 100);
  CHECK(read_job_setting("steps", "+7", "--steps +7") == 7);
  CHECK_THROWS_WITH(read_job_setting("steps", "3.5", "--steps 3.5"),
                    Contains("--steps 3.5 is invalid: not a whole number") && Contains("an integer >= 1"));
  CHECK_THROWS_WITH(read_job_setting("steps", 3.5, "steps = 3.5 in job.yaml"), Contains("steps = 3.5 in job.yaml"));
  CHECK_THROWS_WITH(read_job_setting("steps", "1e-1", "--steps 1e-1"), Contains("not a whole number"));
  CHECK_THROWS_WITH(read_job_setting("steps", "10x", "--steps 10x"), Contains("not an integer"));
  CHECK_THROWS_WITH(read_job_setting("steps", "", "--steps ''"), Contains("not an integer"));
  CHECK_THROWS_WITH(read_job_setting("steps", "99999999999999999999", "--steps 99999999999999999999"),
                    Contains("beyond 2^63"));
  CHECK_THROWS_WITH(read_job_setting("steps", 1e30, "steps = 1e30 in job.yaml"), Contains("beyond 2^63"));
  CHECK_THROWS_WITH(read_job_setting("steps", "0", "--steps 0"), Contains("steps must be auto or an integer >= 1"));
  CHECK_THROWS_WITH(read_job_setting("log_every", "0", "--log-every 0"),
                    Contains("--log-every 0 is invalid") && Contains("log_every must be an integer >= 1"));
  CHECK_THROWS_WITH(read_job_setting("demo_digits", "12", "--demo-digits 12"), Contains("from 1 to 9"));
  CHECK_THROWS_WITH(read_job_setting("steps", true, "steps = true in job.yaml"), Contains("an integer >= 1"));
  CHECK(read_job_setting("fuyou_host_blocks", "auto", "--fuyou-host-blocks auto") == "auto");
  CHECK(read_job_setting("fuyou_host_blocks", "3", "--fuyou-host-blocks 3") == 3);
  CHECK_THROWS_WITH(read_job_setting("fuyou_host_blocks", "many", "--fuyou-host-blocks many"),
                    Contains("auto or an integer >= 0"));
}

TEST_CASE("numbers, booleans and sizes are read strictly, and every error names the setting") {
  CHECK(read_job_setting("lr", "3e-4", "--lr 3e-4") == 3e-4);
  CHECK_THROWS_WITH(read_job_setting("lr", "abc", "--lr abc"),
                    Contains("--lr abc is invalid: not a number") && Contains("lr must be auto or a number >= 0"));
  CHECK_THROWS_WITH(read_job_setting("lr", "1e-3x", "--lr 1e-3x"), Contains("not a number"));
  CHECK_THROWS_WITH(read_job_setting("lr", "nan", "--lr nan"), Contains("--lr nan"));
  CHECK_THROWS_WITH(read_job_setting("lr", "-1", "--lr -1"), Contains("lr must be auto or a number >= 0"));
  CHECK_THROWS_WITH(read_job_setting("lr", "fast", "lr = \"fast\" in job.yaml"), Contains("lr = \"fast\" in job.yaml"));
  CHECK_THROWS_WITH(read_job_setting("beta1", 1.0, "beta1 = 1.0 in job.yaml"), Contains("a number in [0, 1)"));
  CHECK(read_job_setting("dropout", "auto", "--dropout auto") == "auto");
  CHECK(read_job_setting("dropout", "0.1", "--dropout 0.1") == 0.1);
  CHECK_THROWS_WITH(read_job_setting("dropout", "1", "--dropout 1"), Contains("auto or a number in [0, 1)"));
  CHECK(read_job_setting("answer_only", "false", "--answer-only false") == false);
  CHECK_THROWS_WITH(read_job_setting("answer_only", "yes", "--answer-only yes"), Contains("true or false"));
  CHECK(read_job_setting("loss_scale", nullptr, "loss_scale = null in job.yaml").is_null());
  CHECK(read_job_setting("gpu_budget", "24GiB", "--gpu-budget 24GiB") == "24GiB");
  CHECK_THROWS_WITH(read_job_setting("gpu_budget", "0.0001", "--gpu-budget 0.0001"),
                    Contains("--gpu-budget 0.0001 is invalid") && Contains("less than one byte"));
  CHECK_THROWS_WITH(read_job_setting("host_budget", 1e30, "host_budget = 1e30 in job.yaml"),
                    Contains("host_budget = 1e30") && Contains("2^63"));
  CHECK_THROWS_WITH(read_job_setting("host_budget", "lots", "--host-budget lots"), Contains("--host-budget lots"));
  CHECK(read_job_setting("nvme", Json::array({"/a", "/b"}), "nvme in job.yaml").size() == 2);
  CHECK_THROWS_WITH(read_job_setting("model", 7, "model = 7 in job.yaml"), Contains("model must be text"));
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

}  // namespace
}  // namespace ferry
