// The progress line (src/cli/progress.cpp): plain lines off a terminal, one line redrawn at a
// bounded rate on one, the run's global step after a resume.

#include <algorithm>
#include <cstdio>
#include <string>

#include "cli/progress.h"
#include "support/catch.h"

namespace ferry::cli {
namespace {

using Catch::Contains;

// What `draw` wrote through a Progress on a temporary file.
template <typename Draw>
std::string written(bool terminal, std::int64_t first_step, std::int64_t total_steps, std::int64_t log_every,
                    Draw draw) {
  std::FILE* file = std::tmpfile();
  REQUIRE(file != nullptr);
  {
    Progress progress(file, terminal, first_step, total_steps, log_every);
    draw(progress);
  }
  std::rewind(file);
  std::string text;
  for (int c; (c = std::fgetc(file)) != EOF;) text += static_cast<char>(c);
  std::fclose(file);
  return text;
}

TEST_CASE("a progress record names the step of the run, loss, lr, throughput, eval loss and ETA") {
  ProgressRecord record;
  record.step = 120;
  record.loss = 1.23456;
  record.lr = 2.94e-4;
  record.tokens_per_s = 5123;
  record.seconds_left = 3725;
  CHECK(format_progress(record, 400) == "step 120/400  loss 1.2346  lr 2.94e-04  5123 tok/s  ETA 1:02:05");
  record.eval_loss = 1.3;
  record.eval_perplexity = 3.67;
  record.seconds_left = 62;
  CHECK_THAT(format_progress(record, 400), Contains("5123 tok/s  eval 1.3000 (ppl 3.67)  ETA 1:02"));
}

TEST_CASE("off a terminal: a plain line every log_every steps and at the last, the global step after a resume") {
  const std::string text = written(false, 20, 30, 4, [](Progress& progress) {
    for (std::int64_t step = 21; step <= 30; ++step) progress.step(step, 1.0, 1e-3, 100, std::nullopt, std::nullopt);
  });
  CHECK(text.find('\r') == std::string::npos);
  CHECK_THAT(text, Contains("step 24/30") && Contains("step 28/30") && Contains("step 30/30"));
  CHECK(text.find("step 22/30") == std::string::npos);
  CHECK(std::count(text.begin(), text.end(), '\n') == 3);
}

TEST_CASE("on a terminal: one line redrawn at most twice a second, ended before a note and at the last step") {
  const std::string text = written(true, 0, 1000, 1, [](Progress& progress) {
    for (std::int64_t step = 1; step <= 999; ++step) progress.step(step, 1.0, 1e-3, 100, std::nullopt, std::nullopt);
    progress.note("checkpoint (every 999 steps): runs/a/checkpoints/step-000999");
    progress.step(1000, 0.5, 1e-3, 100, 0.7, 2.01);
  });
  // Steps this fast are drawn once (the first) within the half second, then the last.
  CHECK(std::count(text.begin(), text.end(), '\r') == 2);
  CHECK_THAT(text, Contains("step 1/1000") && Contains("\ncheckpoint (every 999 steps)") &&
                       Contains("step 1000/1000  loss 0.5000") && Contains("eval 0.7000 (ppl 2.01)"));
  CHECK(text.back() == '\n');
}

}  // namespace
}  // namespace ferry::cli
