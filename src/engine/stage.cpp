// `ferry stage` (stage_model) and the engine's side of a staged NVMe layout. See docs/stage.md.

#include "ferry/stage.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <optional>
#include <random>
#include <sstream>

#include "engine/parts.h"
#include "engine/sizing.h"
#include "engine/stage.h"
#include "engine/update.h"
#include "ferry/check.h"
#include "ferry/fs.h"
#include "ferry/memory.h"
#include "ferry/model.h"

namespace ferry {
namespace detail {
namespace {

std::string hex(std::uint64_t value) {
  std::ostringstream out;
  out << std::hex << value;
  return out.str();
}

std::string join(const std::vector<std::string>& items) {
  std::string text;
  for (const std::string& item : items) text += (text.empty() ? "" : ",") + item;
  return text;
}

// A fingerprint of a checkpoint's contents as its headers describe them (names, dtypes, shapes,
// shard files): staging refuses to continue a layout from another checkpoint.
std::string checkpoint_fingerprint(const safetensors::Checkpoint& checkpoint) {
  std::string text;
  for (const std::string& name : checkpoint.names()) {
    const safetensors::TensorInfo& info = checkpoint.tensor(name);
    text += name + ":" + checkpoint.file_of(name) + ":" + std::to_string(info.data_begin) + ":" +
            std::to_string(info.bytes()) + ":" + std::string(dtype_name(info.dtype)) + ";";
  }
  return hex(xxh64(text.data(), text.size()));
}

std::uint64_t storage_bytes(std::uint64_t bytes) {
  return (bytes + kIoAlignment - 1) / kIoAlignment * kIoAlignment;
}

// A directory the NVMe tier can use: created when missing, and writable.
void check_directory(const std::string& dir) {
  try {
    fs::make_directories(dir);
  } catch (const Error& error) {
    throw Error(detail::concat("NVMe directory '", dir, "' is missing and cannot be created (",
                               error.what(), "): give a directory on a mounted, writable drive "
                               "(--nvme DIR[,DIR...])"));
  }
  const std::string probe = dir + "/.ferry-write-probe";
  const int fd = ::open(probe.c_str(), O_CREAT | O_WRONLY | O_CLOEXEC, 0600);
  FERRY_CHECK(fd >= 0, "NVMe directory '", dir, "' is not writable (", std::strerror(errno),
              "): give a directory on a mounted, writable drive (--nvme DIR[,DIR...])");
  ::close(fd);
  ::unlink(probe.c_str());
}

// Each directory holds its stripes of [0, extent_bytes): fails when one has less room than that.
void check_room(const std::vector<std::string>& dirs, const std::string& file_name,
                std::uint64_t stripe_bytes, std::uint64_t extent_bytes) {
  std::vector<std::uint64_t> needed(dirs.size(), 0);
  for (std::uint64_t offset = 0, stripe = 0; offset < extent_bytes; offset += stripe_bytes, ++stripe) {
    needed[stripe % dirs.size()] += std::min(stripe_bytes, extent_bytes - offset);
  }
  for (std::size_t i = 0; i < dirs.size(); ++i) {
    struct statvfs disk {};
    FERRY_CHECK(::statvfs(dirs[i].c_str(), &disk) == 0, "cannot read the free space of NVMe "
                "directory '", dirs[i], "': ", std::strerror(errno));
    std::uint64_t room = static_cast<std::uint64_t>(disk.f_bavail) * disk.f_frsize;
    struct stat existing {};
    if (::stat((dirs[i] + "/" + file_name).c_str(), &existing) == 0) {
      room += static_cast<std::uint64_t>(existing.st_blocks) * 512;  // a rerun rewrites in place
    }
    FERRY_CHECK(needed[i] <= room, "NVMe directory '", dirs[i], "' has ", format_bytes(room),
                " free but the staged layout puts ", format_bytes(needed[i]), " there (of ",
                format_bytes(extent_bytes), " in all): free ", format_bytes(needed[i] - room),
                " there, or add directories (--nvme A,B,...)");
  }
}

std::string describe_differences(const std::map<std::string, std::string>& staged,
                                 const std::map<std::string, std::string>& job) {
  std::string text;
  for (const auto& [key, value] : job) {
    auto it = staged.find(key);
    const std::string was = it == staged.end() ? "(none)" : it->second;
    if (was != value) text += detail::concat(text.empty() ? "" : ", ", key, " ", was, " vs ", value);
  }
  return text;
}

}  // namespace

std::string stage_manifest_path(const std::string& dir) { return dir + "/" + kStageManifestName; }

std::map<std::string, std::string> stage_identity(const std::vector<Part>& parts,
                                                  const EngineConfig& config) {
  std::string shapes;
  std::int64_t parameters = 0;
  for (const Part& part : parts) {
    shapes += part.name + "{";
    for (const ParameterSlice& slice : part.slices) {
      shapes += slice.name + "@" + std::to_string(slice.offset) + "[";
      for (std::int64_t size : slice.shape) shapes += std::to_string(size) + ",";
      shapes += "]";
    }
    shapes += "}";
    parameters += part.numel;
  }
  return {
      {"model", hex(xxh64(shapes.data(), shapes.size()))},
      {"parameters", std::to_string(parameters)},
      {"mode", to_string(config.mode)},
      {"precision", to_string(config.precision)},
      {"optimizer_states", std::to_string(optimizer_state_count(config.optimizer))},
      {"gradient_accumulator", config.grad_accumulation > 1 ? "yes" : "no"},
      {"fuyou_host_blocks", std::to_string(config.fuyou.host_blocks)},
  };
}

bool needs_seed(const PartPlacement& home) {
  FERRY_ASSERT(home.grads == Tier::kNvme, "a staged part's gradients live on NVMe");
  return home.params != Tier::kNvme;
}

bool same_directories(const std::vector<std::string>& a, const std::vector<std::string>& b) {
  if (a.size() != b.size()) return false;
  for (std::size_t i = 0; i < a.size(); ++i) {
    if (a[i] != b[i] && !fs::same_file(a[i], b[i])) return false;
  }
  return true;
}

NvmeLayout open_staged_layout(EngineConfig& config, DirectoryLock& lock) {
  const std::string why = unstageable(config.mode);
  FERRY_CHECK(why.empty(), "staged layout '", config.staged, "' was given, but ", why);
  const std::string path = stage_manifest_path(config.staged);
  FERRY_CHECK(fs::exists(path), "no staged layout at '", config.staged, "' (", path,
              " is missing): stage the model first with `ferry stage --model HF_DIR --nvme ",
              config.staged, " --mode fuyou ...`, or leave staged empty to load the model's weights");
  lock = DirectoryLock::acquire(config.staged, "staged layout", config.nvme_env);
  NvmeLayout layout = read_nvme_layout(path);
  const std::string copied = nvme_layout_binding_mismatch(layout);
  FERRY_CHECK(copied.empty(), "staged layout '", config.staged, "' is not the layout it was staged as: ", copied,
              ". A copy would share its identity (and a copy's manifest once named the original's files); ferry ",
              "refuses it: run `ferry stage` with the same arguments on it, which verifies every bundle and makes it ",
              "a layout of its own, or stage the model afresh");
  if (config.nvme_directories.empty()) config.nvme_directories = layout.directories;
  FERRY_CHECK(same_directories(config.nvme_directories, layout.directories), "staged layout '", config.staged,
              "' is striped over ", join(layout.directories), " but the job's NVMe directories are ",
              join(config.nvme_directories), ": pass --nvme ", join(layout.directories),
              " (or no --nvme) with --staged");
  FERRY_CHECK(!layout.live, "staged layout '", config.staged, "' was adopted by an earlier run, "
              "which updated it in place, so it no longer holds the staged weights: run `ferry "
              "stage` again with the same arguments (it rewrites only what changed), or resume "
              "that run from its checkpoint (--resume) without --staged");
  const auto done = std::count_if(layout.bundles.begin(), layout.bundles.end(),
                                  [](const LayoutBundle& bundle) { return bundle.complete; });
  FERRY_CHECK(done == static_cast<std::int64_t>(layout.bundles.size()), "staged layout '",
              config.staged, "' is incomplete: ", done, " of ", layout.bundles.size(),
              " bundles are staged; run `ferry stage` again with the same arguments to finish it");
  return layout;
}

void check_staged_layout(const NvmeLayout& layout, const std::vector<Part>& parts,
                         const EngineConfig& config) {
  const std::map<std::string, std::string> job = stage_identity(parts, config);
  const std::string differences = describe_differences(layout.identity, job);
  FERRY_CHECK(differences.empty(), "staged layout '", config.staged,
              "' was made for another model or configuration (staged vs this job: ", differences,
              "): stage this model with these settings into another directory (`ferry stage "
              "--model HF_DIR --nvme DIR ...`), or run the job with the staged settings");
}

namespace {

// The tensors of `part` whose bytes overlap [begin, end) of a bundle of `element_bytes` elements.
std::string tensors_in(const Part& part, std::uint64_t element_bytes, std::uint64_t begin, std::uint64_t end) {
  std::string names;
  for (const ParameterSlice& slice : part.slices) {
    const std::uint64_t first = static_cast<std::uint64_t>(slice.offset) * element_bytes;
    const std::uint64_t last = first + static_cast<std::uint64_t>(slice.numel) * element_bytes;
    if (first < end && begin < last) names += (names.empty() ? "" : ", ") + part.name + "." + slice.name;
  }
  return names;
}

}  // namespace

void verify_staged_layout(const NvmeLayout& layout, const std::vector<Part>& parts,
                          const EngineConfig& config) {
  const Verify level = config.verify == Verify::kAuto ? Verify::kSampled : config.verify;
  if (level == Verify::kNone) return;
  struct Chunk {
    const LayoutBundle* bundle;
    std::uint64_t index;
  };
  std::vector<Chunk> chunks, chosen;
  std::uint64_t total = 0;
  std::mt19937_64 random(std::random_device{}());
  for (const LayoutBundle& bundle : layout.bundles) {
    if (!bundle.holds_data || !bundle.complete || bundle.bytes == 0) continue;
    const std::uint64_t count = (bundle.bytes + kLayoutChunkBytes - 1) / kLayoutChunkBytes;
    FERRY_CHECK(bundle.chunk_checksums.size() == count, "staged layout '", config.staged, "' records no ",
                "per-chunk checksums of bundle '", bundle.name, "': an earlier ferry staged it; run `ferry stage` ",
                "again with the same arguments (it verifies the bundles and records them)");
    total += bundle.bytes;
    if (level == Verify::kSampled) {
      // Every bundle once, at a random chunk; the rest of the sample below.
      const std::uint64_t pick = std::uniform_int_distribution<std::uint64_t>(0, count - 1)(random);
      chosen.push_back({&bundle, pick});
      for (std::uint64_t i = 0; i < count; ++i) {
        if (i != pick) chunks.push_back({&bundle, i});
      }
    } else {
      for (std::uint64_t i = 0; i < count; ++i) chosen.push_back({&bundle, i});
    }
  }
  auto bytes_of = [](const Chunk& chunk) {
    return std::min(kLayoutChunkBytes, chunk.bundle->bytes - chunk.index * kLayoutChunkBytes);
  };
  if (level == Verify::kSampled) {
    std::uint64_t covered = 0;
    for (const Chunk& chunk : chosen) covered += bytes_of(chunk);
    std::shuffle(chunks.begin(), chunks.end(), random);
    for (const Chunk& chunk : chunks) {
      if (covered * 16 >= total) break;
      chosen.push_back(chunk);
      covered += bytes_of(chunk);
    }
  }
  if (chosen.empty()) return;
  std::sort(chosen.begin(), chosen.end(), [](const Chunk& a, const Chunk& b) {
    return a.bundle->nvme_offset + a.index * kLayoutChunkBytes < b.bundle->nvme_offset + b.index * kLayoutChunkBytes;
  });
  const auto file = StripedFile::open(env_or_posix(config.nvme_env), layout.directories, layout.file_name,
                                      OpenMode::kRead, layout.stripe_bytes, /*try_direct=*/false);
  std::vector<unsigned char> buffer(kLayoutChunkBytes);
  std::vector<StripedFile::Piece> pieces;
  const std::uint64_t compute_bytes = static_cast<std::uint64_t>(c10::elementSize(scalar_type(config.precision)));
  for (const Chunk& chunk : chosen) {
    const std::uint64_t begin = chunk.index * kLayoutChunkBytes, bytes = bytes_of(chunk);
    pieces.clear();
    file->map(chunk.bundle->nvme_offset + begin, bytes, &pieces);
    for (const StripedFile::Piece& piece : pieces) {
      piece.file->read(piece.file_offset, buffer.data() + (piece.logical_offset - chunk.bundle->nvme_offset - begin),
                       piece.length);
    }
    const std::uint64_t read = xxh64(buffer.data(), bytes);
    const std::uint64_t recorded = chunk.bundle->chunk_checksums[chunk.index];
    if (read == recorded) continue;
    // Which tensors those bytes hold: the bundle is "<part>.<role>".
    std::string tensors;
    const std::string& name = chunk.bundle->name;
    for (const Part& part : parts) {
      if (name.rfind(part.name + ".", 0) != 0) continue;
      const std::string role = name.substr(part.name.size() + 1);
      tensors = tensors_in(part, role == "master" ? 4 : compute_bytes, begin, begin + bytes);
    }
    FERRY_CHECK(false, "staged layout '", config.staged, "' is corrupt: bundle '", name, "' does not match its ",
                "checksum in bytes [", begin, ", ", begin + bytes, ") (xxh64 ", hex(recorded), " recorded, ", hex(read),
                " read)", tensors.empty() ? "" : ", which hold " + tensors,
                ": its NVMe file was changed or damaged. Run `ferry stage` again with the same arguments (it rewrites "
                "what differs), or adopt it with verify none at your own risk");
  }
}

BundleId adopt_staged(Store& store, const NvmeLayout& layout, const BundleSpec& spec) {
  const LayoutBundle* entry = layout.find(spec.name);
  FERRY_CHECK(entry != nullptr && entry->bytes == spec.bytes, "the staged layout lacks bundle '",
              spec.name, "' of ", spec.bytes, " bytes",
              entry ? detail::concat(" (it holds ", entry->bytes, " bytes)") : std::string(),
              ": stage the model again for this job's settings");
  return store.adopt(spec, entry->nvme_offset, entry->holds_data && entry->complete);
}

torch::Tensor read_seed(Store& store, const Part& part, torch::ScalarType dtype) {
  store.fetch(part.grads, Tier::kHost).wait();
  torch::Tensor values = typed_view(store, part.grads, Tier::kHost, dtype, part.numel).clone();
  store.evict(part.grads, Tier::kHost);
  return values;
}

void mark_staged_live(NvmeLayout layout, const std::string& dir, Env* env) {
  layout.live = true;
  write_nvme_layout(layout, stage_manifest_path(dir), env);
}

}  // namespace detail

namespace {

using Clock = std::chrono::steady_clock;

// One NVMe bundle of the layout being staged, and what fills it.
struct StagedBundle {
  BundleId id = detail::kNoBundle;
  std::size_t part = 0;
  // kUndefined: zeros (optimizer states, gradients, the accumulator); else the part's parameters
  // from the checkpoint in this dtype.
  torch::ScalarType dtype = torch::ScalarType::Undefined;
};

class Stager {
 public:
  explicit Stager(const StageOptions& options);
  StageReport run();

 private:
  // Records the layout in the manifest before anything is written; a rerun adopts the recorded one.
  void lay_out();
  // A rerun continues only a layout of the same identity, checkpoint and directories.
  void check_continues(const NvmeLayout& previous) const;
  // Checks the budgets and the disks, opens the staging store and places every NVMe bundle.
  void lay_out_store();
  // Reads a done bundle back and compares its checksum; false when it does not match. Records
  // the chunks' checksums when an earlier ferry did not.
  bool verify(const StagedBundle& staged, LayoutBundle& entry);
  // Fills the bundle from the checkpoint, writes it and records its checksums in `entry`.
  void fill_and_write(const StagedBundle& staged, LayoutBundle& entry);

  const StageOptions& options_;
  EngineConfig config_;
  models::PretrainedReader reader_;
  LayeredModel model_;
  std::vector<detail::Part> parts_;
  std::string manifest_path_;
  std::optional<NvmeLayout> previous_;
  std::unique_ptr<Store> store_;
  std::vector<StagedBundle> staged_;
  NvmeLayout layout_;
  std::vector<DirectoryLock> locks_;  // every NVMe directory, while staging
};

Stager::Stager(const StageOptions& options)
    : options_(options),
      config_(options.engine),
      reader_(options.model_dir),
      model_(models::allocate(reader_.config())),  // shapes only: the memory is never touched
      parts_(detail::describe_parts(model_)) {}

void Stager::lay_out() {
  config_.staged.clear();
  for (const std::string& directory : config_.nvme_directories) {
    locks_.push_back(DirectoryLock::acquire(directory, "NVMe directory", config_.nvme_env));
  }
  manifest_path_ = detail::stage_manifest_path(config_.nvme_directories.front());
  if (fs::exists(manifest_path_)) previous_ = read_nvme_layout(manifest_path_);

  layout_.identity = detail::stage_identity(parts_, config_);
  layout_.metadata = {{"checkpoint", detail::checkpoint_fingerprint(reader_.checkpoint())},
                      {"model_config", reader_.config().to_hf_json()}};
  const StoreOptions store_options = detail::store_options(config_);
  layout_.directories = store_options.nvme_directories;
  layout_.file_name = store_options.nvme_file_name;
  layout_.stripe_bytes = store_options.stripe_bytes;
  // A layout a run updated in place stays live until every bundle is verified or written again.
  layout_.live = previous_ && previous_->live;
  if (previous_) check_continues(*previous_);
  lay_out_store();
}

void Stager::check_continues(const NvmeLayout& previous) const {
  const std::string differences = detail::describe_differences(previous.identity, layout_.identity);
  FERRY_CHECK(differences.empty(), "NVMe directory '", config_.nvme_directories.front(),
              "' holds a layout staged for another model or configuration (staged vs now: ",
              differences, "): stage into another directory, or remove ", manifest_path_,
              " and ", layout_.file_name, " there to start over");
  FERRY_CHECK(previous.metadata.at("checkpoint") == layout_.metadata.at("checkpoint"),
              "NVMe directory '", config_.nvme_directories.front(), "' holds a layout staged "
              "from another checkpoint of this model: stage into another directory, or remove ",
              manifest_path_, " and ", layout_.file_name, " there to start over");
  FERRY_CHECK(detail::same_directories(previous.directories, layout_.directories) &&
                  previous.stripe_bytes == layout_.stripe_bytes,
              "the layout in '", config_.nvme_directories.front(), "' is striped over ",
              detail::join(previous.directories), " but this run names ",
              detail::join(layout_.directories), ": pass the same --nvme directories");
}

void Stager::lay_out_store() {
  // What the layout takes, and the most staging holds in host memory at once.
  std::vector<PartShape> shapes;
  const Placement placement = detail::resolve_placement(config_, parts_.size());
  std::uint64_t extent_bytes = 0, largest_data = 0;
  // Note: a layout holds every part's master and states whole, as one rank's engine keeps them;
  // staging runs in one process, and a job of several ranks adopts no layout.
  for (detail::Part& part : parts_) part.shard = {0, part.numel, part.numel};
  for (std::size_t p = 0; p < parts_.size(); ++p) {
    const detail::Part& part = parts_[p];
    shapes.push_back({part.name, part.numel});
    detail::Part sizing = part;
    detail::add_bundles(sizing, placement.parts[p], config_, {}, [&](const BundleSpec& spec, const char*) {
      if (spec.home == Tier::kNvme) extent_bytes += detail::storage_bytes(spec.bytes);
      return detail::kNoBundle;
    });
    largest_data = std::max(largest_data, detail::storage_bytes(static_cast<std::uint64_t>(part.numel) * 4));
  }
  detail::check_budgets(engine_demand(shapes, config_), config_);
  const std::uint64_t host_budget =
      options_.host_budget_bytes ? options_.host_budget_bytes : largest_data;
  FERRY_CHECK(host_budget >= largest_data, "a host budget of ", format_bytes(host_budget),
              " cannot stage this model: its largest bundle takes ", format_bytes(largest_data),
              "; raise the staging host budget (--host-budget) to at least that");
  detail::check_room(layout_.directories, layout_.file_name, layout_.stripe_bytes, extent_bytes);

  StoreOptions store_options = detail::store_options(config_);
  store_options.device = torch::kCPU;
  store_options.gpu_budget_bytes = 0;
  store_options.host_budget_bytes = host_budget;
  store_options.budget_wait_seconds = 0;
  store_ = std::make_unique<Store>(store_options);

  // Note: bundles are added in the engine's order through its own add_bundles, so the first-fit
  // extents are the engine's; a rerun adopts them at the offsets the manifest recorded.
  auto place = [&](const BundleSpec& spec) {
    return previous_ ? detail::adopt_staged(*store_, *previous_, spec) : store_->add(spec);
  };
  const torch::ScalarType compute = detail::scalar_type(config_.precision);
  for (std::size_t p = 0; p < parts_.size(); ++p) {
    detail::Part& part = parts_[p];
    detail::add_bundles(part, placement.parts[p], config_, {}, [&](const BundleSpec& spec, const char*) {
      if (spec.home != Tier::kNvme) return detail::kNoBundle;
      const BundleId id = place(spec);
      staged_.push_back({id, p, torch::ScalarType::Undefined});
      return id;
    });
    const BundleId seed = detail::needs_seed(placement.parts[p]) ? part.grads : detail::kNoBundle;
    for (StagedBundle& staged : staged_) {
      if (staged.part != p) continue;
      if (staged.id == part.params || staged.id == seed) staged.dtype = compute;
      if (staged.id == part.master) staged.dtype = torch::kFloat;
    }
  }
  for (const StagedBundle& staged : staged_) {
    const BundleSpec& spec = store_->spec(staged.id);
    LayoutBundle entry;
    entry.name = spec.name;
    entry.bytes = spec.bytes;
    entry.nvme_offset = store_->nvme_offset(staged.id);
    entry.holds_data = staged.dtype != torch::ScalarType::Undefined;
    entry.complete = !entry.holds_data;  // zeros need no write
    if (const LayoutBundle* before = previous_ ? previous_->find(spec.name) : nullptr) {
      entry.complete = before->complete;
      entry.checksum = before->checksum;
    }
    layout_.bundles.push_back(entry);
  }
  // Note: a layout keeps its identity while it stays where it was staged. A copy (or a layout an
  // earlier ferry staged) gets a new one here, once run() has verified every bundle it holds, so
  // the copy becomes a layout of its own and never again shares anything with the original.
  if (previous_ && nvme_layout_binding_mismatch(*previous_).empty()) {
    layout_.layout_id = previous_->layout_id;
    layout_.bindings = previous_->bindings;
  } else {
    bind_nvme_layout(layout_);
  }
  write_nvme_layout(layout_, manifest_path_, config_.nvme_env);
}

bool Stager::verify(const StagedBundle& staged, LayoutBundle& entry) {
  store_->fetch(staged.id, Tier::kHost).wait();
  const torch::Tensor bytes = store_->tensor(staged.id, Tier::kHost);
  const bool matches = xxh64(bytes.data_ptr(), entry.bytes) == entry.checksum;
  if (matches && entry.chunk_checksums.empty()) entry.chunk_checksums = chunk_checksums(bytes.data_ptr(), entry.bytes);
  store_->evict(staged.id, Tier::kHost);
  return matches;
}

void Stager::fill_and_write(const StagedBundle& staged, LayoutBundle& entry) {
  const detail::Part& part = parts_[staged.part];
  store_->allocate(staged.id, Tier::kHost);
  const torch::Tensor values =
      detail::typed_view(*store_, staged.id, Tier::kHost, staged.dtype, part.numel);
  for (const detail::ParameterSlice& slice : part.slices) {
    reader_.read_into(part.kind, part.index, slice.name,
                      values.narrow(0, slice.offset, slice.numel).view(slice.shape));
  }
  const torch::Tensor bytes = store_->tensor(staged.id, Tier::kHost);
  entry.checksum = xxh64(bytes.data_ptr(), static_cast<std::size_t>(bytes.numel()));
  entry.chunk_checksums = chunk_checksums(bytes.data_ptr(), static_cast<std::uint64_t>(bytes.numel()));
  store_->write_back(staged.id, Tier::kHost, Tier::kNvme).wait();
  store_->evict(staged.id, Tier::kHost);
  store_->sync_nvme();
}

StageReport Stager::run() {
  const auto start = Clock::now();
  lay_out();
  StageReport report;
  report.manifest_path = manifest_path_;
  report.bundles = static_cast<std::int64_t>(layout_.bundles.size());
  std::uint64_t total = 0, done = 0;
  for (const LayoutBundle& entry : layout_.bundles) {
    total += entry.bytes;
    report.nvme_bytes = std::max(report.nvme_bytes, entry.nvme_offset + detail::storage_bytes(entry.bytes));
  }
  for (std::size_t i = 0; i < staged_.size(); ++i) {
    LayoutBundle& entry = layout_.bundles[i];
    if (entry.holds_data && entry.complete) {
      if (verify(staged_[i], entry)) {
        ++report.bundles_verified;
        report.bytes_verified += entry.bytes;
      } else {
        report.mismatched.push_back(entry.name);
        entry.complete = false;
      }
    }
    if (!entry.complete) {
      fill_and_write(staged_[i], entry);
      entry.complete = true;
      ++report.bundles_written;
      report.bytes_written += entry.bytes;
      write_nvme_layout(layout_, manifest_path_, config_.nvme_env);
    }
    done += entry.bytes;
    if (options_.progress) options_.progress(entry.name, done, total);
  }
  // The chunks' checksums of bundles an earlier ferry staged, and a copy's new identity, are only
  // recorded once every bundle is verified.
  write_nvme_layout(layout_, manifest_path_, config_.nvme_env);
  if (layout_.live) {
    layout_.live = false;
    write_nvme_layout(layout_, manifest_path_, config_.nvme_env);
  }
  report.peak_host_bytes = store_->stats().tiers[static_cast<int>(Tier::kHost)].peak_bytes;
  report.seconds = std::chrono::duration<double>(Clock::now() - start).count();
  return report;
}

}  // namespace

StageReport stage_model(const StageOptions& options) {
  const std::string why = detail::unstageable(options.engine.mode);
  FERRY_CHECK(why.empty(), "cannot stage: ", why);
  FERRY_CHECK(!options.engine.nvme_directories.empty(),
              "staging needs the NVMe directories the job will use: pass --nvme DIR[,DIR...]");
  FERRY_CHECK(fs::is_directory(options.model_dir), "model directory '", options.model_dir,
              "' does not exist: pass a Hugging Face directory with config.json and safetensors "
              "(--model)");
  for (const std::string& dir : options.engine.nvme_directories) detail::check_directory(dir);
  detail::validate(options.engine);
  return Stager(options).run();
}

models::ModelConfig staged_model_config(const std::string& dir) {
  const std::string path = detail::stage_manifest_path(dir);
  FERRY_CHECK(fs::exists(path), "no staged layout at '", dir, "' (", path, " is missing): stage "
              "the model first with `ferry stage --model HF_DIR --nvme ", dir, " --mode fuyou ...`");
  const NvmeLayout layout = read_nvme_layout(path);
  auto config = layout.metadata.find("model_config");
  FERRY_CHECK(config != layout.metadata.end(), "the staged layout manifest ", path,
              " records no model config; stage the model again");
  return models::ModelConfig::from_hf_json(config->second, path);
}

}  // namespace ferry
