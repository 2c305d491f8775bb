// `ferry finetune`: a fine-tuning job from flags and/or a JSON config. With no arguments it
// fine-tunes a tiny LLaMA-shaped model on the built-in addition task in zero-offload mode, on
// whatever machine it runs on, and reports the exact-match accuracy before and after.

#include <chrono>
#include <cmath>
#include <csignal>
#include <cstdio>
#include <cxxopts.hpp>
#include <fstream>
#include <iostream>
#include <optional>
#include <set>
#include <nlohmann/json.hpp>
#include <sstream>

#include "cli/command.h"
#include "ferry/data.h"
#include "ferry/engine.h"
#include "ferry/fs.h"
#include "ferry/model.h"
#include "ferry/plan.h"

namespace ferry::cli {
namespace {

using Json = nlohmann::json;
using Clock = std::chrono::steady_clock;

// Every setting of a job, with its default. Flags and the config file use the same names.
const Json& defaults() {
  static const Json kDefaults = {
      {"model", "tiny-llama"},       {"data", "demo"},          {"mode", "zero-offload"},
      {"precision", "fp32"},         {"device", "auto"},        {"gpu_budget", "0"},
      {"host_budget", "0"},          {"steps", 400},            {"batch", 32},
      {"seq", 16},                   {"lr", 3e-3},              {"schedule", "cosine"},
      {"warmup", 20},                {"min_lr_ratio", 0.1},     {"optimizer", "adamw"},
      {"weight_decay", 0.01},        {"grad_accum", 1},         {"max_grad_norm", 1.0},
      {"keep_graph_blocks", 0},      {"seed", 1},               {"out", "runs/demo"},
      {"resume", "none"},            {"save_every", 0},         {"eval_problems", 100},
      {"log_every", 10},             {"demo_digits", 1},           {"trace", ""},
      {"momentum", 0.0},             {"nvme", ""},              {"nvme_budget", "0"},
      {"zo_eps", 1e-3},              {"zo_samples", 1},         {"zo_blocks", "host"},
      {"zo_gpu_blocks", "0"},        {"zo_host_blocks", 0},     {"zo_storage", ""},
      {"zo_transfer", "storage"},    {"zo_window", 3},          {"zo_write_back", 4},
      {"fuyou_host_blocks", "auto"}, {"fuyou_window", 3},
      {"activations", "auto"},       {"micro_batch_order", "auto"},
  };
  return kDefaults;
}

Json read_json_file(const std::string& path) {
  std::ifstream in(path);
  FERRY_CHECK(in.good(), "cannot read config file '", path, "'");
  try {
    return Json::parse(in);
  } catch (const Json::exception& error) {
    throw Error(detail::concat("config file '", path, "' is not valid JSON: ", error.what()));
  }
}

// Where zo2 needs other defaults than the first-order modes: no gradient to clip, and MeZO's
// optimizer (plain ZO-SGD, no weight decay) at a step size its noisy gradient estimate tolerates.
const Json& zo2_defaults() {
  static const Json kDefaults = {
      {"max_grad_norm", 0.0}, {"optimizer", "sgd"}, {"lr", 1e-4}, {"weight_decay", 0.0}};
  return kDefaults;
}

// defaults (zo2's where the mode is zo2) <- config file <- flags given on the command line.
Json resolve(const cxxopts::ParseResult& args) {
  Json config = defaults();
  std::set<std::string> given;  // set by the file or a flag
  if (args.count("config")) {
    Json file = read_json_file(args["config"].as<std::string>());
    for (auto& [key, value] : file.items()) {
      FERRY_CHECK(config.contains(key), "unknown setting '", key, "' in ",
                  args["config"].as<std::string>(), "; valid settings: ", [] {
                    std::string names;
                    for (auto& item : defaults().items()) names += (names.empty() ? "" : ", ") + item.key();
                    return names;
                  }());
      config[key] = value;
      given.insert(key);
    }
  }
  for (auto& [key, value] : defaults().items()) {
    std::string flag = key;
    std::replace(flag.begin(), flag.end(), '_', '-');
    if (!args.count(flag)) continue;
    const std::string text = args[flag].as<std::string>();
    if (value.is_number_integer()) {
      config[key] = std::stoll(text);
    } else if (value.is_number()) {
      config[key] = std::stod(text);
    } else {
      config[key] = text;
    }
    given.insert(key);
  }
  if (config["mode"] == "zo2") {
    for (auto& [key, value] : zo2_defaults().items()) {
      if (!given.count(key)) config[key] = value;
    }
  }
  return config;
}

// The job's engine settings, read by the parser the other front ends share. "auto" activations,
// host blocks and micro-batch order are left for the plan (plan_fuyou; without one the order is
// batch-major); one activations name stands for every block.
EngineConfig engine_config(const Json& job, std::int64_t blocks) {
  Json settings;
  for (const std::string& key : engine_config_keys()) {
    if (job.contains(key)) settings[key] = job[key];
  }
  const Json host_blocks = settings["fuyou_host_blocks"];
  if (host_blocks == "auto") {
    settings.erase("fuyou_host_blocks");
  } else if (host_blocks.is_string()) {
    const std::string text = host_blocks.get<std::string>();
    FERRY_CHECK(!text.empty() && text.find_first_not_of("0123456789") == std::string::npos,
                "fuyou_host_blocks = '", text, "' is invalid: use auto or a number of blocks");
    settings["fuyou_host_blocks"] = std::stoll(text);
  }
  const std::string order = settings["micro_batch_order"];
  FERRY_CHECK(order == "auto" || order == "batch-major" || order == "layer-major", "micro_batch_order = '", order,
              "' is invalid: use auto, batch-major or layer-major");
  if (order == "auto") settings.erase("micro_batch_order");
  const Json activations = settings["activations"];
  settings.erase("activations");
  EngineConfig config = engine_config_from_json(settings.dump());
  if (activations.is_array()) {
    config.activations = engine_config_from_json(Json{{"activations", activations}}.dump()).activations;
  } else if (activations != "auto") {
    config.activations = parse_activations(activations.get<std::string>(), blocks);
  }
  return config;
}

// Whether the job plans fuyou's activations or host blocks before it runs.
bool plans_fuyou(const Json& job, const EngineConfig& config) {
  return config.mode == Mode::kFuyou && (job["activations"] == "auto" || job["fuyou_host_blocks"] == "auto");
}

LayeredModel load_model(const std::string& name, std::uint64_t seed) {
  if (name.find('/') != std::string::npos) return models::from_pretrained(name);
  return models::build(models::preset(name), seed);
}

// Note: fuyou's profiling step runs on an engine of its own, dropped before the job's is built:
// an engine's activations are fixed when it is built, and the job's come from the plan, which
// needs the profile. Every checkpoint goes to NVMe and tracing is on (each part's span is then
// compute alone); two steps train on one batch of the job's shape and the second is measured (the
// first pays for first-touch allocations and the page cache). The steps change the model's
// weights, so the job loads its model again.
MeasuredCompute profile_fuyou(LayeredModel model, EngineConfig config, const data::Batch& batch) {
  config.activations.assign(model.num_blocks(), {true, Tier::kNvme});
  config.fuyou.host_blocks = 0;
  config.grad_accumulation = 1;
  config.micro_batch_order = MicroBatchOrder::kBatchMajor;  // one micro-batch has no order
  config.trace = true;
  Engine engine(std::move(model), config);
  engine.train_step(batch);
  const EngineStats warm_up = engine.stats();
  engine.train_step(batch);
  const EngineStats both = engine.stats();
  MeasuredCompute measured;
  measured.batch = batch.input_ids.size(0);
  measured.seq = batch.input_ids.size(1);
  for (std::size_t part = 0; part < both.part_forward_seconds.size(); ++part) {
    measured.part_forward_seconds.push_back(both.part_forward_seconds[part] - warm_up.part_forward_seconds[part]);
    measured.part_backward_seconds.push_back(both.part_backward_seconds[part] - warm_up.part_backward_seconds[part]);
  }
  return measured;
}

// The figures the plan runs on: --hardware names a calibration file (`ferry bench calibrate
// --out FILE`) or a preset; without it, a quick calibration of this machine and the job's NVMe
// directories (a few seconds).
Hardware job_hardware(const std::string& name, const EngineConfig& config) {
  if (!name.empty()) return fs::exists(name) ? Hardware::load(name) : hardware_preset(name);
  CalibrationOptions options;
  options.nvme_directories = config.nvme_directories;
  options.nvme_bytes = std::uint64_t{32} << 20;
  options.repeat = 1;
  options.quick = true;
  return calibrate(options);
}

Plan plan_fuyou(const Json& job, const EngineConfig& config, const models::ModelConfig& shape,
                MeasuredCompute measured, Hardware hardware) {
  PlanRequest request;
  request.model_name = job["model"];
  request.model = shape;
  request.engine = config;
  request.batch = job["batch"];
  request.seq = job["seq"];
  request.choose_activations = job["activations"] == "auto";
  request.choose_host_blocks = job["fuyou_host_blocks"] == "auto";
  request.choose_micro_batch_order = job["micro_batch_order"] == "auto";
  request.measured = std::move(measured);
  request.hardware = std::move(hardware);
  Plan plan = make_plan(request);
  std::fprintf(stderr, "%s\n", format_plan(plan).c_str());
  FERRY_CHECK(plan.fits, "the fuyou plan does not fit the budgets: see the fixes above");
  return plan;
}

// The job as it runs: the plan's choices in place of "auto", so that the file is an engine config
// as it stands (the Python Engine takes it) and runs the same job again without planning.
Json resolved_job(Json job, const EngineConfig& config) {
  job["fuyou_host_blocks"] = config.fuyou.host_blocks;
  job["micro_batch_order"] = to_string(config.micro_batch_order);
  if (config.activations.empty()) {
    job.erase("activations");
  } else {
    Json names = Json::array();
    for (const BlockActivations& block : config.activations) {
      names.push_back(block.recompute ? to_string(block.tier) : "graph");
    }
    job["activations"] = names;
  }
  return job;
}

// The plan's step time against the run's, leaving out the first step (allocations, first reads).
void compare_with_plan(const Plan& plan, const std::vector<double>& step_seconds) {
  if (step_seconds.size() < 2) {
    std::fprintf(stderr, "plan: predicted %.3f s/step; too few steps to compare (the first is left out)\n",
                 plan.step_seconds);
    return;
  }
  double sum = 0;
  for (std::size_t i = 1; i < step_seconds.size(); ++i) sum += step_seconds[i];
  const double measured = sum / static_cast<double>(step_seconds.size() - 1);
  std::fprintf(stderr, "plan: predicted %.3f s/step, measured %.3f s/step (mean of the %zu steps after the first): "
               "measured / predicted = %.2f\n", plan.step_seconds, measured, step_seconds.size() - 1,
               measured / plan.step_seconds);
}

std::string format_duration(double seconds) {
  const long total = std::lround(std::max(0.0, seconds));
  char text[32];
  std::snprintf(text, sizeof text, "%ld:%02ld", total / 60, total % 60);
  return text;
}

void draw_progress(std::int64_t step, std::int64_t steps, const StepResult& result,
                   double tokens_per_s, double elapsed) {
  const int width = 24;
  const int filled = static_cast<int>(width * step / std::max<std::int64_t>(1, steps));
  const double eta = step > 0 ? elapsed / static_cast<double>(step) * static_cast<double>(steps - step) : 0;
  std::fprintf(stderr, "\r[%s%s] step %lld/%lld  loss %.4f  %.0f tok/s  ETA %s ",
               std::string(filled, '#').c_str(), std::string(width - filled, '.').c_str(),
               static_cast<long long>(step), static_cast<long long>(steps), result.loss,
               tokens_per_s, format_duration(eta).c_str());
  std::fflush(stderr);
}

volatile std::sig_atomic_t g_stop_requested = 0;

void request_stop(int) { g_stop_requested = 1; }

double demo_accuracy(Engine& engine, const data::AdditionTask& task, std::int64_t problems) {
  auto eval = data::addition_problems(task, data::Split::kEval, problems);
  return data::exact_match_accuracy(eval, [&](const std::vector<std::int64_t>& prompt,
                                               std::int64_t max_new_tokens) {
    return engine.generate(prompt, max_new_tokens, data::ByteTokenizer::kEos);
  });
}

int run_finetune(int argc, char** argv) {
  cxxopts::Options options(argv[0], "Fine-tune a model (default: a tiny model on the built-in addition task). "
                                    "With --mode zo2 the defaults are optimizer sgd, lr 1e-4, weight decay 0 and "
                                    "no clipping. With --mode fuyou and --activations or --fuyou-host-blocks auto, "
                                    "a profiling step (every checkpoint on NVMe) measures the model's compute, the "
                                    "planner chooses them (docs/plan.md), and the run ends with the predicted "
                                    "against the measured step time; --micro-batch-order auto (the default) lets "
                                    "that plan choose the order, and is batch-major without one. --activations "
                                    "takes gpu, host, nvme or graph for every block, or a comma list with one per "
                                    "block.");
  options.add_options()("config", "JSON job file; flags override it", cxxopts::value<std::string>());
  options.add_options()("hardware", "fuyou planning: a calibration file (ferry bench calibrate) or a hardware "
                        "preset; default: a quick calibration", cxxopts::value<std::string>());
  for (auto& [key, value] : defaults().items()) {
    std::string flag = key;
    std::replace(flag.begin(), flag.end(), '_', '-');
    options.add_options()(flag, "default: " + (value.is_string() ? value.get<std::string>() : value.dump()),
                          cxxopts::value<std::string>());
  }
  options.add_options()("h,help", "show this help");
  auto args = options.parse(argc, argv);
  if (args.count("help")) {
    std::cout << options.help() << "\n";
    return 0;
  }

  const Json job = resolve(args);
  const std::string out = job["out"];
  const std::int64_t steps = job["steps"];
  const bool demo = job["data"] == "demo";
  FERRY_CHECK(steps >= 1, "steps = ", steps, " is invalid: it must be at least 1");

  LayeredModel model = load_model(job["model"], job["seed"]);
  const auto blocks = static_cast<std::int64_t>(model.num_blocks());
  const std::int64_t vocab = model.config() ? model.config()->vocab_size : 0;
  data::AdditionTask task{job["demo_digits"], job["seed"]};
  data::LoaderOptions loader_options;
  loader_options.batch_size = job["batch"];
  loader_options.sequence_length = job["seq"];
  loader_options.seed = job["seed"];
  if (vocab > 0) loader_options.vocab_size = vocab;
  std::shared_ptr<const data::Dataset> dataset;
  if (demo) {
    dataset = data::addition_dataset(task, data::Split::kTrain, 20000);
    loader_options.pack = false;
    loader_options.answer_only = true;
  } else {
    dataset = data::open_dataset(job["data"], job["seq"]);
  }
  data::DataLoader loader(dataset, loader_options);

  EngineConfig config = engine_config(job, blocks);
  std::optional<Plan> plan;
  if (plans_fuyou(job, config)) {
    FERRY_CHECK(model.config(), "planning fuyou needs the model's shape: use a preset or a Hugging Face directory");
    const models::ModelConfig shape = *model.config();
    std::fprintf(stderr, "fuyou: profiling two steps with every checkpoint on NVMe (the second is measured), "
                         "then planning\n");
    const data::Batch sample = data::DataLoader(dataset, loader_options).next();
    MeasuredCompute measured = profile_fuyou(std::move(model), config, sample);
    const std::string hardware = args.count("hardware") ? args["hardware"].as<std::string>() : "";
    plan = plan_fuyou(job, config, shape, std::move(measured), job_hardware(hardware, config));
    config = plan_engine_config(*plan);
    model = load_model(job["model"], job["seed"]);
  }
  Engine engine(std::move(model), config);
  fs::make_directories(out + "/checkpoints");
  std::ofstream(out + "/config.json") << resolved_job(job, config).dump(2) << "\n";

  const std::string latest_file = out + "/checkpoints/latest";
  std::string resume = job["resume"];
  if (resume == "auto") {
    std::ifstream latest(latest_file);
    std::getline(latest, resume);
    if (resume.empty()) resume = "none";
  }
  if (resume != "none") {
    loader.restore(data::LoaderState::from_json(engine.load(resume)));
    std::fprintf(stderr, "resumed from %s at step %lld\n", resume.c_str(),
                 static_cast<long long>(engine.steps_taken()));
  }

  std::fprintf(stderr, "ferry finetune: %s, %lld parameters, mode %s, %s on %s, %lld steps of %lld x %lld tokens\n",
               std::string(job["model"]).c_str(), static_cast<long long>(engine.model().parameter_count()),
               to_string(config.mode), to_string(config.precision), config.device.str().c_str(),
               static_cast<long long>(steps), static_cast<long long>(loader_options.batch_size),
               static_cast<long long>(loader_options.sequence_length));
  const std::int64_t eval_problems = job["eval_problems"];
  if (demo && engine.steps_taken() == 0) {
    std::fprintf(stderr, "exact-match accuracy before: %.1f%%\n",
                 100 * demo_accuracy(engine, task, eval_problems));
  }

  auto save = [&](const std::string& why) {
    char name[32];
    std::snprintf(name, sizeof name, "step-%06lld", static_cast<long long>(engine.steps_taken()));
    const std::string dir = out + "/checkpoints/" + name;
    engine.save(dir, loader.state().to_json());
    std::ofstream(latest_file + ".tmp") << dir << "\n";
    std::rename((latest_file + ".tmp").c_str(), latest_file.c_str());
    std::fprintf(stderr, "\ncheckpoint (%s): %s\n", why.c_str(), dir.c_str());
  };

  std::signal(SIGINT, request_stop);
  std::signal(SIGTERM, request_stop);
  std::ofstream metrics(out + "/metrics.jsonl", std::ios::app);
  const std::int64_t save_every = job["save_every"];
  const std::int64_t log_every = job["log_every"];
  const auto start = Clock::now();
  const std::int64_t first_step = engine.steps_taken();
  std::int64_t tokens = 0;
  StepResult last;
  std::vector<double> step_seconds;
  auto step_start = Clock::now();
  while (engine.steps_taken() < steps && !g_stop_requested) {
    auto result = engine.train_step(loader.next());
    if (!result) continue;
    step_seconds.push_back(std::chrono::duration<double>(Clock::now() - step_start).count());
    last = *result;
    tokens += result->tokens;
    const double elapsed = std::chrono::duration<double>(Clock::now() - start).count();
    const double tokens_per_s = static_cast<double>(tokens) / elapsed;
    metrics << Json{{"step", result->step},         {"loss", result->loss},
                    {"lr", result->lr},             {"grad_norm", result->grad_norm},
                    {"loss_scale", result->loss_scale}, {"skipped", result->skipped},
                    {"tokens", result->tokens},     {"tokens_per_s", tokens_per_s},
                    {"elapsed_s", elapsed}}
                   .dump()
            << "\n";
    if (result->step % log_every == 0 || result->step == steps) {
      draw_progress(result->step - first_step, steps - first_step, *result, tokens_per_s, elapsed);
    }
    if (save_every > 0 && result->step % save_every == 0) save("every " + std::to_string(save_every) + " steps");
    step_start = Clock::now();
  }
  metrics.flush();
  engine.flush();  // zo2 applies the last step's update (a no-op in the other modes)
  if (g_stop_requested) {
    save("interrupted");
    return 130;
  }
  save("final");
  if (demo) {
    std::fprintf(stderr, "exact-match accuracy after %lld steps: %.1f%% (final loss %.4f)\n",
                 static_cast<long long>(engine.steps_taken()),
                 100 * demo_accuracy(engine, task, eval_problems), last.loss);
  }
  if (config.trace) {
    std::fprintf(stderr, "trace: %s\n  %s\n", std::string(job["trace"]).c_str(),
                 engine.write_trace(job["trace"]).c_str());
  }
  EngineStats stats = engine.stats();
  std::fprintf(stderr, "time: forward %.1f s, backward %.1f s, optimizer %.1f s (waited %.1f s)\n",
               stats.forward_seconds, stats.backward_seconds, stats.optimizer_seconds,
               stats.optimizer_wait_seconds);
  if (plan) compare_with_plan(*plan, step_seconds);
  std::fprintf(stderr, "outputs: %s/metrics.jsonl, %s/config.json, %s/checkpoints/\n", out.c_str(),
               out.c_str(), out.c_str());
  return 0;
}

}  // namespace

FERRY_CLI_COMMAND("finetune", "fine-tune a model (no arguments: the built-in demo job)", run_finetune);

}  // namespace ferry::cli
