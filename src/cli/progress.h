#pragma once

// The progress of a training run on stderr. On a terminal, one line redrawn in place, at most
// twice a second and at the last step; anywhere else (a log file, a pipe), a plain line every
// `log_every` steps and at the last, with no '\r' in it. Both say the same: the global step of
// the run (after a resume too), the loss, the learning rate, tokens/s, the latest eval loss, and
// the time left at this process's rate.

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <optional>
#include <string>

namespace ferry::cli {

struct ProgressRecord {
  std::int64_t step = 0;  // the run's global step, done
  double loss = 0;
  double lr = 0;
  double tokens_per_s = 0;
  std::optional<double> eval_loss, eval_perplexity;
  double seconds_left = 0;
};

// "step 120/400  loss 1.2345  lr 2.94e-04  5123 tok/s  eval 1.3 (ppl 3.67)  ETA 1:02".
std::string format_progress(const ProgressRecord& record, std::int64_t total_steps);

class Progress {
 public:
  // `first_step`: the steps the run had taken when this process started (a resume's).
  Progress(std::FILE* out, bool terminal, std::int64_t first_step, std::int64_t total_steps, std::int64_t log_every);

  // After each optimizer step; `tokens_per_s` over this process's steps.
  void step(std::int64_t step, double loss, double lr, double tokens_per_s, std::optional<double> eval_loss,
            std::optional<double> eval_perplexity);

  // A message of its own line (a checkpoint, a warning): it ends a line drawn in place first.
  void note(const std::string& message);

 private:
  using Clock = std::chrono::steady_clock;

  std::FILE* out_;
  bool terminal_;
  std::int64_t first_step_, total_steps_, log_every_;
  Clock::time_point start_ = Clock::now();
  std::optional<Clock::time_point> last_drawn_;
  bool line_open_ = false;  // a terminal line drawn in place, not yet ended
};

}  // namespace ferry::cli
