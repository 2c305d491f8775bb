#pragma once

// The safetensors checkpoint format (https://github.com/huggingface/safetensors), single files
// and sharded directories with model.safetensors.index.json.
//
// A file is: an 8-byte little-endian header length N, N bytes of JSON
//   {"__metadata__": {"format": "pt"}, "name": {"dtype": "F32", "shape": [2, 3],
//    "data_offsets": [begin, end]}, ...}
// padded with spaces, then the byte buffer. Offsets are relative to the buffer; the tensors tile
// it exactly (no overlap, no holes). Everything here is free of torch: tensors are read into and
// written from plain memory, so a block can be streamed into a caller's buffer.

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "ferry/dtype.h"

namespace ferry {
class Env;
}

namespace ferry::safetensors {

struct TensorInfo {
  std::string name;
  DType dtype = DType::kF32;
  std::vector<std::int64_t> shape;
  std::uint64_t data_begin = 0;  // relative to the byte buffer
  std::uint64_t data_end = 0;

  std::uint64_t bytes() const { return data_end - data_begin; }
  std::int64_t numel() const;
};

struct Header {
  std::vector<TensorInfo> tensors;  // in buffer order
  std::map<std::string, std::string> metadata;
  std::uint64_t buffer_offset = 0;  // where the byte buffer starts in the file: 8 + N
  std::uint64_t buffer_bytes = 0;

  // nullptr when absent.
  const TensorInfo* find(std::string_view name) const;
};

// Limit on N, as in the reference implementation: a larger header is rejected as corrupt.
inline constexpr std::uint64_t kMaxHeaderBytes = 100u << 20;

// Validates a whole file image (or its first `size` bytes when `file_bytes` says the file is
// larger) and returns its header. Every error is a ferry::Error naming `file` and the bad field.
Header parse_header(const void* data, std::size_t size, std::uint64_t file_bytes,
                    const std::string& file);

// One open safetensors file. Reads go straight from the file into the caller's memory.
class Reader {
 public:
  explicit Reader(const std::string& path);
  ~Reader();
  Reader(Reader&& other) noexcept;
  Reader& operator=(Reader&& other) noexcept;
  Reader(const Reader&) = delete;
  Reader& operator=(const Reader&) = delete;

  const std::string& path() const { return path_; }
  const Header& header() const { return header_; }

  // Throws, naming the file and the tensor, when absent.
  const TensorInfo& tensor(std::string_view name) const;

  // Copies the tensor's bytes into dst; dst_bytes must equal its size.
  void read_into(std::string_view name, void* dst, std::uint64_t dst_bytes) const;

 private:
  std::string path_;
  int fd_ = -1;
  Header header_;
};

// A tensor to write, declared before its data: a Writer lays out every header from these.
struct TensorSpec {
  std::string name;
  DType dtype = DType::kF32;
  std::vector<std::int64_t> shape;

  std::uint64_t bytes() const;
};

// A tensor to write with its data: the caller keeps `data` alive for the duration of the call.
struct TensorView {
  std::string name;
  DType dtype = DType::kF32;
  std::vector<std::int64_t> shape;
  const void* data = nullptr;

  std::uint64_t bytes() const;
};

inline constexpr const char* kSingleFileName = "model.safetensors";
inline constexpr const char* kIndexFileName = "model.safetensors.index.json";

// Writes one safetensors file, or a checkpoint directory of shards, without ever holding the
// tensors' data: every tensor is declared up front, so each header and the split into shards are
// known before the first byte of data, and the data then comes in declaration order, in pieces of
// any size. write_file and write_checkpoint are this writer fed from memory.
//
//   Writer writer = Writer::checkpoint(dir, specs, max_shard_bytes);
//   for (...) writer.write(name, chunk, chunk_bytes);  // in order; a tensor may take several
//   writer.finish();
//
// Note: each file goes to "<file>.tmp" and is fsynced and renamed into place (then the directory
// fsynced) once its last tensor is complete (a DurableFile, through `env`: nullptr is
// Env::posix()), so a crash leaves the old file or the new one, never a torn one. A sharded checkpoint is only consistent as a whole after finish(): to replace one
// atomically, write it into a staging directory and swap that in (the engine does). A Writer
// destroyed before finish() removes the temporary file it has open.
class Writer {
 public:
  // One file at `path`. Tensors are laid out in the given order; names must be unique.
  // `__metadata__` always carries "format": "pt" (transformers requires it) plus `metadata`.
  static Writer file(const std::string& path, std::vector<TensorSpec> tensors,
                     const std::map<std::string, std::string>& metadata = {}, Env* env = nullptr);
  // A checkpoint directory, created if missing: model.safetensors when everything fits in
  // max_shard_bytes, else model-00001-of-0000K.safetensors ... and model.safetensors.index.json
  // (weight_map and metadata.total_size). Shards take tensors in order while they fit; a tensor
  // larger than max_shard_bytes gets a shard of its own. finish() removes the form not written
  // (the index, or a single model.safetensors).
  static Writer checkpoint(const std::string& dir, std::vector<TensorSpec> tensors,
                           std::uint64_t max_shard_bytes, Env* env = nullptr);

  ~Writer();
  Writer(Writer&& other) noexcept;
  Writer& operator=(Writer&& other) noexcept;
  Writer(const Writer&) = delete;
  Writer& operator=(const Writer&) = delete;

  // Appends `bytes` bytes to tensor `name`. Throws, naming the tensor, when `name` was not
  // declared, when a tensor declared before it is not complete yet or it is complete and a later
  // one has begun, or when the data would run past its size. Tensors of zero bytes need no call.
  void write(std::string_view name, const void* data, std::uint64_t bytes);

  // Checks that every tensor is complete (naming the first that is not), puts the remaining
  // files in place and returns the names written, relative to their directory.
  std::vector<std::string> finish();

  // The file (relative to its directory) that holds tensor `name`, as laid out.
  const std::string& file_of(std::string_view name) const;

 private:
  struct Impl;
  explicit Writer(std::unique_ptr<Impl> impl);

  std::unique_ptr<Impl> impl_;
};

// Writes one file with Writer::file: the whole file at once, from memory.
void write_file(const std::string& path, const std::vector<TensorView>& tensors,
                const std::map<std::string, std::string>& metadata = {}, Env* env = nullptr);

// Writes a checkpoint directory with Writer::checkpoint from memory. Returns the file names
// written.
std::vector<std::string> write_checkpoint(const std::string& dir,
                                          const std::vector<TensorView>& tensors,
                                          std::uint64_t max_shard_bytes, Env* env = nullptr);

// A checkpoint directory, sharded or not, seen as one set of named tensors. The index and every
// shard header are validated on open: each name in the weight map must be in its shard, and
// every tensor of every shard must be in the weight map.
class Checkpoint {
 public:
  explicit Checkpoint(const std::string& dir);

  const std::string& dir() const { return dir_; }
  std::vector<std::string> names() const;  // sorted
  bool contains(std::string_view name) const;

  // Throws, naming the directory and the tensor, when absent.
  const TensorInfo& tensor(std::string_view name) const;
  const std::string& file_of(std::string_view name) const;
  void read_into(std::string_view name, void* dst, std::uint64_t dst_bytes) const;

 private:
  const Reader& reader_of(std::string_view name) const;

  std::string dir_;
  std::vector<Reader> readers_;
  std::map<std::string, std::size_t, std::less<>> shard_of_;
};

}  // namespace ferry::safetensors
