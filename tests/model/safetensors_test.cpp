#include <catch2/catch.hpp>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "ferry/check.h"
#include "ferry/safetensors.h"
#include "support/temp_dir.h"

namespace st = ferry::safetensors;
using ferry::DType;
using Catch::Matchers::Contains;

namespace {

std::string read_bytes(const std::string& path) {
  std::ifstream stream(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(stream), {});
}

// A file with an arbitrary header and `data_bytes` bytes of buffer, for the bad-input cases.
void write_raw(const std::string& path, const std::string& header, std::size_t data_bytes,
               std::uint64_t declared_length) {
  std::ofstream stream(path, std::ios::binary | std::ios::trunc);
  unsigned char length[8];
  for (int i = 0; i < 8; ++i) {
    length[i] = static_cast<unsigned char>(declared_length >> (8 * i));
  }
  stream.write(reinterpret_cast<const char*>(length), 8);
  stream << header << std::string(data_bytes, '\x01');
}

void write_raw(const std::string& path, const std::string& header, std::size_t data_bytes) {
  write_raw(path, header, data_bytes, header.size());
}

std::vector<float> iota_floats(std::size_t count, float start) {
  std::vector<float> values(count);
  for (std::size_t i = 0; i < count; ++i) {
    values[i] = start + static_cast<float>(i);
  }
  return values;
}

}  // namespace

TEST_CASE("safetensors: a written file follows the format and reads back", "[safetensors]") {
  ferry::testing::TempDir dir;
  const std::string path = dir.file("model.safetensors");
  std::vector<float> weight = iota_floats(6, 0.5f);
  std::vector<std::uint16_t> half = {1, 2, 3};
  std::vector<std::int64_t> ids = {7, -8};
  st::write_file(path,
                 {{"layer.weight", DType::kF32, {2, 3}, weight.data()},
                  {"layer.bias", DType::kBF16, {3}, half.data()},
                  {"ids", DType::kI64, {2}, ids.data()},
                  {"empty", DType::kF32, {0, 4}, nullptr}},
                 {{"step", "12"}});

  const std::string bytes = read_bytes(path);
  std::uint64_t header_length = 0;
  std::memcpy(&header_length, bytes.data(), 8);  // little-endian host
  CHECK(header_length % 8 == 0);
  const std::string header = bytes.substr(8, header_length);
  CHECK(header.find_last_not_of(' ') == header.find_last_of('}'));
  auto json = nlohmann::json::parse(header);
  CHECK(json["__metadata__"]["format"] == "pt");
  CHECK(json["__metadata__"]["step"] == "12");
  CHECK(json["layer.weight"]["data_offsets"] == nlohmann::json({0, 24}));
  CHECK(json["layer.bias"]["data_offsets"] == nlohmann::json({24, 30}));
  CHECK(json["ids"]["dtype"] == "I64");
  CHECK(bytes.size() == 8 + header_length + 24 + 6 + 16);
  CHECK_FALSE(std::filesystem::exists(path + ".tmp"));

  st::Reader reader(path);
  CHECK(reader.header().tensors.size() == 4);
  CHECK(reader.header().metadata.at("format") == "pt");
  const st::TensorInfo& info = reader.tensor("layer.weight");
  CHECK(info.dtype == DType::kF32);
  CHECK(info.shape == std::vector<std::int64_t>{2, 3});
  CHECK(info.numel() == 6);
  std::vector<float> loaded(6);
  reader.read_into("layer.weight", loaded.data(), 24);
  CHECK(loaded == weight);
  std::vector<std::int64_t> loaded_ids(2);
  reader.read_into("ids", loaded_ids.data(), 16);
  CHECK(loaded_ids == ids);
  CHECK_THROWS_WITH(reader.read_into("layer.weight", loaded.data(), 20),
                    Contains("has 24 bytes but the destination has 20"));
  CHECK_THROWS_WITH(reader.tensor("missing"),
                    Contains(path) && Contains("no tensor named 'missing'"));
}

TEST_CASE("safetensors: sharded checkpoints split by size and read as one", "[safetensors]") {
  ferry::testing::TempDir dir;
  std::vector<std::vector<float>> values;
  std::vector<st::TensorView> views;
  for (int i = 0; i < 5; ++i) {
    values.push_back(iota_floats(10, 100.0f * i));
  }
  for (int i = 0; i < 5; ++i) {
    views.push_back({"t" + std::to_string(i), DType::kF32, {10}, values[i].data()});
  }

  auto files = st::write_checkpoint(dir.path(), views, /*max_shard_bytes=*/80);
  REQUIRE(files.size() == 4);  // 3 shards of at most two 40-byte tensors, plus the index
  CHECK(files[0] == "model-00001-of-00003.safetensors");
  CHECK(files.back() == st::kIndexFileName);
  auto index = nlohmann::json::parse(read_bytes(dir.file(st::kIndexFileName)));
  CHECK(index["metadata"]["total_size"] == 200);
  CHECK(index["weight_map"]["t4"] == "model-00003-of-00003.safetensors");

  st::Checkpoint checkpoint(dir.path());
  CHECK(checkpoint.names() == std::vector<std::string>{"t0", "t1", "t2", "t3", "t4"});
  for (int i = 0; i < 5; ++i) {
    std::vector<float> loaded(10);
    checkpoint.read_into("t" + std::to_string(i), loaded.data(), 40);
    CHECK(loaded == values[i]);
  }
  CHECK_THROWS_WITH(checkpoint.tensor("t9"), Contains("no tensor named 't9'"));

  // Rewriting as a single file replaces the shards' index.
  files = st::write_checkpoint(dir.path(), views, 1 << 20);
  CHECK(files == std::vector<std::string>{st::kSingleFileName});
  CHECK_FALSE(std::filesystem::exists(dir.file(st::kIndexFileName)));
  CHECK(st::Checkpoint(dir.path()).names().size() == 5);
}

TEST_CASE("safetensors: a tensor larger than the shard size gets its own shard",
          "[safetensors]") {
  ferry::testing::TempDir dir;
  std::vector<float> small = iota_floats(2, 0), large = iota_floats(100, 0);
  auto files = st::write_checkpoint(
      dir.path(), {{"small", DType::kF32, {2}, small.data()}, {"large", DType::kF32, {100}, large.data()}},
      64);
  CHECK(files.size() == 3);
  CHECK(st::Checkpoint(dir.path()).file_of("large") ==
        dir.file("model-00002-of-00002.safetensors"));
}

TEST_CASE("safetensors: bad files are rejected with the file and the field named",
          "[safetensors]") {
  ferry::testing::TempDir dir;
  const std::string path = dir.file("bad.safetensors");
  const std::string f32_pair = R"("a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]})";

  SECTION("truncated before the header length") {
    std::ofstream(path, std::ios::binary) << "abc";
    CHECK_THROWS_WITH(st::Reader(path), Contains(path) && Contains("truncated: 3 bytes"));
  }
  SECTION("header length past the end") {
    write_raw(path, "{}", 0, 4096);
    CHECK_THROWS_WITH(st::Reader(path),
                      Contains(path) && Contains("header length 4096 runs past the end"));
  }
  SECTION("header is not JSON") {
    write_raw(path, "{not json", 0);
    CHECK_THROWS_WITH(st::Reader(path), Contains(path) && Contains("not valid JSON"));
  }
  SECTION("unknown dtype") {
    write_raw(path, R"({"a":{"dtype":"F31","shape":[2],"data_offsets":[0,8]}})", 8);
    CHECK_THROWS_WITH(st::Reader(path), Contains(path) && Contains("tensor 'a'") &&
                                            Contains("unknown dtype 'F31'") && Contains("BF16"));
  }
  SECTION("shape and byte size disagree") {
    write_raw(path, R"({"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", 8);
    CHECK_THROWS_WITH(st::Reader(path), Contains("tensor 'a'") && Contains("needs 12 bytes") &&
                                            Contains("span 8"));
  }
  SECTION("offsets out of range") {
    write_raw(path, R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})", 4);
    CHECK_THROWS_WITH(st::Reader(path), Contains("tensor 'a'") && Contains("out of range") &&
                                            Contains("4 bytes"));
  }
  SECTION("offsets overlap") {
    write_raw(path,
              "{" + f32_pair + R"(,"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})", 12);
    CHECK_THROWS_WITH(st::Reader(path), Contains(path) && Contains("'a' and 'b' overlap"));
  }
  SECTION("a hole between tensors") {
    write_raw(path,
              "{" + f32_pair + R"(,"b":{"dtype":"F32","shape":[2],"data_offsets":[12,20]}})", 20);
    CHECK_THROWS_WITH(st::Reader(path), Contains("a hole of 4 bytes precedes tensor 'b'"));
  }
  SECTION("bytes after the last tensor") {
    write_raw(path, "{" + f32_pair + "}", 12);
    CHECK_THROWS_WITH(st::Reader(path), Contains("has 12 bytes but the tensors cover only 8"));
  }
  SECTION("offsets that end before they begin") {
    write_raw(path, R"({"a":{"dtype":"F32","shape":[0],"data_offsets":[8,0]}})", 8);
    CHECK_THROWS_WITH(st::Reader(path), Contains("end before they begin"));
  }
  SECTION("a negative dimension") {
    write_raw(path, R"({"a":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})", 8);
    CHECK_THROWS_WITH(st::Reader(path), Contains("shape entry -2"));
  }
  SECTION("metadata that is not strings") {
    write_raw(path, R"({"__metadata__":{"format":1}})", 0);
    CHECK_THROWS_WITH(st::Reader(path), Contains("__metadata__ field 'format'"));
  }
  SECTION("a truncated buffer") {
    write_raw(path, "{" + f32_pair + "}", 8);
    std::filesystem::resize_file(path, std::filesystem::file_size(path) - 3);
    CHECK_THROWS_WITH(st::Reader(path), Contains("out of range"));
  }
}

TEST_CASE("safetensors: a sharded index must agree with its shards", "[safetensors]") {
  ferry::testing::TempDir dir;
  std::vector<float> a = iota_floats(4, 0), b = iota_floats(4, 10), c = iota_floats(4, 20);
  st::write_checkpoint(dir.path(),  // shard 1: a, b; shard 2: c
                       {{"a", DType::kF32, {4}, a.data()},
                        {"b", DType::kF32, {4}, b.data()},
                        {"c", DType::kF32, {4}, c.data()}},
                       32);
  const std::string index_path = dir.file(st::kIndexFileName);
  auto index = nlohmann::json::parse(read_bytes(index_path));

  SECTION("a tensor mapped to a shard that lacks it") {
    index["weight_map"]["a"] = "model-00002-of-00002.safetensors";
    std::ofstream(index_path) << index.dump();
    CHECK_THROWS_WITH(st::Checkpoint(dir.path()),
                      Contains("tensor 'a' is mapped to model-00002-of-00002.safetensors"));
  }
  SECTION("a shard tensor the index does not list") {
    index["weight_map"].erase("b");
    std::ofstream(index_path) << index.dump();
    CHECK_THROWS_WITH(st::Checkpoint(dir.path()),
                      Contains("model-00001-of-00002.safetensors: unexpected tensor 'b'"));
  }
  SECTION("a missing shard file") {
    std::filesystem::remove(dir.file("model-00002-of-00002.safetensors"));
    CHECK_THROWS_WITH(st::Checkpoint(dir.path()),
                      Contains("cannot open") && Contains("model-00002-of-00002.safetensors"));
  }
  SECTION("no checkpoint at all") {
    ferry::testing::TempDir empty;
    CHECK_THROWS_WITH(st::Checkpoint(empty.path()),
                      Contains("no model.safetensors or model.safetensors.index.json"));
  }
}

TEST_CASE("safetensors: parse_header validates an in-memory image", "[safetensors]") {
  std::string image(8, '\0');
  const std::string header = R"({"x":{"dtype":"U8","shape":[3],"data_offsets":[0,3]}})";
  image[0] = static_cast<char>(header.size());
  image += header + "abc";
  st::Header parsed = st::parse_header(image.data(), image.size(), image.size(), "memory");
  REQUIRE(parsed.tensors.size() == 1);
  CHECK(parsed.buffer_offset == 8 + header.size());
  CHECK(parsed.buffer_bytes == 3);
  CHECK_THROWS_AS(st::parse_header(image.data(), 4, 4, "memory"), ferry::Error);
}

namespace {

// Feeds a tensor to a streaming writer in pieces of at most `piece` bytes.
void write_in_pieces(st::Writer& writer, const st::TensorView& tensor, std::uint64_t piece) {
  const auto* data = static_cast<const char*>(tensor.data);
  for (std::uint64_t done = 0; done < tensor.bytes(); done += piece) {
    writer.write(tensor.name, data + done, std::min(piece, tensor.bytes() - done));
  }
}

std::vector<st::TensorSpec> specs_of(const std::vector<st::TensorView>& tensors) {
  std::vector<st::TensorSpec> specs;
  for (const st::TensorView& tensor : tensors) {
    specs.push_back({tensor.name, tensor.dtype, tensor.shape});
  }
  return specs;
}

}  // namespace

TEST_CASE("safetensors: the streaming writer writes what write_file writes", "[safetensors]") {
  ferry::testing::TempDir dir;
  std::vector<float> weight = iota_floats(6, 0.5f);
  std::vector<std::uint16_t> half = {1, 2, 3};
  std::vector<std::int64_t> ids = {7, -8};
  const std::vector<st::TensorView> tensors = {{"layer.weight", DType::kF32, {2, 3}, weight.data()},
                                               {"empty", DType::kF32, {0, 4}, nullptr},
                                               {"layer.bias", DType::kBF16, {3}, half.data()},
                                               {"ids", DType::kI64, {2}, ids.data()}};
  const std::map<std::string, std::string> metadata = {{"step", "12"}};
  st::write_file(dir.file("whole.safetensors"), tensors, metadata);

  st::Writer writer = st::Writer::file(dir.file("streamed.safetensors"), specs_of(tensors), metadata);
  for (const st::TensorView& tensor : tensors) {
    write_in_pieces(writer, tensor, 5);  // the empty tensor gets no call at all
  }
  CHECK(writer.finish() == std::vector<std::string>{"streamed.safetensors"});
  CHECK(read_bytes(dir.file("streamed.safetensors")) == read_bytes(dir.file("whole.safetensors")));
  CHECK_FALSE(std::filesystem::exists(dir.file("streamed.safetensors.tmp")));
}

TEST_CASE("safetensors: the streaming writer shards as write_checkpoint does", "[safetensors]") {
  ferry::testing::TempDir whole, streamed;
  std::vector<std::vector<float>> values;
  for (int i = 0; i < 5; ++i) {
    values.push_back(iota_floats(10, 100.0f * i));
  }
  std::vector<st::TensorView> tensors;
  for (int i = 0; i < 5; ++i) {
    tensors.push_back({"t" + std::to_string(i), DType::kF32, {10}, values[i].data()});
  }
  const std::uint64_t max_shard_bytes = GENERATE(80, 1 << 20);  // three shards, or one file
  INFO("max_shard_bytes " << max_shard_bytes);
  const std::vector<std::string> files = st::write_checkpoint(whole.path(), tensors, max_shard_bytes);

  st::Writer writer = st::Writer::checkpoint(streamed.path(), specs_of(tensors), max_shard_bytes);
  for (std::size_t i = 0; i < tensors.size(); ++i) {
    write_in_pieces(writer, tensors[i], 7);
    if (max_shard_bytes == 80 && i == 2) {
      // A shard is in place as soon as its last tensor is complete and the next one begins.
      CHECK(std::filesystem::exists(streamed.file("model-00001-of-00003.safetensors")));
      CHECK_FALSE(std::filesystem::exists(streamed.file("model-00002-of-00003.safetensors")));
    }
  }
  CHECK(writer.finish() == files);
  for (const std::string& file : files) {
    INFO(file);
    CHECK(read_bytes(streamed.file(file)) == read_bytes(whole.file(file)));
  }
  CHECK(std::filesystem::exists(streamed.file(st::kIndexFileName)) == (files.size() > 1));
}

TEST_CASE("safetensors: the streaming writer refuses data out of order or missing",
          "[safetensors]") {
  ferry::testing::TempDir dir;
  const std::string path = dir.file("model.safetensors");
  std::vector<float> previous = iota_floats(2, 9);
  st::write_file(path, {{"old", DType::kF32, {2}, previous.data()}});
  const std::string previous_bytes = read_bytes(path);

  std::vector<float> a = iota_floats(2, 0), b = iota_floats(2, 10);
  st::Writer writer = st::Writer::file(
      path, {{"a", DType::kF32, {2}}, {"none", DType::kF32, {0}}, {"b", DType::kF32, {2}}});

  SECTION("a later tensor before the current one is complete") {
    writer.write("a", a.data(), 4);
    CHECK_THROWS_WITH(writer.write("b", b.data(), 8),
                      Contains(path) &&
                          Contains("data for tensor 'b' before tensor 'a' is complete (4 of its 8 "
                                   "bytes written)"));
  }
  SECTION("an earlier tensor after a later one began") {
    writer.write("a", a.data(), 8);
    writer.write("b", b.data(), 4);
    CHECK_THROWS_WITH(writer.write("a", a.data(), 4),
                      Contains("data for tensor 'a' after tensor 'b'"));
  }
  SECTION("more data than the tensor holds") {
    writer.write("a", a.data(), 4);
    CHECK_THROWS_WITH(writer.write("a", a.data(), 8),
                      Contains("tensor 'a' has 8 bytes; 4 are written and 8 more were given"));
  }
  SECTION("a tensor that was not declared") {
    CHECK_THROWS_WITH(writer.write("c", a.data(), 8),
                      Contains("no tensor 'c' was declared (3 were)"));
  }
  SECTION("finishing with a tensor incomplete") {
    writer.write("a", a.data(), 8);
    CHECK_THROWS_WITH(writer.finish(),
                      Contains(path) && Contains("tensor 'b' is incomplete: 0 of its 8 bytes"));
  }
  SECTION("finishing with a tensor partly written") {
    writer.write("a", a.data(), 8);
    writer.write("b", b.data(), 4);
    CHECK_THROWS_WITH(writer.finish(), Contains("tensor 'b' is incomplete: 4 of its 8 bytes"));
  }
  SECTION("data after finish") {
    writer.write("a", a.data(), 8);
    writer.write("b", b.data(), 8);
    writer.finish();
    CHECK_THROWS_WITH(writer.write("b", b.data(), 0), Contains("data for tensor 'b' after finish()"));
    return;
  }
  // The file being replaced is untouched, and an abandoned writer leaves no temporary behind.
  CHECK(read_bytes(path) == previous_bytes);
  writer = st::Writer::file(dir.file("other.safetensors"), {});
  CHECK_FALSE(std::filesystem::exists(path + ".tmp"));
}

TEST_CASE("safetensors: the streaming writer checks the declarations", "[safetensors]") {
  ferry::testing::TempDir dir;
  CHECK_THROWS_WITH(
      st::Writer::file(dir.file("x.safetensors"), {{"a", DType::kF32, {2}}, {"a", DType::kF32, {3}}}),
      Contains("tensor name 'a' appears twice"));
  CHECK_THROWS_WITH(st::Writer::checkpoint(dir.path(), {{"a", DType::kF32, {-2}}}, 64),
                    Contains("tensor 'a' has negative shape [-2]"));
  CHECK_THROWS_WITH(st::Writer::checkpoint(dir.path(), {{"__metadata__", DType::kF32, {2}}}, 64),
                    Contains("invalid tensor name '__metadata__'"));
  CHECK_THROWS_WITH(st::Writer::checkpoint(dir.path(), {}, 0),
                    Contains("max_shard_bytes must be positive"));
}
