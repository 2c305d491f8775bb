// Names of the engine's configuration choices, parsed with errors that list the valid ones.

#include "ferry/engine.h"

namespace ferry {
namespace {

template <typename Enum, size_t N>
Enum parse_choice(const std::string& name, const char* what, const Enum (&choices)[N],
                  const char* (*to_name)(Enum)) {
  std::string valid;
  for (Enum choice : choices) {
    if (name == to_name(choice)) return choice;
    valid += (valid.empty() ? "" : ", ") + std::string(to_name(choice));
  }
  throw Error(detail::concat("unknown ", what, " '", name, "': valid ", what, "s are ", valid));
}

}  // namespace

const char* to_string(Mode mode) {
  switch (mode) {
    case Mode::kGpu: return "gpu";
    case Mode::kZeroOffload: return "zero-offload";
    case Mode::kZo2: return "zo2";
  }
  return "unknown";
}

Mode parse_mode(const std::string& name) {
  static const Mode kModes[] = {Mode::kGpu, Mode::kZeroOffload, Mode::kZo2};
  return parse_choice(name, "mode", kModes, to_string);
}

Tier parse_tier(const std::string& name) {
  static const Tier kTiers[] = {Tier::kGpu, Tier::kHost, Tier::kNvme};
  return parse_choice(name, "tier", kTiers, to_string);
}

const char* to_string(Precision precision) {
  switch (precision) {
    case Precision::kF32: return "fp32";
    case Precision::kBF16: return "bf16";
    case Precision::kF16: return "fp16";
  }
  return "unknown";
}

Precision parse_precision(const std::string& name) {
  static const Precision kPrecisions[] = {Precision::kF32, Precision::kBF16, Precision::kF16};
  return parse_choice(name, "precision", kPrecisions, to_string);
}

const char* to_string(OptimizerKind kind) {
  switch (kind) {
    case OptimizerKind::kAdamW: return "adamw";
    case OptimizerKind::kAdam: return "adam";
    case OptimizerKind::kSgd: return "sgd";
    case OptimizerKind::kAdagrad: return "adagrad";
  }
  return "unknown";
}

OptimizerKind parse_optimizer(const std::string& name) {
  static const OptimizerKind kKinds[] = {OptimizerKind::kAdamW, OptimizerKind::kAdam,
                                         OptimizerKind::kSgd, OptimizerKind::kAdagrad};
  return parse_choice(name, "optimizer", kKinds, to_string);
}

const char* to_string(LrSchedule schedule) {
  switch (schedule) {
    case LrSchedule::kConstant: return "constant";
    case LrSchedule::kLinear: return "linear";
    case LrSchedule::kCosine: return "cosine";
  }
  return "unknown";
}

LrSchedule parse_schedule(const std::string& name) {
  static const LrSchedule kSchedules[] = {LrSchedule::kConstant, LrSchedule::kLinear,
                                          LrSchedule::kCosine};
  return parse_choice(name, "schedule", kSchedules, to_string);
}

}  // namespace ferry
