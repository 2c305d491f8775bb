// The plan as a table, as JSON, and as the Chrome trace of the predicted step.

#include <algorithm>
#include <cstdarg>
#include <cstdio>
#include <fstream>

#include <nlohmann/json.hpp>
#include <torch/version.h>

#include "ferry/check.h"
#include "ferry/io.h"
#include "ferry/memory.h"
#include "engine/sizing.h"
#include "ferry/plan.h"

namespace ferry {
namespace {

using Json = nlohmann::ordered_json;

std::string printf_string(const char* format, ...) __attribute__((format(printf, 1, 2)));
std::string printf_string(const char* format, ...) {
  char text[512];
  va_list args;
  va_start(args, format);
  std::vsnprintf(text, sizeof text, format, args);
  va_end(args);
  return text;
}

// "blocks 0-41 recompute from nvme, blocks 42-95 graph on host"
std::string describe_activations(const std::vector<BlockActivations>& blocks) {
  std::string text;
  for (std::size_t begin = 0; begin < blocks.size();) {
    std::size_t end = begin;
    const std::string what = blocks[begin].describe();
    while (end + 1 < blocks.size() && blocks[end + 1].describe() == what) ++end;
    text += (text.empty() ? "" : ", ") +
            (begin == end ? "block " + std::to_string(begin)
                          : "blocks " + std::to_string(begin) + "-" + std::to_string(end)) +
            " " + what;
    begin = end + 1;
  }
  return text;
}

}  // namespace

const char* to_string(AttentionKernel kernel) {
  return kernel == AttentionKernel::kFused ? "fused" : "materialized";
}

AttentionKernel parse_attention_kernel(const std::string& name) {
  if (name == "fused") return AttentionKernel::kFused;
  FERRY_CHECK(name == "materialized", "unknown attention kernel '", name, "' (valid: fused, materialized)");
  return AttentionKernel::kMaterialized;
}

// Note: LibTorch 2 runs SDPA, whose CUDA kernels keep no seq x seq scores; ferry on LibTorch
// 1.13 computes attention plainly (src/model/model.cpp).
AttentionKernel default_attention_kernel() {
  return TORCH_VERSION_MAJOR >= 2 ? AttentionKernel::kFused : AttentionKernel::kMaterialized;
}

std::vector<BlockActivations> parse_activations(const std::string& text, std::int64_t blocks) {
  std::vector<BlockActivations> out;
  std::size_t start = 0;
  while (start <= text.size()) {
    const std::size_t comma = std::min(text.find(',', start), text.size());
    out.push_back(parse_block_activations(text.substr(start, comma - start)));
    start = comma + 1;
  }
  if (out.size() == 1) out.assign(static_cast<std::size_t>(std::max<std::int64_t>(blocks, 0)), out.front());
  FERRY_CHECK(static_cast<std::int64_t>(out.size()) == blocks, "activations '", text, "' name ", out.size(),
              " blocks but the model has ", blocks, ": give one name for every block or one per block");
  return out;
}

const char* to_string(Resource resource) {
  switch (resource) {
    case Resource::kCompute: return "GPU compute";
    case Resource::kPcieUp: return "PCIe up";
    case Resource::kPcieDown: return "PCIe down";
    case Resource::kNvmeRead: return "NVMe read";
    case Resource::kNvmeWrite: return "NVMe write";
    case Resource::kCpuOptimizer: return "CPU optimizer";
    case Resource::kCollectives: return "collectives";
  }
  return "?";
}

std::string format_plan(const Plan& plan) {
  const PlanRequest& request = plan.request;
  const std::int64_t tokens = request.batch * request.seq * request.engine.grad_accumulation;
  std::string out = printf_string(
      "plan: %s (%s parameters), %s mode, %s, batch %lld x seq %lld x %lld micro-batches = %lld "
      "tokens/step, attention %s\n",
      request.model_name.empty() ? request.model.model_type.c_str() : request.model_name.c_str(),
      models::format_parameter_count(request.model.parameter_count()).c_str(), to_string(request.engine.mode),
      to_string(request.engine.precision), static_cast<long long>(request.batch),
      static_cast<long long>(request.seq), static_cast<long long>(request.engine.grad_accumulation),
      static_cast<long long>(tokens), to_string(request.attention));
  out += "hardware: " + request.hardware.name + (request.hardware.gpu_is_host ? " (no GPU: the GPU tier is host memory)" : "") + "\n";
  if (request.world_size > 1) {
    out += printf_string("ranks: %d data-parallel, one device each; bytes, budgets and step are one rank's (rank 0: "
                         "ZeRO-2 shards of the fp32 master and optimizer states, 1/%d each)%s\n",
                         request.world_size, request.world_size,
                         request.hardware.link_gbps > 0 || request.engine.mode == Mode::kZo2
                             ? ""
                             : "; collectives not timed: no link bandwidth (--link-gbps)");
  }
  out += "\n";
  out += printf_string("%-5s %-36s %12s\n", "tier", "role", "bytes");
  for (Tier tier : {Tier::kGpu, Tier::kHost, Tier::kNvme}) {
    const int t = static_cast<int>(tier);
    for (const PlanItem& item : plan.items) {
      if (item.tier == tier) {
        out += printf_string("%-5s %-36s %12s\n", to_string(tier), item.role.c_str(), format_bytes(item.bytes).c_str());
      }
    }
    const bool over = plan.tier_budget[t] > 0 && plan.tier_bytes[t] > plan.tier_budget[t];
    out += printf_string("%-5s %-36s %12s  limit %s%s\n\n", to_string(tier), "total",
                         format_bytes(plan.tier_bytes[t]).c_str(),
                         plan.tier_budget[t] ? format_bytes(plan.tier_budget[t]).c_str() : "none",
                         over ? "  OVER" : "");
  }
  if (!plan.activations.empty()) {
    out += printf_string("activations: %s (checkpoint %s, graph %s per block)\n",
                         describe_activations(plan.activations).c_str(),
                         format_bytes(plan.checkpoint_bytes).c_str(), format_bytes(plan.graph_bytes).c_str());
  }
  if (!plan.placement.parts.empty()) {
    out += "placement" + std::string(request.engine.mode == Mode::kAuto ? " (auto)" : "") + ":\n";
    for (const std::string& line : describe_placement(plan.placement, detail::placement_roles(request.engine))) {
      out += "  " + line + "\n";
    }
    for (const std::string& note : plan.placement_notes) out += "  why: " + note + "\n";
  }
  if (request.engine.grad_accumulation > 1) {
    out += printf_string("micro-batch order: %s (%s)\n", to_string(plan.micro_batch_order),
                         request.choose_micro_batch_order && request.engine.mode != Mode::kZo2 ? "chosen" : "given");
  }
  if (request.engine.mode == Mode::kFuyou) {
    out += printf_string("host blocks (parameters in host memory): %lld of %lld, %lld blocks in flight\n",
                         static_cast<long long>(plan.host_blocks), static_cast<long long>(request.model.num_layers),
                         static_cast<long long>(request.engine.fuyou.blocks_in_flight));
  }
  if (request.measured) {
    out += printf_string("compute: measured at batch %lld x seq %lld, scaled by tokens\n",
                         static_cast<long long>(request.measured->batch), static_cast<long long>(request.measured->seq));
    if (request.measured->cpu_update_params_per_s > 0) {
      out += printf_string("CPU updates: measured in the step, %.2fe9 parameters/s (calibrated alone: %.2fe9)\n",
                           request.measured->cpu_update_params_per_s / 1e9,
                           request.hardware.cpu_adam_params_per_s / 1e9);
    }
  }
  out += printf_string("\nstep %.3f s, %.0f tokens/s, %.1f model TFLOPS (%.1f executed, recomputation included)%s\n",
                       plan.step_seconds, plan.tokens_per_s, plan.model_tflops, plan.hardware_tflops,
                       request.world_size > 1 ? " per rank" : "");
  if (request.world_size > 1) {
    out += printf_string("the job: %.0f tokens/s over %d ranks\n", plan.tokens_per_s * request.world_size,
                         request.world_size);
  }
  out += printf_string("%-14s %9s %7s %12s\n", "resource", "busy s", "of step", "moved");
  for (int r = 0; r < kResourceCount; ++r) {
    if (plan.busy_seconds[r] == 0) continue;
    out += printf_string("%-14s %9.3f %6.0f%% %12s\n", to_string(static_cast<Resource>(r)), plan.busy_seconds[r],
                         100 * plan.busy_seconds[r] / plan.step_seconds,
                         plan.moved_bytes[r] ? format_bytes(plan.moved_bytes[r]).c_str() : "");
  }
  out += std::string("bottleneck: ") + to_string(plan.bottleneck) + "\n";
  if (!plan.fits) {
    out += "\nDOES NOT FIT:\n";
    for (const std::string& shortfall : plan.shortfalls) out += "  " + shortfall + "\n";
    out += "what would fit:\n";
    for (const std::string& fix : plan.fixes) out += "  - " + fix + "\n";
  }
  return out;
}

std::string plan_to_json(const Plan& plan) {
  const PlanRequest& request = plan.request;
  Json out;
  out["model"] = {{"name", request.model_name},
                  {"model_type", request.model.model_type},
                  {"parameters", request.model.parameter_count()},
                  {"blocks", request.model.num_layers},
                  {"hidden_size", request.model.hidden_size}};
  out["mode"] = to_string(request.engine.mode);
  out["precision"] = to_string(request.engine.precision);
  out["batch"] = request.batch;
  out["seq"] = request.seq;
  out["grad_accumulation"] = request.engine.grad_accumulation;
  out["micro_batch_order"] = to_string(plan.micro_batch_order);
  out["attention"] = to_string(request.attention);
  out["hardware"] = Json::parse(request.hardware.to_json());
  if (!plan.placement.parts.empty()) out["placement"] = Json::parse(placement_to_json(plan.placement));
  out["gpu_working"] = plan_engine_config(plan).gpu_working_bytes;
  out["placement_notes"] = plan.placement_notes;
  out["items"] = Json::array();
  for (const PlanItem& item : plan.items) {
    out["items"].push_back({{"tier", to_string(item.tier)}, {"role", item.role}, {"bytes", item.bytes}});
  }
  for (Tier tier : {Tier::kGpu, Tier::kHost, Tier::kNvme}) {
    const int t = static_cast<int>(tier);
    out["tiers"][to_string(tier)] = {{"bytes", plan.tier_bytes[t]}, {"limit", plan.tier_budget[t]}};
  }
  out["fits"] = plan.fits;
  out["shortfalls"] = plan.shortfalls;
  out["fixes"] = plan.fixes;
  out["activations"] = Json::array();
  for (const BlockActivations& block : plan.activations) out["activations"].push_back(block.describe());
  out["checkpoint_bytes"] = plan.checkpoint_bytes;
  out["graph_bytes"] = plan.graph_bytes;
  out["host_blocks"] = plan.host_blocks;
  out["measured_compute"] = request.measured.has_value();
  out["world_size"] = request.world_size;
  out["step_seconds"] = plan.step_seconds;
  out["tokens_per_s"] = plan.tokens_per_s;
  out["model_tflops"] = plan.model_tflops;
  out["hardware_tflops"] = plan.hardware_tflops;
  for (int r = 0; r < kResourceCount; ++r) {
    out["resources"][to_string(static_cast<Resource>(r))] = {{"busy_seconds", plan.busy_seconds[r]},
                                                              {"moved_bytes", plan.moved_bytes[r]}};
  }
  out["bottleneck"] = to_string(plan.bottleneck);
  return out.dump(2) + "\n";
}

void write_plan_trace(const Plan& plan, const std::string& path) {
  Json events = Json::array();
  for (int r = 0; r < kResourceCount; ++r) {
    events.push_back({{"ph", "M"}, {"name", "thread_name"}, {"pid", 1}, {"tid", r},
                      {"args", {{"name", to_string(static_cast<Resource>(r))}}}});
  }
  for (const PlanSpan& span : plan.spans) {
    events.push_back({{"ph", "X"}, {"name", span.name}, {"cat", to_string(span.resource)}, {"pid", 1},
                      {"tid", static_cast<int>(span.resource)}, {"ts", span.start_s * 1e6},
                      {"dur", (span.end_s - span.start_s) * 1e6}});
  }
  write_file_durably(Env::posix(), path, Json{{"traceEvents", events}, {"displayTimeUnit", "ms"}}.dump() + "\n");
}

}  // namespace ferry
