#include "support/catch.h"

#include <cstdint>
#include <fstream>
#include <string>
#include <vector>

#include "ferry/check.h"
#include "ferry/data.h"
#include "support/temp_dir.h"

namespace {

using ferry::data::ByteTokenizer;
using ferry::data::Example;
using Catch::Matchers::Contains;

void write_file(const std::string& path, const std::string& bytes) {
  std::ofstream file(path, std::ios::binary);
  file << bytes;
}

std::string little_endian(const std::vector<uint32_t>& tokens, int bytes_per_token) {
  std::string bytes;
  for (uint32_t token : tokens) {
    for (int i = 0; i < bytes_per_token; ++i) {
      bytes.push_back(static_cast<char>((token >> (8 * i)) & 0xff));
    }
  }
  return bytes;
}

std::vector<int64_t> bytes_of(const std::string& text) {
  return ByteTokenizer().encode(text);
}

std::vector<int64_t> joined(std::vector<std::vector<int64_t>> parts) {
  std::vector<int64_t> all;
  for (const auto& part : parts) {
    all.insert(all.end(), part.begin(), part.end());
  }
  return all;
}

constexpr int64_t kBos = ByteTokenizer::kBos;
constexpr int64_t kEos = ByteTokenizer::kEos;

}  // namespace

TEST_CASE("byte tokenizer round-trips every byte and drops special tokens") {
  ByteTokenizer tokenizer;
  std::string text = "h\xc3\xa9llo\n";
  text.push_back('\0');
  text.push_back('\xff');
  std::vector<int64_t> ids = tokenizer.encode(text);
  CHECK(ids == std::vector<int64_t>{'h', 0xc3, 0xa9, 'l', 'l', 'o', '\n', 0, 255});
  CHECK(tokenizer.decode(ids) == text);
  CHECK(tokenizer.decode({kBos, 'o', 'k', kEos, ByteTokenizer::kPad}) == "ok");
  CHECK_THROWS_WITH(tokenizer.decode({'a', 259}), Contains("259") && Contains("0 to 258"));
  CHECK_THROWS_WITH(tokenizer.decode({-1}), Contains("-1"));
}

TEST_CASE("byte tokenizer marks BOS and the prompt as the prompt tokens") {
  ByteTokenizer tokenizer;
  Example document = tokenizer.encode_document("ab");
  CHECK(document.tokens == std::vector<int64_t>{kBos, 'a', 'b', kEos});
  CHECK(document.prompt_tokens == 0);
  Example pair = tokenizer.encode_prompt_completion("1+2=", "3");
  CHECK(pair.tokens == std::vector<int64_t>{kBos, '1', '+', '2', '=', '3', kEos});
  CHECK(pair.prompt_tokens == 5);
}

TEST_CASE("token files are cut into windows of uint16 or uint32 tokens") {
  ferry::testing::TempDir dir;
  write_file(dir.file("tokens.bin"), little_endian({1, 2, 3, 4, 5, 6, 7, 8, 9, 65535}, 2));
  auto uint16_tokens = ferry::data::open_token_file(dir.file("tokens.bin"), 4);
  REQUIRE(uint16_tokens->size() == 3);
  CHECK(uint16_tokens->get(0).tokens == std::vector<int64_t>{1, 2, 3, 4});
  CHECK(uint16_tokens->get(1).tokens == std::vector<int64_t>{5, 6, 7, 8});
  CHECK(uint16_tokens->get(2).tokens == std::vector<int64_t>{9, 65535});
  CHECK(uint16_tokens->get(2).prompt_tokens == 0);
  CHECK(uint16_tokens->name() == dir.file("tokens.bin"));
  CHECK_THROWS_WITH(uint16_tokens->get(3), Contains("example index 3") && Contains("0 to 2"));

  write_file(dir.file("tokens.u32.bin"), little_endian({70000, 1, 4294967295u}, 4));
  auto uint32_tokens = ferry::data::open_token_file(dir.file("tokens.u32.bin"), 2);
  REQUIRE(uint32_tokens->size() == 2);
  CHECK(uint32_tokens->get(0).tokens == std::vector<int64_t>{70000, 1});
  CHECK(uint32_tokens->get(1).tokens == std::vector<int64_t>{4294967295});

  auto explicit_dtype = ferry::data::open_token_file(dir.file("tokens.bin"), 5,
                                                     ferry::data::TokenDtype::kUint32);
  REQUIRE(explicit_dtype->size() == 1);
  CHECK(explicit_dtype->get(0).tokens.front() == (2 << 16 | 1));
}

TEST_CASE("token dtype follows the file name") {
  using ferry::data::TokenDtype;
  CHECK(ferry::data::token_dtype_from_path("a/train.bin") == TokenDtype::kUint16);
  CHECK(ferry::data::token_dtype_from_path("train.u32.bin") == TokenDtype::kUint32);
  CHECK(ferry::data::token_dtype_from_path("train.uint32.bin") == TokenDtype::kUint32);
  CHECK_THROWS_WITH(ferry::data::token_dtype_from_path("train.txt"),
                    Contains("train.txt") && Contains(".u32.bin"));
}

TEST_CASE("bad token files name the file and the problem") {
  ferry::testing::TempDir dir;
  CHECK_THROWS_WITH(ferry::data::open_token_file(dir.file("missing.bin"), 4),
                    Contains("missing.bin") && Contains("No such file"));
  write_file(dir.file("odd.bin"), std::string(7, '\1'));
  CHECK_THROWS_WITH(ferry::data::open_token_file(dir.file("odd.bin"), 4),
                    Contains("odd.bin") && Contains("7 bytes") && Contains("multiple of 2"));
  write_file(dir.file("six.u32.bin"), std::string(6, '\1'));
  CHECK_THROWS_WITH(ferry::data::open_token_file(dir.file("six.u32.bin"), 4),
                    Contains("multiple of 4") && Contains("uint32"));
  CHECK_THROWS_WITH(ferry::data::open_token_file(dir.file("odd.bin"), 0),
                    Contains("example_tokens") && Contains("at least 1"));
  CHECK_THROWS_WITH(ferry::data::open_token_file(dir.subdir("folder.bin"), 4),
                    Contains("folder.bin is not a regular file"));
  write_file(dir.file("empty.bin"), "");
  CHECK(ferry::data::open_token_file(dir.file("empty.bin"), 4)->size() == 0);
}

TEST_CASE("JSON Lines hold documents and prompt-completion pairs") {
  ferry::testing::TempDir dir;
  write_file(dir.file("data.jsonl"),
             "{\"text\": \"hi\"}\n"
             "\n"
             "{\"prompt\": \"2+2=\", \"completion\": \"4\", \"id\": 7}\n"
             "{\"text\": \"\\u00e9\"}");
  auto dataset = ferry::data::open_jsonl(dir.file("data.jsonl"));
  REQUIRE(dataset->size() == 3);
  CHECK(dataset->get(0).tokens == std::vector<int64_t>{kBos, 'h', 'i', kEos});
  CHECK(dataset->get(0).prompt_tokens == 0);
  CHECK(dataset->get(1).tokens == joined({{kBos}, bytes_of("2+2=4"), {kEos}}));
  CHECK(dataset->get(1).prompt_tokens == 5);
  CHECK(dataset->get(2).tokens == std::vector<int64_t>{kBos, 0xc3, 0xa9, kEos});
}

TEST_CASE("bad JSON Lines name the file, the line and the field") {
  ferry::testing::TempDir dir;
  auto open_lines = [&](const std::string& lines) {
    write_file(dir.file("bad.jsonl"), lines);
    return ferry::data::open_jsonl(dir.file("bad.jsonl"));
  };
  CHECK_THROWS_WITH(open_lines("{\"text\": \"a\"}\n\n{\"text\": \"b\"\n"),
                    Contains("bad.jsonl:3") && Contains("not valid JSON"));
  CHECK_THROWS_WITH(open_lines("{\"text\": \"a\"}\n{\"prompt\": \"b\"}\n"),
                    Contains("bad.jsonl:2") && Contains("missing field \"completion\""));
  CHECK_THROWS_WITH(open_lines("{\"completion\": \"b\"}\n"),
                    Contains("bad.jsonl:1") && Contains("missing field \"prompt\""));
  CHECK_THROWS_WITH(open_lines("{\"content\": \"b\"}\n"),
                    Contains("bad.jsonl:1") && Contains("missing field \"text\""));
  CHECK_THROWS_WITH(open_lines("{\"text\": 5}\n"),
                    Contains("bad.jsonl:1") && Contains("\"text\" is a number"));
  CHECK_THROWS_WITH(open_lines("[\"text\"]\n"),
                    Contains("bad.jsonl:1") && Contains("JSON object"));
  CHECK_THROWS_WITH(open_lines("{\"text\": \"a\", \"prompt\": \"b\"}\n"),
                    Contains("bad.jsonl:1") && Contains("one or the other"));
  CHECK_THROWS_WITH(ferry::data::open_jsonl(dir.file("missing.jsonl")),
                    Contains("missing.jsonl") && Contains("No such file"));
}

TEST_CASE("plain text splits into documents at blank lines") {
  ferry::testing::TempDir dir;
  write_file(dir.file("book.txt"), "\nfirst line\nsecond\n \n\n\t\nthird");
  auto dataset = ferry::data::open_text(dir.file("book.txt"));
  REQUIRE(dataset->size() == 2);
  CHECK(dataset->get(0).tokens == joined({{kBos}, bytes_of("first line\nsecond"), {kEos}}));
  CHECK(dataset->get(1).tokens == joined({{kBos}, bytes_of("third"), {kEos}}));
}

TEST_CASE("open_dataset chooses the source by extension") {
  ferry::testing::TempDir dir;
  write_file(dir.file("a.bin"), little_endian({1, 2, 3}, 2));
  write_file(dir.file("a.jsonl"), "{\"text\": \"x\"}\n");
  write_file(dir.file("a.md"), "x\n\ny\n");
  CHECK(ferry::data::open_dataset(dir.file("a.bin"), 2)->size() == 2);
  CHECK(ferry::data::open_dataset(dir.file("a.jsonl"), 2)->get(0).tokens ==
        std::vector<int64_t>{kBos, 'x', kEos});
  CHECK(ferry::data::open_dataset(dir.file("a.md"), 2)->size() == 2);
}

TEST_CASE("in-memory datasets reject empty examples and bad prompt lengths") {
  CHECK_THROWS_WITH(ferry::data::make_dataset("mine", {{{1, 2}, 0}, {{}, 0}}),
                    Contains("example 1 of mine has no tokens"));
  CHECK_THROWS_WITH(ferry::data::make_dataset("mine", {{{1, 2}, 3}}),
                    Contains("prompt_tokens 3") && Contains("0 to its 2 tokens"));
  CHECK_THROWS_WITH(ferry::data::make_dataset("mine", {{{1}, 0}})->get(-1),
                    Contains("example index -1 of mine") && Contains("0 to 0"));
}

TEST_CASE("in-memory datasets with a vocabulary refuse ids outside it, naming the example") {
  const auto dataset = ferry::data::make_dataset("mine", {{{0, 8}, 1, {}}}, 9);
  CHECK(dataset->get(0).tokens == std::vector<int64_t>{0, 8});
  CHECK_THROWS_WITH(ferry::data::make_dataset("mine", {{{1, 2}, 0, {}}, {{3, 9}, 0, {}}}, 9),
                    Contains("token id 9 at position 1 of example 1 of mine") &&
                        Contains("valid ids are 0 to 8 (vocab_size 9)"));
}
