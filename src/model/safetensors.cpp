#include "ferry/safetensors.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <limits>
#include <optional>
#include <utility>

#include <nlohmann/json.hpp>

#include "ferry/check.h"
#include "ferry/fs.h"
#include "ferry/io.h"

namespace ferry::safetensors {
namespace {

using Json = nlohmann::json;
using OrderedJson = nlohmann::ordered_json;

std::uint64_t read_le64(const unsigned char* bytes) {
  std::uint64_t value = 0;
  for (int i = 7; i >= 0; --i) {
    value = (value << 8) | bytes[i];
  }
  return value;
}

void write_le64(std::uint64_t value, unsigned char* bytes) {
  for (int i = 0; i < 8; ++i) {
    bytes[i] = static_cast<unsigned char>(value >> (8 * i));
  }
}

std::string io_failure(const char* what, const std::string& path, std::uint64_t offset,
                       std::uint64_t bytes, int error) {
  return detail::concat(what, " failed on ", path, " at offset ", offset, " for ", bytes,
                        " bytes: ", std::strerror(error), " (errno ", error, ")");
}

void pread_fully(int fd, void* dst, std::uint64_t bytes, std::uint64_t offset,
                 const std::string& path) {
  auto* cursor = static_cast<unsigned char*>(dst);
  std::uint64_t done = 0;
  while (done < bytes) {
    ssize_t got = ::pread(fd, cursor + done, bytes - done, static_cast<off_t>(offset + done));
    if (got < 0 && errno == EINTR) {
      continue;
    }
    FERRY_CHECK(got >= 0, io_failure("pread", path, offset + done, bytes - done, errno));
    FERRY_CHECK(got > 0, path, ": truncated: expected ", bytes, " bytes at offset ", offset,
                " but the file ends after ", done);
    done += static_cast<std::uint64_t>(got);
  }
}

// An owned file descriptor.
class File {
 public:
  File(const std::string& path, int flags, mode_t mode = 0) : path_(path) {
    fd_ = ::open(path.c_str(), flags | O_CLOEXEC, mode);
    FERRY_CHECK(fd_ >= 0, "cannot open ", path, ": ", std::strerror(errno), " (errno ", errno, ")");
  }
  ~File() {
    if (fd_ >= 0) {
      ::close(fd_);
    }
  }
  File(const File&) = delete;
  File& operator=(const File&) = delete;

  int fd() const { return fd_; }
  int release() { return std::exchange(fd_, -1); }
  void sync() const {
    FERRY_CHECK(::fsync(fd_) == 0, io_failure("fsync", path_, 0, 0, errno));
  }

 private:
  std::string path_;
  int fd_ = -1;
};

std::uint64_t file_size(int fd, const std::string& path) {
  struct stat info {};
  FERRY_CHECK(::fstat(fd, &info) == 0, io_failure("fstat", path, 0, 0, errno));
  return static_cast<std::uint64_t>(info.st_size);
}

std::uint64_t tensor_bytes(DType dtype, const std::vector<std::int64_t>& shape) {
  std::uint64_t total = dtype_size(dtype);
  for (std::int64_t dim : shape) {
    total *= static_cast<std::uint64_t>(dim);
  }
  return total;
}

std::string describe_shape(const std::vector<std::int64_t>& shape) {
  std::string text = "[";
  for (std::size_t i = 0; i < shape.size(); ++i) {
    text += (i == 0 ? "" : ", ") + std::to_string(shape[i]);
  }
  return text + "]";
}

// Multiplies without overflow; false when the product does not fit in 64 bits.
bool multiply(std::uint64_t a, std::uint64_t b, std::uint64_t* product) {
  if (a != 0 && b > std::numeric_limits<std::uint64_t>::max() / a) {
    return false;
  }
  *product = a * b;
  return true;
}

TensorInfo parse_tensor(const std::string& name, const Json& entry, std::uint64_t buffer_bytes,
                        const std::string& file) {
  const std::string where = file + ": tensor '" + name + "'";
  FERRY_CHECK(entry.is_object(), where, ": expected an object with dtype, shape, data_offsets");
  for (const auto& field : entry.items()) {
    FERRY_CHECK(field.key() == "dtype" || field.key() == "shape" || field.key() == "data_offsets",
                where, ": unexpected field '", field.key(),
                "' (valid: dtype, shape, data_offsets)");
  }

  TensorInfo info;
  info.name = name;
  auto dtype = entry.find("dtype");
  FERRY_CHECK(dtype != entry.end() && dtype->is_string(), where, ": missing string field dtype");
  auto parsed = parse_dtype(dtype->get_ref<const std::string&>());
  FERRY_CHECK(parsed.has_value(), where, ": unknown dtype '", dtype->get_ref<const std::string&>(),
              "' (valid: ", valid_dtype_names(), ")");
  info.dtype = *parsed;

  auto shape = entry.find("shape");
  FERRY_CHECK(shape != entry.end() && shape->is_array(), where,
              ": missing field shape (an array of non-negative integers)");
  std::uint64_t expected_bytes = dtype_size(info.dtype);
  for (const Json& dim : *shape) {
    FERRY_CHECK(dim.is_number_unsigned() && dim.get<std::uint64_t>() <=
                    static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max()),
                where, ": shape entry ", dim.dump(), " is not a non-negative integer");
    info.shape.push_back(dim.get<std::int64_t>());
    FERRY_CHECK(multiply(expected_bytes, dim.get<std::uint64_t>(), &expected_bytes), where,
                ": shape ", shape->dump(), " overflows 64 bits");
  }

  auto offsets = entry.find("data_offsets");
  FERRY_CHECK(offsets != entry.end() && offsets->is_array() && offsets->size() == 2 &&
                  (*offsets)[0].is_number_unsigned() && (*offsets)[1].is_number_unsigned(),
              where, ": data_offsets must be [begin, end] with non-negative integers");
  info.data_begin = (*offsets)[0].get<std::uint64_t>();
  info.data_end = (*offsets)[1].get<std::uint64_t>();
  FERRY_CHECK(info.data_begin <= info.data_end, where, ": data_offsets [", info.data_begin, ", ",
              info.data_end, "] end before they begin");
  FERRY_CHECK(info.data_end <= buffer_bytes, where, ": data_offsets [", info.data_begin, ", ",
              info.data_end, "] are out of range: the byte buffer has ", buffer_bytes, " bytes");
  FERRY_CHECK(info.bytes() == expected_bytes, where, ": shape ", describe_shape(info.shape),
              " of ", dtype_name(info.dtype), " needs ", expected_bytes,
              " bytes but data_offsets span ", info.bytes());
  return info;
}

// Note: safetensors requires the tensors to tile the buffer exactly. A hole or an overlap means
// the header does not describe the data, and loading it would silently produce garbage.
void check_tiling(const Header& header, const std::string& file) {
  std::uint64_t expected_begin = 0;
  const TensorInfo* previous = nullptr;
  for (const TensorInfo& info : header.tensors) {
    FERRY_CHECK(info.data_begin >= expected_begin, file, ": tensors '", previous->name, "' and '",
                info.name, "' overlap: '", info.name, "' begins at ", info.data_begin,
                " before '", previous->name, "' ends at ", expected_begin);
    FERRY_CHECK(info.data_begin == expected_begin, file, ": a hole of ",
                info.data_begin - expected_begin, " bytes precedes tensor '", info.name,
                "' at offset ", expected_begin, " (tensors must tile the buffer)");
    expected_begin = info.data_end;
    previous = &info;
  }
  FERRY_CHECK(expected_begin == header.buffer_bytes, file, ": the byte buffer has ",
              header.buffer_bytes, " bytes but the tensors cover only ", expected_begin);
}

}  // namespace

std::int64_t TensorInfo::numel() const {
  std::int64_t count = 1;
  for (std::int64_t dim : shape) {
    count *= dim;
  }
  return count;
}

const TensorInfo* Header::find(std::string_view name) const {
  for (const TensorInfo& info : tensors) {
    if (info.name == name) {
      return &info;
    }
  }
  return nullptr;
}

Header parse_header(const void* data, std::size_t size, std::uint64_t file_bytes,
                    const std::string& file) {
  FERRY_CHECK(file_bytes >= 8 && size >= 8, file, ": truncated: ", file_bytes,
              " bytes, but a safetensors file starts with an 8-byte header length");
  const auto* bytes = static_cast<const unsigned char*>(data);
  const std::uint64_t header_bytes = read_le64(bytes);
  FERRY_CHECK(header_bytes <= file_bytes - 8, file, ": header length ", header_bytes,
              " runs past the end of the file (", file_bytes, " bytes)");
  FERRY_CHECK(header_bytes <= kMaxHeaderBytes, file, ": header length ", header_bytes,
              " exceeds the limit of ", kMaxHeaderBytes, " bytes");
  FERRY_ASSERT(size >= 8 + header_bytes, "parse_header needs the whole header in memory");

  const char* text = reinterpret_cast<const char*>(bytes + 8);
  Json root = Json::parse(text, text + header_bytes, nullptr, /*allow_exceptions=*/false);
  FERRY_CHECK(!root.is_discarded(), file, ": header is not valid JSON");
  FERRY_CHECK(root.is_object(), file, ": header must be a JSON object, got ", root.type_name());

  Header header;
  header.buffer_offset = 8 + header_bytes;
  header.buffer_bytes = file_bytes - header.buffer_offset;
  for (const auto& item : root.items()) {
    if (item.key() == "__metadata__") {
      FERRY_CHECK(item.value().is_object(), file, ": __metadata__ must be an object of strings");
      for (const auto& entry : item.value().items()) {
        FERRY_CHECK(entry.value().is_string(), file, ": __metadata__ field '", entry.key(),
                    "' must be a string, got ", entry.value().dump());
        header.metadata[entry.key()] = entry.value().get<std::string>();
      }
      continue;
    }
    header.tensors.push_back(parse_tensor(item.key(), item.value(), header.buffer_bytes, file));
  }
  std::sort(header.tensors.begin(), header.tensors.end(),
            [](const TensorInfo& a, const TensorInfo& b) {
              return std::tie(a.data_begin, a.data_end) < std::tie(b.data_begin, b.data_end);
            });
  check_tiling(header, file);
  return header;
}

Reader::Reader(const std::string& path) : path_(path) {
  File file(path, O_RDONLY);
  const std::uint64_t bytes = file_size(file.fd(), path);
  FERRY_CHECK(bytes >= 8, path, ": truncated: ", bytes,
              " bytes, but a safetensors file starts with an 8-byte header length");
  unsigned char length[8];
  pread_fully(file.fd(), length, 8, 0, path);
  const std::uint64_t header_bytes = read_le64(length);
  FERRY_CHECK(header_bytes <= bytes - 8, path, ": header length ", header_bytes,
              " runs past the end of the file (", bytes, " bytes)");
  FERRY_CHECK(header_bytes <= kMaxHeaderBytes, path, ": header length ", header_bytes,
              " exceeds the limit of ", kMaxHeaderBytes, " bytes");
  std::string prefix(8 + header_bytes, '\0');
  pread_fully(file.fd(), prefix.data(), prefix.size(), 0, path);
  header_ = parse_header(prefix.data(), prefix.size(), bytes, path);
  fd_ = file.release();
}

Reader::~Reader() {
  if (fd_ >= 0) {
    ::close(fd_);
  }
}

Reader::Reader(Reader&& other) noexcept
    : path_(std::move(other.path_)),
      fd_(std::exchange(other.fd_, -1)),
      header_(std::move(other.header_)) {}

Reader& Reader::operator=(Reader&& other) noexcept {
  if (this != &other) {
    if (fd_ >= 0) {
      ::close(fd_);
    }
    path_ = std::move(other.path_);
    fd_ = std::exchange(other.fd_, -1);
    header_ = std::move(other.header_);
  }
  return *this;
}

const TensorInfo& Reader::tensor(std::string_view name) const {
  const TensorInfo* info = header_.find(name);
  FERRY_CHECK(info != nullptr, path_, ": no tensor named '", name, "' (the file has ",
              header_.tensors.size(), " tensors)");
  return *info;
}

void Reader::read_into(std::string_view name, void* dst, std::uint64_t dst_bytes) const {
  const TensorInfo& info = tensor(name);
  FERRY_CHECK(dst_bytes == info.bytes(), path_, ": tensor '", name, "' has ", info.bytes(),
              " bytes but the destination has ", dst_bytes);
  pread_fully(fd_, dst, info.bytes(), header_.buffer_offset + info.data_begin, path_);
}

std::uint64_t TensorSpec::bytes() const { return tensor_bytes(dtype, shape); }

std::uint64_t TensorView::bytes() const { return tensor_bytes(dtype, shape); }

namespace {

// One file a Writer puts in place, holding the declared tensors [first, end).
struct PlannedFile {
  std::string name;  // relative to the directory
  std::string path;
  std::size_t first = 0;
  std::size_t end = 0;
  std::string header;  // the file's first bytes: the 8-byte length, then the padded JSON
};

}  // namespace

struct Writer::Impl {
  enum class Kind { kFile, kCheckpoint };

  Kind kind = Kind::kFile;
  Env* env = nullptr;
  std::string target;  // the file or the checkpoint directory, for messages
  std::string dir;
  std::vector<TensorSpec> tensors;
  std::vector<std::uint64_t> data_begin;  // per tensor, relative to its file's byte buffer
  std::vector<std::size_t> file_of;       // per tensor
  std::map<std::string, std::size_t, std::less<>> index_of;
  std::vector<PlannedFile> files;

  // Note: progress only moves forward. Tensors before `current` are complete, `current` has
  // `current_bytes`, the ones after it have nothing yet. Files before `files_done` are in place;
  // `open` is the temporary of files[files_done] once that file has begun.
  std::size_t current = 0;
  std::uint64_t current_bytes = 0;
  std::size_t files_done = 0;
  std::unique_ptr<DurableFile> open;  // removes its temporary unless committed
  bool finished = false;

  std::uint64_t written(std::size_t tensor) const {
    if (tensor < current) {
      return tensors[tensor].bytes();
    }
    return tensor == current ? current_bytes : 0;
  }

  // Checks the names and shapes; `target` names the output in the errors.
  void declare(std::vector<TensorSpec> declared) {
    tensors = std::move(declared);
    for (std::size_t i = 0; i < tensors.size(); ++i) {
      const TensorSpec& tensor = tensors[i];
      FERRY_CHECK(tensor.name != "__metadata__" && !tensor.name.empty(), target,
                  ": invalid tensor name '", tensor.name, "'");
      FERRY_CHECK(index_of.emplace(tensor.name, i).second, target, ": tensor name '",
                  tensor.name, "' appears twice");
      std::uint64_t bytes = dtype_size(tensor.dtype);
      for (std::int64_t dim : tensor.shape) {
        FERRY_CHECK(dim >= 0, target, ": tensor '", tensor.name, "' has negative shape ",
                    describe_shape(tensor.shape));
        FERRY_CHECK(multiply(bytes, static_cast<std::uint64_t>(dim), &bytes), target,
                    ": tensor '", tensor.name, "' of shape ", describe_shape(tensor.shape),
                    " has more than 2^64 bytes");
      }
    }
    data_begin.assign(tensors.size(), 0);
    file_of.assign(tensors.size(), 0);
  }

  void plan_file(const std::string& name, const std::string& path, std::size_t first,
                 std::size_t end, const std::map<std::string, std::string>& metadata) {
    OrderedJson header = OrderedJson::object();
    OrderedJson meta = OrderedJson::object();
    meta["format"] = "pt";
    for (const auto& [key, value] : metadata) {
      meta[key] = value;
    }
    header["__metadata__"] = meta;
    std::uint64_t offset = 0;
    for (std::size_t i = first; i < end; ++i) {
      const TensorSpec& tensor = tensors[i];
      header[tensor.name] = {{"dtype", std::string(dtype_name(tensor.dtype))},
                             {"shape", tensor.shape},
                             {"data_offsets", {offset, offset + tensor.bytes()}}};
      data_begin[i] = offset;
      file_of[i] = files.size();
      offset += tensor.bytes();
    }

    std::string text = header.dump();
    text.append((8 - text.size() % 8) % 8, ' ');
    std::string bytes(8, '\0');
    write_le64(text.size(), reinterpret_cast<unsigned char*>(bytes.data()));
    files.push_back({name, path, first, end, bytes + text});
  }

  void start_file(std::size_t file) {
    FERRY_ASSERT(file == files_done && !open, "file ", file, " started out of turn");
    const PlannedFile& planned = files[file];
    open = std::make_unique<DurableFile>(env_or_posix(env), planned.path);
    open->write(0, planned.header.data(), planned.header.size());
  }

  // Puts every file before `file` in place: fsync, rename over the old one, fsync the directory.
  void finish_files_before(std::size_t file) {
    while (files_done < file) {
      if (!open) {
        start_file(files_done);
      }
      open->commit();
      open.reset();
      ++files_done;
    }
  }

  // The sharded form's model.safetensors.index.json, in place of a single model.safetensors.
  void write_index() {
    Json weight_map = Json::object();
    std::uint64_t total_bytes = 0;
    for (const PlannedFile& file : files) {
      for (std::size_t i = file.first; i < file.end; ++i) {
        weight_map[tensors[i].name] = file.name;
        total_bytes += tensors[i].bytes();
      }
    }
    Json index = {{"metadata", {{"total_size", total_bytes}}}, {"weight_map", weight_map}};
    write_file_durably(env_or_posix(env), dir + "/" + kIndexFileName, index.dump(2) + "\n");
    if (std::remove((dir + "/" + kSingleFileName).c_str()) == 0) env_or_posix(env).sync_directory(dir);
  }
};

Writer::Writer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Writer::~Writer() = default;
Writer::Writer(Writer&& other) noexcept = default;
Writer& Writer::operator=(Writer&& other) noexcept = default;

Writer Writer::file(const std::string& path, std::vector<TensorSpec> tensors,
                    const std::map<std::string, std::string>& metadata, Env* env) {
  auto impl = std::make_unique<Impl>();
  impl->kind = Impl::Kind::kFile;
  impl->env = env;
  impl->target = path;
  impl->dir = fs::parent_directory(path);
  impl->declare(std::move(tensors));
  const std::size_t slash = path.find_last_of('/');
  const std::string name = slash == std::string::npos ? path : path.substr(slash + 1);
  impl->plan_file(name, path, 0, impl->tensors.size(), metadata);
  return Writer(std::move(impl));
}

Writer Writer::checkpoint(const std::string& dir, std::vector<TensorSpec> tensors,
                          std::uint64_t max_shard_bytes, Env* env) {
  FERRY_CHECK(max_shard_bytes > 0, "max_shard_bytes must be positive, got 0");
  auto impl = std::make_unique<Impl>();
  impl->kind = Impl::Kind::kCheckpoint;
  impl->env = env;
  impl->target = dir;
  impl->dir = dir;
  impl->declare(std::move(tensors));

  std::vector<std::size_t> shard_starts = {0};
  std::uint64_t shard_bytes = 0;
  for (std::size_t i = 0; i < impl->tensors.size(); ++i) {
    const std::uint64_t bytes = impl->tensors[i].bytes();
    if (i > shard_starts.back() && shard_bytes + bytes > max_shard_bytes) {
      shard_starts.push_back(i);
      shard_bytes = 0;
    }
    shard_bytes += bytes;
  }
  fs::make_directories(dir);
  const std::size_t shards = shard_starts.size();
  for (std::size_t k = 0; k < shards; ++k) {
    const std::size_t end = k + 1 < shards ? shard_starts[k + 1] : impl->tensors.size();
    std::string name = kSingleFileName;
    if (shards > 1) {
      char numbered[64];
      std::snprintf(numbered, sizeof(numbered), "model-%05zu-of-%05zu.safetensors", k + 1, shards);
      name = numbered;
    }
    impl->plan_file(name, dir + "/" + name, shard_starts[k], end, {});
  }
  return Writer(std::move(impl));
}

void Writer::write(std::string_view name, const void* data, std::uint64_t bytes) {
  Impl& impl = *impl_;
  FERRY_CHECK(!impl.finished, impl.target, ": data for tensor '", name, "' after finish()");
  auto found = impl.index_of.find(name);
  FERRY_CHECK(found != impl.index_of.end(), impl.target, ": no tensor '", name,
              "' was declared (", impl.tensors.size(), " were)");
  const std::size_t index = found->second;
  FERRY_CHECK(index >= impl.current, impl.target, ": data for tensor '", name, "' after tensor '",
              impl.tensors[impl.current].name, "': tensors are written in the order declared, and '",
              name, "' comes first");
  for (std::size_t i = impl.current; i < index; ++i) {
    FERRY_CHECK(impl.written(i) == impl.tensors[i].bytes(), impl.target, ": data for tensor '",
                name, "' before tensor '", impl.tensors[i].name, "' is complete (",
                impl.written(i), " of its ", impl.tensors[i].bytes(),
                " bytes written): tensors are written in the order declared");
  }
  if (index != impl.current) {
    impl.current = index;
    impl.current_bytes = 0;
  }
  const std::uint64_t size = impl.tensors[index].bytes();
  FERRY_CHECK(bytes <= size - impl.current_bytes, impl.target, ": tensor '", name, "' has ", size,
              " bytes; ", impl.current_bytes, " are written and ", bytes, " more were given");
  FERRY_CHECK(data != nullptr || bytes == 0, impl.target, ": tensor '", name, "': no data for ",
              bytes, " bytes");
  if (bytes == 0) {
    return;
  }
  const std::size_t file = impl.file_of[index];
  impl.finish_files_before(file);
  if (!impl.open) {
    impl.start_file(file);
  }
  const PlannedFile& planned = impl.files[file];
  impl.open->write(planned.header.size() + impl.data_begin[index] + impl.current_bytes, data, bytes);
  impl.current_bytes += bytes;
}

std::vector<std::string> Writer::finish() {
  Impl& impl = *impl_;
  FERRY_CHECK(!impl.finished, impl.target, ": finish() called twice");
  for (std::size_t i = impl.current; i < impl.tensors.size(); ++i) {
    FERRY_CHECK(impl.written(i) == impl.tensors[i].bytes(), impl.target, ": tensor '",
                impl.tensors[i].name, "' is incomplete: ", impl.written(i), " of its ",
                impl.tensors[i].bytes(), " bytes were written");
  }
  impl.finish_files_before(impl.files.size());
  impl.finished = true;

  std::vector<std::string> names;
  for (const PlannedFile& file : impl.files) {
    names.push_back(file.name);
  }
  if (impl.kind == Impl::Kind::kCheckpoint) {
    if (impl.files.size() > 1) {
      impl.write_index();
      names.emplace_back(kIndexFileName);
    } else if (std::remove((impl.dir + "/" + kIndexFileName).c_str()) == 0) {
      env_or_posix(impl.env).sync_directory(impl.dir);
    }
  }
  return names;
}

const std::string& Writer::file_of(std::string_view name) const {
  auto found = impl_->index_of.find(name);
  FERRY_CHECK(found != impl_->index_of.end(), impl_->target, ": no tensor '", name, "' was declared");
  return impl_->files[impl_->file_of[found->second]].name;
}

namespace {

std::vector<TensorSpec> specs_of(const std::vector<TensorView>& tensors) {
  std::vector<TensorSpec> specs;
  specs.reserve(tensors.size());
  for (const TensorView& tensor : tensors) {
    specs.push_back({tensor.name, tensor.dtype, tensor.shape});
  }
  return specs;
}

std::vector<std::string> write_from_memory(Writer writer, const std::vector<TensorView>& tensors) {
  for (const TensorView& tensor : tensors) {
    writer.write(tensor.name, tensor.data, tensor.bytes());
  }
  return writer.finish();
}

}  // namespace

void write_file(const std::string& path, const std::vector<TensorView>& tensors,
                const std::map<std::string, std::string>& metadata, Env* env) {
  write_from_memory(Writer::file(path, specs_of(tensors), metadata, env), tensors);
}

std::vector<std::string> write_checkpoint(const std::string& dir,
                                          const std::vector<TensorView>& tensors,
                                          std::uint64_t max_shard_bytes, Env* env) {
  return write_from_memory(Writer::checkpoint(dir, specs_of(tensors), max_shard_bytes, env), tensors);
}

Checkpoint::Checkpoint(const std::string& dir) : dir_(dir) {
  if (fs::exists(dir) && !fs::is_directory(dir)) {
    readers_.emplace_back(dir);
    for (const TensorInfo& info : readers_.back().header().tensors) {
      shard_of_.emplace(info.name, 0);
    }
    return;
  }
  const std::string index_path = dir + "/" + kIndexFileName;
  const std::string single_path = dir + "/" + kSingleFileName;
  if (!fs::exists(index_path)) {
    FERRY_CHECK(fs::exists(single_path), dir, ": no ", kSingleFileName, " or ",
                kIndexFileName, " in this directory");
    readers_.emplace_back(single_path);
    for (const TensorInfo& info : readers_.back().header().tensors) {
      shard_of_.emplace(info.name, 0);
    }
    return;
  }

  std::ifstream stream(index_path);
  FERRY_CHECK(stream.good(), "cannot read ", index_path);
  Json index = Json::parse(stream, nullptr, /*allow_exceptions=*/false);
  FERRY_CHECK(!index.is_discarded() && index.is_object(), index_path,
              ": not a JSON object");
  auto weight_map = index.find("weight_map");
  FERRY_CHECK(weight_map != index.end() && weight_map->is_object(), index_path,
              ": missing object field weight_map");

  std::map<std::string, std::size_t> reader_of_file;
  for (const auto& item : weight_map->items()) {
    FERRY_CHECK(item.value().is_string(), index_path, ": weight_map entry '", item.key(),
                "' must name a file, got ", item.value().dump());
    const std::string file = item.value().get<std::string>();
    FERRY_CHECK(!file.empty() && file.find('/') == std::string::npos, index_path,
                ": weight_map entry '", item.key(), "' names '", file,
                "', which is not a file name in this directory");
    auto [position, inserted] = reader_of_file.emplace(file, readers_.size());
    if (inserted) {
      readers_.emplace_back(dir + "/" + file);
    }
    const Reader& reader = readers_[position->second];
    FERRY_CHECK(reader.header().find(item.key()) != nullptr, index_path, ": tensor '",
                item.key(), "' is mapped to ", file, ", which does not contain it");
    shard_of_.emplace(item.key(), position->second);
  }
  for (std::size_t i = 0; i < readers_.size(); ++i) {
    for (const TensorInfo& info : readers_[i].header().tensors) {
      auto mapped = shard_of_.find(info.name);
      FERRY_CHECK(mapped != shard_of_.end() && mapped->second == i, readers_[i].path(),
                  ": unexpected tensor '", info.name, "' that ", index_path,
                  " does not map to this file");
    }
  }
}

std::vector<std::string> Checkpoint::names() const {
  std::vector<std::string> result;
  result.reserve(shard_of_.size());
  for (const auto& entry : shard_of_) {
    result.push_back(entry.first);
  }
  return result;
}

bool Checkpoint::contains(std::string_view name) const {
  return shard_of_.find(name) != shard_of_.end();
}

const Reader& Checkpoint::reader_of(std::string_view name) const {
  auto found = shard_of_.find(name);
  FERRY_CHECK(found != shard_of_.end(), dir_, ": checkpoint has no tensor named '", name, "'");
  return readers_[found->second];
}

const TensorInfo& Checkpoint::tensor(std::string_view name) const {
  return reader_of(name).tensor(name);
}

const std::string& Checkpoint::file_of(std::string_view name) const {
  return reader_of(name).path();
}

void Checkpoint::read_into(std::string_view name, void* dst, std::uint64_t dst_bytes) const {
  reader_of(name).read_into(name, dst, dst_bytes);
}

}  // namespace ferry::safetensors
