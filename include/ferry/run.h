#pragma once

// A training run's output directory, as `ferry finetune` keeps it (docs/launcher.md,
// "Reliability"):
//   OUT/.ferry.lock                the run's lock (ferry/lock.h), held for the job's life
//   OUT/config.json                the job as it runs
//   OUT/metrics.jsonl              one JSON record per line, each written and flushed at once
//   OUT/checkpoints/step-000010/   Engine::save's checkpoints
//   OUT/checkpoints/latest         "checkpoints/step-000010": relative to OUT, so the run resumes
//                                  from any working directory and after OUT was moved
//
//   ferry::RunDirectory run({.out = "runs/a", .resume = "auto"});
//   if (!run.resume_from().empty()) engine.load(run.resume_from());
//   run.begin(engine.steps_taken());
//   ... run.log(record); ... run.save(engine, loader_state);

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "ferry/engine.h"
#include "ferry/io.h"
#include "ferry/lock.h"

namespace ferry {

struct RunOptions {
  std::string out;
  // "none": a new run, refused when `out` holds files (but its lock) unless `overwrite`; "auto":
  // the checkpoint `latest` names, or a fresh start when the run has no checkpoint yet; else a
  // checkpoint directory.
  std::string resume = "none";
  // A new run into a directory with an earlier run's files: begin() removes them (checkpoints/,
  // metrics.jsonl, config.json, hf/; nothing else).
  bool overwrite = false;
  // Checkpoints kept: after each save the oldest beyond this many are removed, never the one
  // `latest` names. 0 keeps them all.
  std::int64_t keep_checkpoints = 0;
  Env* env = nullptr;  // writes metrics.jsonl and `latest`; nullptr: Env::posix()
};

// The checkpoint OUT/checkpoints/latest names, resolved against `out`. Without a `latest`, the
// newest complete checkpoint directory (a crash can come between a checkpoint and its `latest`),
// else empty: the run has none. Throws ferry::Error for a `latest` that is empty, unreadable or
// names a checkpoint that is not there: that is damage to report, never "no checkpoint".
std::string latest_checkpoint(const std::string& out);

class RunDirectory {
 public:
  // Locks `out` (created when missing; DirectoryBusy names another job holding it) and decides
  // where the run starts; writes nothing else. Throws ferry::Error for a new run into a
  // directory holding an earlier one, naming the fixes.
  explicit RunDirectory(RunOptions options);
  ~RunDirectory();
  RunDirectory(const RunDirectory&) = delete;
  RunDirectory& operator=(const RunDirectory&) = delete;

  const std::string& out() const { return options_.out; }
  // The checkpoint to resume from; empty for a fresh start.
  const std::string& resume_from() const { return resume_from_; }
  // One line on how the run starts, for the log ("resume auto: no checkpoint under runs/a yet:
  // starting fresh").
  const std::string& start_note() const { return start_note_; }
  const DirectoryLock& lock() const { return lock_; }

  // Once the engine is at `step` (the resumed step; 0 for a fresh start): removes an earlier
  // run's files (overwrite), drops metrics.jsonl's records after `step` (and a line a crash tore)
  // so that the file describes one run, and opens it for appending. Returns the records dropped.
  std::int64_t begin(std::int64_t step);
  // Appends one record (one line of JSON, without its newline): written and flushed at once,
  // durable at the next save(). Throws IoException when the write fails.
  void log(const std::string& record);
  // OUT/checkpoints/step-000010.
  std::string checkpoint_path(std::int64_t step) const;
  // Saves the engine at its step: metrics.jsonl fdatasynced, Engine::save into
  // checkpoint_path(step), then `latest` pointed at it (durably), then rotation. A failure at any
  // point leaves `latest` naming the previous checkpoint, intact. Returns the directory.
  std::string save(Engine& engine, const std::string& extra_json);
  // The step of the last checkpoint this run holds (saved or resumed from); -1 for none.
  std::int64_t last_saved_step() const { return last_saved_step_; }

 private:
  void remove_earlier_run();
  void rotate(const std::string& kept);

  RunOptions options_;
  DirectoryLock lock_;
  std::string resume_from_;
  std::string start_note_;
  bool fresh_into_earlier_run_ = false;
  std::int64_t last_saved_step_ = -1;
  std::unique_ptr<File> metrics_;
  std::uint64_t metrics_bytes_ = 0;
};

}  // namespace ferry
