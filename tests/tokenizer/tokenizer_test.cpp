// ferry's tokenizers against the reference libraries' own output: every fixture under
// fixtures/hf was trained and recorded by Hugging Face tokenizers 0.23.2 (transformers 5.17.0 for
// the model directories), fixtures/sentencepiece by Debian's SentencePiece
// (tools/tokenizer_fixtures.py made both). ids and decoded text must equal the reference exactly.

#include <catch2/catch.hpp>

#include <fstream>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "ferry/check.h"
#include "ferry/fs.h"
#include "ferry/tokenizer.h"
#include "tokenizer/fixture_path.h"
#include "support/temp_dir.h"
#include "tokenizer/pattern.h"
#include "tokenizer/unicode.h"

namespace {

using Json = nlohmann::json;
using Catch::Matchers::Contains;

std::string fixtures() { return ferry::testing::tokenizer_fixtures(); }

Json read_json(const std::string& path) {
  std::ifstream file(path);
  REQUIRE(file.is_open());
  std::stringstream text;
  text << file.rdbuf();
  return Json::parse(text.str());
}

void write_file(const std::string& path, const std::string& text) {
  std::ofstream file(path, std::ios::binary);
  file << text;
}

std::vector<std::int64_t> ids_of(const Json& list) { return list.get<std::vector<std::int64_t>>(); }

std::string show(const std::vector<std::int64_t>& ids) {
  std::string text = "[";
  for (std::size_t i = 0; i < ids.size(); ++i) text += (i ? "," : "") + std::to_string(ids[i]);
  return text + "]";
}

std::vector<std::string> hf_fixture_names() {
  std::vector<std::string> names;
  for (const std::string& name : ferry::fs::list_directory(fixtures() + "/hf")) {
    if (ferry::fs::is_directory(fixtures() + "/hf/" + name)) names.push_back(name);
  }
  return names;
}

}  // namespace

TEST_CASE("every Hugging Face fixture encodes and decodes exactly as the reference") {
  const std::vector<std::string> names = hf_fixture_names();
  REQUIRE(names.size() >= 20);
  for (const std::string& name : names) {
    const std::string directory = fixtures() + "/hf/" + name;
    const Json reference = read_json(directory + "/reference.json");
    std::shared_ptr<const ferry::Tokenizer> tokenizer;
    REQUIRE_NOTHROW(tokenizer = ferry::load_tokenizer(directory));
    INFO("fixture " << name);
    CHECK(tokenizer->vocab_size() == reference["vocab_size"].get<std::int64_t>());
    std::size_t mismatches = 0;
    for (const Json& entry : reference["cases"]) {
      const std::string text = entry["text"].get<std::string>();
      REQUIRE_FALSE(entry.contains("error"));
      const std::vector<std::int64_t> ids = tokenizer->encode(text);
      const std::vector<std::int64_t> expected = ids_of(entry["ids"]);
      if (ids != expected) {
        ++mismatches;
        UNSCOPED_INFO("encode " << Json(text).dump() << ": ferry " << show(ids) << ", reference " << show(expected));
      }
      if (tokenizer->encode_with_special_tokens(text) != ids_of(entry["ids_with_special_tokens"])) {
        ++mismatches;
        UNSCOPED_INFO("encode with special tokens " << Json(text).dump());
      }
      const std::string decoded = tokenizer->decode(expected, false);
      if (decoded != entry["decoded"].get<std::string>()) {
        ++mismatches;
        UNSCOPED_INFO("decode " << show(expected) << ": ferry " << Json(decoded).dump() << ", reference "
                                << entry["decoded"].dump());
      }
      if (tokenizer->decode(expected, true) != entry["decoded_skipping_special"].get<std::string>()) {
        ++mismatches;
        UNSCOPED_INFO("decode skipping special tokens " << show(expected));
      }
    }
    for (const Json& entry : reference["decode_cases"]) {
      const std::vector<std::int64_t> ids = ids_of(entry["ids"]);
      const std::string decoded = tokenizer->decode(ids, false);
      if (decoded != entry["decoded"].get<std::string>() ||
          tokenizer->decode(ids, true) != entry["decoded_skipping_special"].get<std::string>()) {
        ++mismatches;
        UNSCOPED_INFO("decode " << show(ids) << ": ferry " << Json(decoded).dump() << ", reference "
                                << entry["decoded"].dump());
      }
    }
    CHECK(mismatches == 0);
  }
}

TEST_CASE("special tokens and what tokenizer(text) adds come out as transformers reads the directory") {
  for (const std::string& name : hf_fixture_names()) {
    const std::string directory = fixtures() + "/hf/" + name;
    const Json view = read_json(directory + "/reference.json")["transformers"];
    const auto tokenizer = ferry::load_tokenizer(directory);
    const ferry::TokenizerInfo& info = tokenizer->info();
    INFO("fixture " << name);
    const auto id_or_null = [](const std::optional<ferry::SpecialToken>& token) {
      return token ? Json(token->id) : Json(nullptr);
    };
    CHECK(id_or_null(info.bos) == view["bos_token_id"]);
    CHECK(id_or_null(info.eos) == view["eos_token_id"]);
    CHECK(id_or_null(info.pad) == view["pad_token_id"]);
    for (const Json& entry : view["input_ids"]) {
      std::vector<std::int64_t> ids;
      if (info.adds_bos) ids.push_back(info.bos->id);
      for (std::int64_t id : tokenizer->encode(entry["text"].get<std::string>())) ids.push_back(id);
      if (info.adds_eos) ids.push_back(info.eos->id);
      CHECK(show(ids) == show(ids_of(entry["ids"])));
    }
  }
}

TEST_CASE("token spans are ordered and, without a normalizer, cover the text exactly") {
  const auto texts = read_json(fixtures() + "/texts.json").get<std::vector<std::string>>();
  for (const std::string name : {"gpt2", "llama3", "qwen2", "llama2-legacy", "llama2-metaspace", "digits"}) {
    const auto tokenizer = ferry::load_tokenizer(fixtures() + "/hf/" + name);
    INFO("fixture " << name);
    for (const std::string& text : texts) {
      std::vector<std::int32_t> ids;
      std::vector<ferry::TokenSpan> spans;
      tokenizer->encode(text, ids, &spans);
      REQUIRE(spans.size() == ids.size());
      CHECK(std::vector<std::int64_t>(ids.begin(), ids.end()) == tokenizer->encode(text));
      const bool contiguous = std::string(name) == "gpt2" || std::string(name) == "llama3" ||
                              std::string(name) == "digits";  // byte-level, no normalizer
      std::uint32_t previous_begin = 0, previous_end = 0;
      for (const ferry::TokenSpan& span : spans) {
        CHECK(span.begin <= span.end);
        CHECK(span.end <= text.size());
        CHECK(span.begin >= previous_begin);
        if (contiguous) CHECK(span.begin == previous_end);
        previous_begin = span.begin;
        previous_end = span.end;
      }
      if (std::string(name) == "gpt2" || std::string(name) == "llama3") CHECK(previous_end == text.size());
    }
  }
}

TEST_CASE("spans follow normalization back to the original text") {
  const auto tokenizer = ferry::load_tokenizer(fixtures() + "/hf/llama2-legacy");
  // Prepend("▁") and Replace(" ", "▁"): each ▁ stands where a space (or the start) was.
  const std::string text = "Hi there friend";
  std::vector<std::int32_t> ids;
  std::vector<ferry::TokenSpan> spans;
  tokenizer->encode(text, ids, &spans);
  REQUIRE(!spans.empty());
  CHECK(spans.front().begin == 0);
  CHECK(spans.back().end == text.size());
  std::string rebuilt;
  for (const ferry::TokenSpan& span : spans) rebuilt += text.substr(span.begin, span.end - span.begin);
  CHECK(rebuilt == text);
}

TEST_CASE("the SentencePiece fixture encodes and decodes as Debian's python3-sentencepiece") {
  const Json reference = read_json(fixtures() + "/sentencepiece/reference.json");
  const auto tokenizer = ferry::load_tokenizer(fixtures() + "/sentencepiece");
  CHECK(tokenizer->kind() == "tokenizer.model (SentencePiece)");
  CHECK(tokenizer->vocab_size() == reference["vocab_size"].get<std::int64_t>());
  CHECK(tokenizer->info().bos->id == reference["bos_id"].get<std::int64_t>());
  CHECK(tokenizer->info().eos->id == reference["eos_id"].get<std::int64_t>());
  CHECK_FALSE(tokenizer->info().pad.has_value());
  CHECK(tokenizer->info().adds_bos);
  for (const Json& entry : reference["cases"]) {
    const std::string text = entry["text"].get<std::string>();
    INFO(Json(text).dump());
    CHECK(show(tokenizer->encode(text)) == show(ids_of(entry["ids"])));
    CHECK(tokenizer->decode(ids_of(entry["ids"])) == entry["decoded"].get<std::string>());
    std::vector<std::int32_t> ids;
    std::vector<ferry::TokenSpan> spans;
    tokenizer->encode(text, ids, &spans);
    CHECK(spans.size() == ids.size());
  }
  for (const Json& entry : reference["decode_cases"]) {
    CHECK(tokenizer->decode(ids_of(entry["ids"])) == entry["decoded"].get<std::string>());
  }
  // A tokenizer.model given as a file reads the same.
  CHECK(ferry::load_tokenizer(fixtures() + "/sentencepiece/tokenizer.model")->encode("Hello world") ==
        tokenizer->encode("Hello world"));
}

TEST_CASE("encode_batch gives what encode gives, text by text") {
  const auto tokenizer = ferry::load_tokenizer(fixtures() + "/hf/qwen2");
  const auto texts = read_json(fixtures() + "/texts.json").get<std::vector<std::string>>();
  std::vector<std::string_view> views;
  for (int repeat = 0; repeat < 20; ++repeat) {
    for (const std::string& text : texts) views.push_back(text);
  }
  const auto batch = ferry::encode_batch(*tokenizer, views);
  REQUIRE(batch.size() == views.size());
  for (std::size_t i = 0; i < views.size(); ++i) {
    CHECK(std::vector<std::int64_t>(batch[i].begin(), batch[i].end()) == tokenizer->encode(views[i]));
  }
}

TEST_CASE("the byte tokenizer has data::ByteTokenizer's ids and reads its special tokens in text") {
  const auto tokenizer = ferry::byte_tokenizer();
  CHECK(tokenizer->vocab_size() == 259);
  CHECK(tokenizer->encode("hi") == std::vector<std::int64_t>{'h', 'i'});
  CHECK(tokenizer->encode("<s>a</s><pad><x") == std::vector<std::int64_t>{256, 'a', 257, 258, '<', 'x'});
  CHECK(tokenizer->decode({256, 'o', 'k', 257}) == "<s>ok</s>");
  CHECK(tokenizer->decode({256, 'o', 'k', 257}, true) == "ok");
  CHECK(tokenizer->info().bos->id == 256);
  CHECK(tokenizer->info().eos->id == 257);
  CHECK(tokenizer->info().pad->id == 258);
  CHECK(tokenizer->encode_with_special_tokens("a") == std::vector<std::int64_t>{256, 'a'});
}

TEST_CASE("tokenizer errors name the file, the value and what is valid") {
  ferry::testing::TempDir dir;
  CHECK_THROWS_WITH(ferry::load_tokenizer(dir.path()),
                    Contains("no tokenizer in") && Contains("tokenizer.json") && Contains("tokenizer.model"));
  const auto tokenizer = ferry::load_tokenizer(fixtures() + "/hf/gpt2");
  CHECK_THROWS_WITH(tokenizer->encode(std::string("ok\xff") + "x"), Contains("not valid UTF-8") && Contains("byte 2"));
  CHECK(tokenizer->decode({1, 100000, -3}) == tokenizer->decode({1}));  // as the reference: skipped

  Json json = read_json(fixtures() + "/hf/gpt2/tokenizer.json");
  json["normalizer"] = {{"type", "Precompiled"}, {"precompiled_charsmap", ""}};
  write_file(dir.file("tokenizer.json"), json.dump());
  CHECK_THROWS_WITH(ferry::load_tokenizer(dir.path()),
                    Contains("normalizer type 'Precompiled' is not supported") && Contains("NFC") && Contains("tokenizer.json"));
  json = read_json(fixtures() + "/hf/gpt2/tokenizer.json");
  json["model"]["type"] = "Unigram";
  write_file(dir.file("tokenizer.json"), json.dump());
  CHECK_THROWS_WITH(ferry::load_tokenizer(dir.path()), Contains("model type 'Unigram'") && Contains("supported: BPE"));
  json = read_json(fixtures() + "/hf/gpt2/tokenizer.json");
  write_file(dir.file("tokenizer.json"), json.dump());
  write_file(dir.file("tokenizer_config.json"), R"({"eos_token": "<|nowhere|>"})");
  CHECK_THROWS_WITH(ferry::load_tokenizer(dir.path()),
                    Contains("tokenizer_config.json names eos_token '<|nowhere|>'") && Contains("not in the vocabulary"));
}

TEST_CASE("regexes match Oniguruma's whitespace, U+0085 and U+00A0 included") {
  using ferry::tokenizer::Pattern;
  std::vector<ferry::tokenizer::Match> matches;
  Pattern::regex(R"(\s+)").find_all("a\xC2\x85\xC2\xA0" "b\t\xE3\x80\x80" "c", matches);
  REQUIRE(matches.size() == 2);
  CHECK(matches[0] == ferry::tokenizer::Match{1, 5});
  CHECK(matches[1] == ferry::tokenizer::Match{6, 10});
  matches.clear();
  Pattern::regex(R"([^\s\p{L}]+)").find_all("ab 12\xC2\xA0!", matches);
  CHECK(matches == std::vector<ferry::tokenizer::Match>{{3, 5}, {7, 8}});
  CHECK_THROWS_WITH(Pattern::regex("(unclosed"), Contains("cannot compile the regex '(unclosed'") && Contains("offset"));
}

TEST_CASE("lossy UTF-8 decoding replaces each maximal ill-formed subsequence once, as Rust does") {
  using ferry::tokenizer::from_utf8_lossy;
  const std::string replacement = "\xEF\xBF\xBD";
  CHECK(from_utf8_lossy("a\xE2\x82" "b") == "a" + replacement + "b");
  CHECK(from_utf8_lossy("\xC0\x80") == replacement + replacement);
  CHECK(from_utf8_lossy("\xED\xA0\x80") == replacement + replacement + replacement);
  CHECK(from_utf8_lossy("\xF0\x9F\x98") == replacement);
  CHECK(from_utf8_lossy("ok \xF0\x9F\x98\x80") == "ok \xF0\x9F\x98\x80");
}
