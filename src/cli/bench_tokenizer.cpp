// `ferry bench tokenizer`: ferry's tokenizer against Hugging Face `tokenizers` on the same file,
// the same tokenizer and the same thread counts, measured in the same run: one thread, and every
// core (the way `ferry tokenize --data` pre-tokenizes a dataset). The baseline is
// tools/bench/tokenizer_baseline.py, run by this command; the ids of both must agree.

#include <unistd.h>

#include <tbb/global_control.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cxxopts.hpp>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "cli/command.h"
#include "ferry/check.h"
#include "ferry/fs.h"
#include "ferry/job.h"
#include "ferry/tokenizer.h"

namespace ferry::cli {
namespace {

using Clock = std::chrono::steady_clock;
using Json = nlohmann::json;

struct Run {
  double seconds = 0;
  std::int64_t tokens = 0;
  // What tools/bench/tokenizer_baseline.py sums too: every id, and every id times its position + 1.
  std::int64_t id_sum = 0;
  std::int64_t weighted_id_sum = 0;
};

void add_sums(const std::vector<std::int32_t>& ids, Run& run) {
  run.tokens += static_cast<std::int64_t>(ids.size());
  for (std::size_t i = 0; i < ids.size(); ++i) {
    run.id_sum += ids[i];
    run.weighted_id_sum += static_cast<std::int64_t>(i + 1) * ids[i];
  }
}

Run measure_one_thread(const Tokenizer& tokenizer, const std::vector<std::string_view>& documents, int repeat) {
  Run best;
  best.seconds = 1e300;
  std::vector<std::int32_t> ids;
  for (int r = 0; r < repeat; ++r) {
    Run run;
    const auto start = Clock::now();
    for (std::string_view document : documents) {
      ids.clear();
      tokenizer.encode(document, ids, nullptr);
      run.tokens += static_cast<std::int64_t>(ids.size());
    }
    run.seconds = std::chrono::duration<double>(Clock::now() - start).count();
    if (run.seconds < best.seconds) best = run;
  }
  best.tokens = 0;
  for (std::string_view document : documents) {
    ids.clear();
    tokenizer.encode(document, ids, nullptr);
    add_sums(ids, best);
  }
  return best;
}

Run measure_all_cores(const Tokenizer& tokenizer, const std::vector<std::string_view>& documents, int threads,
                      int repeat) {
  tbb::global_control limit(tbb::global_control::max_allowed_parallelism, static_cast<std::size_t>(threads));
  Run best;
  best.seconds = 1e300;
  std::vector<std::vector<std::int32_t>> encoded;
  for (int r = 0; r < repeat; ++r) {
    const auto start = Clock::now();
    encoded = encode_batch(tokenizer, documents);
    const double seconds = std::chrono::duration<double>(Clock::now() - start).count();
    best.seconds = std::min(best.seconds, seconds);
  }
  for (const auto& ids : encoded) add_sums(ids, best);
  return best;
}

std::string read_file(const std::string& path) {
  std::ifstream file(path, std::ios::binary);
  FERRY_CHECK(file.is_open(), "cannot open the data file ", path);
  std::stringstream text;
  text << file.rdbuf();
  return text.str();
}

// The baseline's JSON line, or the reason there is none.
std::optional<Json> run_baseline(const std::string& python, const std::string& script, const std::string& tokenizer,
                                 const std::string& data, int threads, int repeat, std::string* why_not) {
  const std::string command = "'" + python + "' '" + script + "' run --tokenizer '" + tokenizer + "' --data '" + data +
                              "' --threads " + std::to_string(threads) + " --repeat " + std::to_string(repeat) +
                              " 2>&1";
  FILE* pipe = popen(command.c_str(), "r");
  if (pipe == nullptr) {
    *why_not = "cannot start " + python;
    return std::nullopt;
  }
  std::string output;
  char buffer[4096];
  while (std::fgets(buffer, sizeof buffer, pipe) != nullptr) output += buffer;
  const int status = pclose(pipe);
  const std::size_t last_line = output.find_last_of('\n', output.size() >= 2 ? output.size() - 2 : 0);
  const std::string last = output.substr(last_line == std::string::npos ? 0 : last_line + 1);
  Json result = Json::parse(last, nullptr, /*allow_exceptions=*/false);
  if (status != 0 || result.is_discarded() || !result.is_object()) {
    *why_not = "the baseline (" + command + ") failed: " + output.substr(0, 2000);
    return std::nullopt;
  }
  return result;
}

std::string default_script(const char*) {
  // build/ferry next to tools/ in the source tree, or an installed bin/ferry beside share/. The
  // executable's own path: the subcommand's argv[0] is its name, not where it lies.
  char path[4096];
  const ssize_t length = ::readlink("/proc/self/exe", path, sizeof path - 1);
  const std::string self = fs::parent_directory(length > 0 ? std::string(path, static_cast<std::size_t>(length)) : ".");
  for (const std::string& candidate : {self + "/../tools/bench/tokenizer_baseline.py",
                                       self + "/../share/ferry/tokenizer_baseline.py"}) {
    if (fs::exists(candidate)) return candidate;
  }
  return self + "/../tools/bench/tokenizer_baseline.py";
}

int run_bench_tokenizer(int argc, char** argv) {
  cxxopts::Options options(argv[0], "Tokenizer throughput: ferry against Hugging Face tokenizers on the same file, "
                                    "tokenizer and thread counts, in the same run (one thread, then --threads), with "
                                    "a check that both give the same ids. Each non-empty line of --data is a "
                                    "document; each figure is the best of --repeat passes.");
  options.add_options()("tokenizer", "a model directory, tokenizer.json or tokenizer.model", cxxopts::value<std::string>())(
      "data", "a text file (one document per line)", cxxopts::value<std::string>())(
      "threads", "threads of the second measurement, 0 or more (0: every core)",
      cxxopts::value<std::string>()->default_value("0"))(
      "repeat", "passes per figure, 1 or more; the best counts", cxxopts::value<std::string>()->default_value("3"))(
      "python", "the interpreter that has tokenizers", cxxopts::value<std::string>()->default_value("python3"))(
      "baseline", "tokenizer_baseline.py to run, or 'none' for ferry's figures alone",
      cxxopts::value<std::string>()->default_value(default_script(argv[0])))("h,help", "show this help");
  auto args = options.parse(argc, argv);
  if (args.count("help")) {
    std::cout << options.help() << "\n";
    return 0;
  }
  FERRY_CHECK(args.count("tokenizer") && args.count("data"), "ferry bench tokenizer needs --tokenizer and --data");
  const std::string tokenizer_path = args["tokenizer"].as<std::string>();
  const std::string data = args["data"].as<std::string>();
  const auto repeat = static_cast<int>(parse_integer(args["repeat"].as<std::string>(), "--repeat", 1, 1000));
  auto threads = static_cast<int>(parse_integer(args["threads"].as<std::string>(), "--threads", 0, 4096));
  if (threads <= 0) threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));

  const auto tokenizer = load_tokenizer(tokenizer_path);
  const std::string text = read_file(data);
  std::vector<std::string_view> documents;
  for (std::size_t begin = 0; begin < text.size();) {
    std::size_t end = text.find('\n', begin);
    if (end == std::string::npos) end = text.size();
    if (end > begin) documents.emplace_back(text.data() + begin, end - begin);
    begin = end + 1;
  }
  FERRY_CHECK(!documents.empty(), data, " has no non-empty line to tokenize");
  std::printf("ferry bench tokenizer: %s (%s, vocabulary %lld) on %s: %.1f MiB in %zu documents\n",
              tokenizer_path.c_str(), tokenizer->kind().c_str(), static_cast<long long>(tokenizer->vocab_size()),
              data.c_str(), static_cast<double>(text.size()) / (1 << 20), documents.size());
  std::size_t document_bytes = 0;
  for (std::string_view document : documents) document_bytes += document.size();

  const Run one = measure_one_thread(*tokenizer, documents, repeat);
  const Run many = measure_all_cores(*tokenizer, documents, threads, repeat);
  const std::string script = args["baseline"].as<std::string>();
  std::optional<Json> baseline_one, baseline_many;
  std::string why_not;
  if (script != "none") {
    const std::string python = args["python"].as<std::string>();
    baseline_one = run_baseline(python, script, tokenizer_path, data, 1, repeat, &why_not);
    if (baseline_one) baseline_many = run_baseline(python, script, tokenizer_path, data, threads, repeat, &why_not);
  }

  const auto megabytes_per_second = [&](double seconds) { return static_cast<double>(document_bytes) / 1e6 / seconds; };
  std::printf("  %7s  %11s  %13s  %16s  %7s\n", "threads", "ferry MB/s", "ferry Mtok/s", "tokenizers MB/s", "ratio");
  const auto row = [&](int count, const Run& run, const std::optional<Json>& reference) {
    std::printf("  %7d  %11.1f  %13.2f", count, megabytes_per_second(run.seconds),
                static_cast<double>(run.tokens) / 1e6 / run.seconds);
    if (reference) {
      const double seconds = (*reference)["seconds"].get<double>();
      std::printf("  %16.1f  %6.2fx\n", megabytes_per_second(seconds), seconds / run.seconds);
    } else {
      std::printf("  %16s  %7s\n", "-", "-");
    }
  };
  row(1, one, baseline_one);
  row(threads, many, baseline_many);
  FERRY_CHECK(one.tokens == many.tokens && one.id_sum == many.id_sum && one.weighted_id_sum == many.weighted_id_sum,
              "ferry's one-thread and ", threads, "-thread ids differ");
  if (!baseline_one || !baseline_many) {
    std::printf("baseline: none (%s)\n", script == "none" ? "--baseline none" : why_not.c_str());
    return 0;
  }
  const bool same = (*baseline_one)["tokens"].get<std::int64_t>() == one.tokens &&
                    (*baseline_one)["id_sum"].get<std::int64_t>() == one.id_sum &&
                    (*baseline_one)["weighted_id_sum"].get<std::int64_t>() == one.weighted_id_sum;
  std::printf("baseline: %s; ids %s (%lld tokens)\n", (*baseline_one)["library"].get<std::string>().c_str(),
              same ? "equal" : "DIFFER", static_cast<long long>(one.tokens));
  return same ? 0 : 1;
}

}  // namespace

FERRY_CLI_COMMAND("bench tokenizer", "tokenizer throughput against Hugging Face tokenizers", run_bench_tokenizer);

}  // namespace ferry::cli
