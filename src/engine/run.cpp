// A training run's output directory (include/ferry/run.h): its lock, where it resumes from,
// metrics.jsonl a record at a time, checkpoints with a relative `latest` and their rotation.

#include "ferry/run.h"

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cstring>
#include <cstdio>
#include <fstream>
#include <sstream>

#include <nlohmann/json.hpp>

#include "ferry/check.h"
#include "ferry/fs.h"

namespace ferry {
namespace {

constexpr const char* kCheckpoints = "checkpoints";
constexpr const char* kLatest = "latest";
constexpr const char* kMetrics = "metrics.jsonl";
// What a run writes in OUT, and --overwrite removes.
const char* const kRunOutputs[] = {kCheckpoints, kMetrics, "config.json", "hf"};

std::string latest_path(const std::string& out) { return out + "/" + kCheckpoints + "/" + kLatest; }

// "step-000010" -> 10; -1 for anything else (a .partial, a rotation's .removing, `latest`).
std::int64_t checkpoint_step(const std::string& name) {
  if (name.rfind("step-", 0) != 0 || name.size() == 5 || name.size() > 20) return -1;
  for (std::size_t i = 5; i < name.size(); ++i) {
    if (!std::isdigit(static_cast<unsigned char>(name[i]))) return -1;
  }
  return std::stoll(name.substr(5));
}

// The complete checkpoints under OUT/checkpoints, oldest first.
std::vector<std::string> checkpoint_names(const std::string& out) {
  const std::string dir = out + "/" + kCheckpoints;
  std::vector<std::string> names;
  if (!fs::is_directory(dir)) return names;
  for (const std::string& name : fs::list_directory(dir)) {
    if (checkpoint_step(name) >= 0 && fs::is_directory(dir + "/" + name)) names.push_back(name);
  }
  std::sort(names.begin(), names.end(),
            [](const std::string& a, const std::string& b) { return checkpoint_step(a) < checkpoint_step(b); });
  return names;
}

std::string list_names(const std::vector<std::string>& names) {
  if (names.empty()) return "none";
  std::string text;
  for (const std::string& name : names) text += (text.empty() ? "" : ", ") + name;
  return text;
}

// Whether `out` holds anything but its lock file.
std::vector<std::string> earlier_files(const std::string& out) {
  std::vector<std::string> names;
  if (!fs::is_directory(out)) return names;
  for (const std::string& name : fs::list_directory(out)) {
    if (name != kLockFileName) names.push_back(name);
  }
  return names;
}

}  // namespace

std::string latest_checkpoint(const std::string& out) {
  const std::string path = latest_path(out);
  const std::vector<std::string> present = checkpoint_names(out);
  if (!fs::exists(path)) return present.empty() ? "" : out + "/" + kCheckpoints + "/" + present.back();
  std::ifstream in(path, std::ios::binary);
  FERRY_CHECK(in.good(), "cannot read ", path, " (", std::strerror(errno), "): it names the checkpoint to resume; ",
              "fix its permissions, or pass --resume ", out, "/", kCheckpoints, "/step-N (checkpoints there: ",
              list_names(present), ")");
  std::stringstream text;
  text << in.rdbuf();
  std::string named = text.str();
  while (!named.empty() && std::isspace(static_cast<unsigned char>(named.back()))) named.pop_back();
  FERRY_CHECK(!named.empty() && named.find('\n') == std::string::npos && named.find('\0') == std::string::npos,
              path, " is ", named.empty() ? "empty" : "damaged", ": it should name the checkpoint to resume, ",
              "relative to the run directory. Pass --resume ", out, "/", kCheckpoints,
              "/step-N to choose one (checkpoints there: ", list_names(present), "), or start afresh elsewhere");
  // Note: an earlier ferry wrote the checkpoint's path as the job typed --out; its
  // "checkpoints/step-N" tail is what it means wherever the run is now.
  const std::size_t tail = named.rfind(std::string(kCheckpoints) + "/step-");
  FERRY_CHECK(tail != std::string::npos && checkpoint_step(named.substr(tail + std::string(kCheckpoints).size() + 1)) >= 0,
              path, " names '", named, "', which is not a checkpoint of this run (checkpoints/step-N). Pass --resume ",
              out, "/", kCheckpoints, "/step-N to choose one (checkpoints there: ", list_names(present), ")");
  const std::string checkpoint = out + "/" + named.substr(tail);
  FERRY_CHECK(fs::is_directory(checkpoint), path, " names ", named.substr(tail), ", which is not there: the run ",
              "directory was changed by hand. Pass --resume ", out, "/", kCheckpoints,
              "/step-N to choose one (checkpoints there: ", list_names(present), ")");
  return checkpoint;
}

RunDirectory::RunDirectory(RunOptions options) : options_(std::move(options)) {
  FERRY_CHECK(!options_.out.empty(), "the run needs an output directory (--out)");
  FERRY_CHECK(options_.keep_checkpoints >= 0, "keep_checkpoints = ", options_.keep_checkpoints,
              " is invalid: give 0 (keep every checkpoint) or how many to keep");
  lock_ = DirectoryLock::acquire(options_.out, "output directory", options_.env);
  const std::vector<std::string> earlier = earlier_files(options_.out);
  const std::string& resume = options_.resume;
  if (resume == "auto") {
    resume_from_ = latest_checkpoint(options_.out);
    if (resume_from_.empty()) {
      start_note_ = detail::concat("resume auto: no checkpoint under ", options_.out, " yet: starting fresh");
      fresh_into_earlier_run_ = !earlier.empty();
    } else {
      start_note_ = detail::concat("resume auto: resuming from ", resume_from_);
      if (!fs::exists(latest_path(options_.out))) {
        start_note_ += detail::concat(" (", latest_path(options_.out), " is missing: a crash came before it was ",
                                      "written; this is the newest checkpoint)");
      }
    }
  } else if (resume == "none") {
    if (!earlier.empty()) {
      FERRY_CHECK(options_.overwrite, "--out ", options_.out, " holds an earlier run (", list_names(earlier),
                  "): a new job there would mix two runs. Continue it with --resume auto, replace it with ",
                  "--overwrite (removes its checkpoints/, metrics.jsonl, config.json and hf/), or give another --out");
      fresh_into_earlier_run_ = true;
      start_note_ = detail::concat("--overwrite: the earlier run in ", options_.out, " is replaced");
    }
  } else {
    resume_from_ = resume;
    start_note_ = detail::concat("resuming from ", resume);
  }
}

RunDirectory::~RunDirectory() = default;

void RunDirectory::remove_earlier_run() {
  for (const char* name : kRunOutputs) fs::remove_tree(options_.out + "/" + name);
  env_or_posix(options_.env).sync_directory(options_.out);
}

std::int64_t RunDirectory::begin(std::int64_t step) {
  FERRY_CHECK(metrics_ == nullptr, "RunDirectory::begin() was called twice");
  Env& env = env_or_posix(options_.env);
  if (options_.resume == "none" && fresh_into_earlier_run_) remove_earlier_run();
  fs::make_directories(options_.out + "/" + kCheckpoints);
  // What a crash in the middle of a save or a rotation left.
  for (const std::string& name : fs::list_directory(options_.out + "/" + kCheckpoints)) {
    const bool leftover = name.size() > 9 && (name.compare(name.size() - 8, 8, ".partial") == 0 ||
                                             name.compare(name.size() - 9, 9, ".removing") == 0);
    if (leftover && name.rfind("step-", 0) == 0) fs::remove_tree(options_.out + "/" + kCheckpoints + "/" + name);
  }
  if (!resume_from_.empty() && fs::same_file(resume_from_, checkpoint_path(step))) last_saved_step_ = step;

  const std::string path = options_.out + "/" + kMetrics;
  std::int64_t dropped = 0;
  if (fs::exists(path)) {
    std::ifstream in(path, std::ios::binary);
    std::string line, kept;
    while (std::getline(in, line)) {
      const nlohmann::json record = nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
      const bool keep = record.is_object() && record.contains("step") && record["step"].is_number_integer() &&
                        record["step"].get<std::int64_t>() <= step;
      if (keep) {
        kept += line + "\n";
      } else {
        ++dropped;
      }
    }
    if (dropped > 0) write_file_durably(env, path, kept);
  }
  metrics_ = env.open(path, OpenMode::kCreate, /*try_direct=*/false);
  metrics_bytes_ = metrics_->size();
  return dropped;
}

void RunDirectory::log(const std::string& record) {
  FERRY_CHECK(metrics_ != nullptr, "RunDirectory::log() before begin()");
  const std::string line = record + "\n";
  // One write per record: a crash leaves whole records and at most one torn last line, which
  // the next begin() drops.
  metrics_->write(metrics_bytes_, line.data(), line.size());
  metrics_bytes_ += line.size();
}

std::string RunDirectory::checkpoint_path(std::int64_t step) const {
  char name[32];
  std::snprintf(name, sizeof name, "step-%06lld", static_cast<long long>(step));
  return options_.out + "/" + kCheckpoints + "/" + name;
}

std::string RunDirectory::save(Engine& engine, const std::string& extra_json) {
  Env& env = env_or_posix(options_.env);
  if (metrics_ != nullptr) metrics_->sync();
  const std::int64_t step = engine.steps_taken();
  const std::string dir = checkpoint_path(step);
  engine.save(dir, extra_json);
  const std::string relative = dir.substr(options_.out.size() + 1);
  write_file_durably(env, latest_path(options_.out), relative + "\n");
  last_saved_step_ = step;
  rotate(dir);
  return dir;
}

void RunDirectory::rotate(const std::string& kept) {
  if (options_.keep_checkpoints == 0) return;
  const std::vector<std::string> names = checkpoint_names(options_.out);
  const std::string dir = options_.out + "/" + kCheckpoints;
  const std::size_t keep = static_cast<std::size_t>(options_.keep_checkpoints);
  if (names.size() <= keep) return;
  for (std::size_t i = 0; i + keep < names.size(); ++i) {
    const std::string path = dir + "/" + names[i];
    if (fs::same_file(path, kept)) continue;  // what `latest` names stays, whatever its age
    // Note: renamed out of the checkpoints' names first, so that a crash in the middle of the
    // removal never leaves half a checkpoint that looks like a whole one.
    const std::string removing = path + ".removing";
    fs::remove_tree(removing);
    env_or_posix(options_.env).rename(path, removing);
    fs::remove_tree(removing);
  }
  env_or_posix(options_.env).sync_directory(dir);
}

}  // namespace ferry
