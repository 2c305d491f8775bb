#include "cli/progress.h"

#include <algorithm>
#include <cmath>

namespace ferry::cli {
namespace {

std::string format_duration(double seconds) {
  const long total = std::lround(std::max(0.0, seconds));
  char text[32];
  if (total >= 3600) {
    std::snprintf(text, sizeof text, "%ld:%02ld:%02ld", total / 3600, total / 60 % 60, total % 60);
  } else {
    std::snprintf(text, sizeof text, "%ld:%02ld", total / 60, total % 60);
  }
  return text;
}

// Note: a terminal is redrawn at most this often, so that a run of many short steps does not
// spend its time writing to the terminal.
constexpr std::chrono::milliseconds kRedrawInterval{500};

}  // namespace

std::string format_progress(const ProgressRecord& record, std::int64_t total_steps) {
  char eval[64] = "";
  if (record.eval_loss) {
    std::snprintf(eval, sizeof eval, "  eval %.4f (ppl %.2f)", *record.eval_loss, record.eval_perplexity.value_or(0));
  }
  char line[256];
  std::snprintf(line, sizeof line, "step %lld/%lld  loss %.4f  lr %.2e  %.0f tok/s%s  ETA %s",
                static_cast<long long>(record.step), static_cast<long long>(total_steps), record.loss, record.lr,
                record.tokens_per_s, eval, format_duration(record.seconds_left).c_str());
  return line;
}

Progress::Progress(std::FILE* out, bool terminal, std::int64_t first_step, std::int64_t total_steps,
                   std::int64_t log_every)
    : out_(out), terminal_(terminal), first_step_(first_step), total_steps_(total_steps), log_every_(log_every) {}

void Progress::step(std::int64_t step, double loss, double lr, double tokens_per_s, std::optional<double> eval_loss,
                    std::optional<double> eval_perplexity) {
  const Clock::time_point now = Clock::now();
  const bool last = step >= total_steps_;
  const bool due = terminal_ ? !last_drawn_ || now - *last_drawn_ >= kRedrawInterval : step % log_every_ == 0;
  if (!due && !last) return;
  const double elapsed = std::chrono::duration<double>(now - start_).count();
  const std::int64_t done_here = step - first_step_;
  ProgressRecord record;
  record.step = step;
  record.loss = loss;
  record.lr = lr;
  record.tokens_per_s = tokens_per_s;
  record.eval_loss = eval_loss;
  record.eval_perplexity = eval_perplexity;
  record.seconds_left = done_here > 0 ? elapsed / static_cast<double>(done_here) * static_cast<double>(total_steps_ - step) : 0;
  const std::string line = format_progress(record, total_steps_);
  if (terminal_) {
    // "\x1b[K" clears what a longer line drawn before left at the end.
    std::fprintf(out_, "\r%s\x1b[K", line.c_str());
    line_open_ = true;
    if (last) note("");
  } else {
    std::fprintf(out_, "%s\n", line.c_str());
  }
  std::fflush(out_);
  last_drawn_ = now;
}

void Progress::note(const std::string& message) {
  if (line_open_) std::fputc('\n', out_);
  line_open_ = false;
  if (!message.empty()) std::fprintf(out_, "%s\n", message.c_str());
  std::fflush(out_);
}

}  // namespace ferry::cli
