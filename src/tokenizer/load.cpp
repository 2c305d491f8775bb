// load_tokenizer: which file of a directory is the tokenizer, and what the files beside it say
// about its special tokens, as transformers reads them.

#include <fstream>
#include <sstream>

#include <nlohmann/json.hpp>
#include <tbb/parallel_for.h>

#include "ferry/check.h"
#include "ferry/fs.h"
#include "ferry/tokenizer.h"
#include "tokenizer/hf_tokenizer.h"
#include "tokenizer/sentencepiece_tokenizer.h"

namespace ferry {
namespace {

using Json = nlohmann::json;

bool ends_with(const std::string& text, const std::string& suffix) {
  return text.size() >= suffix.size() && text.compare(text.size() - suffix.size(), suffix.size(), suffix) == 0;
}

std::string read_text(const std::string& path) {
  std::ifstream file(path, std::ios::binary);
  FERRY_CHECK(file.is_open(), "cannot open ", path);
  std::stringstream text;
  text << file.rdbuf();
  return text.str();
}

// The file's JSON object, or an empty one when there is no such file.
Json read_optional_json(const std::string& path, std::vector<std::string>& files) {
  if (!fs::exists(path)) return Json::object();
  Json json = Json::parse(read_text(path), nullptr, /*allow_exceptions=*/false);
  FERRY_CHECK(!json.is_discarded() && json.is_object(), path, " is not a JSON object");
  files.push_back(path);
  return json;
}

// A special token as tokenizer_config.json and special_tokens_map.json write it: a string, or an
// AddedToken object {"content": ...}.
std::optional<std::string> token_text(const Json& file, const char* key, const std::string& path) {
  auto found = file.find(key);
  if (found == file.end() || found->is_null()) return std::nullopt;
  if (found->is_string()) return found->get<std::string>();
  FERRY_CHECK(found->is_object() && found->contains("content") && found->at("content").is_string(), path, ": ", key,
              " must be a string or an object with a \"content\" string, got ", found->dump());
  return found->at("content").get<std::string>();
}

// An id field of config.json or generation_config.json: one id or a list (the first counts).
std::optional<std::int64_t> first_id(const Json& file, const char* key) {
  auto found = file.find(key);
  if (found == file.end()) return std::nullopt;
  if (found->is_number_integer()) return found->get<std::int64_t>();
  if (found->is_array() && !found->empty() && found->at(0).is_number_integer()) return found->at(0).get<std::int64_t>();
  return std::nullopt;
}

std::vector<std::int64_t> all_ids(const Json& file, const char* key) {
  std::vector<std::int64_t> ids;
  auto found = file.find(key);
  if (found == file.end()) return ids;
  if (found->is_number_integer()) ids.push_back(found->get<std::int64_t>());
  if (found->is_array()) {
    for (const Json& id : *found) {
      if (id.is_number_integer()) ids.push_back(id.get<std::int64_t>());
    }
  }
  return ids;
}

struct SideFiles {
  std::string directory;
  Json tokenizer_config, special_tokens_map, generation_config, model_config;
};

std::optional<SpecialToken> resolve_special(const Tokenizer& tokenizer, const SideFiles& side, const char* name,
                                            int model_default) {
  const std::string key = std::string(name) + "_token";
  const std::string config_path = side.directory + "/tokenizer_config.json";
  const std::string map_path = side.directory + "/special_tokens_map.json";
  std::optional<std::string> text = token_text(side.tokenizer_config, key.c_str(), config_path);
  std::string named_in = config_path;
  if (!text) {
    text = token_text(side.special_tokens_map, key.c_str(), map_path);
    named_in = map_path;
  }
  if (text) {
    const std::optional<std::int64_t> id = tokenizer.token_to_id(*text);
    FERRY_CHECK(id.has_value(), named_in, " names ", key, " '", *text, "', which is not in the vocabulary of ",
                tokenizer.kind(), ": fix the file, or use a tokenizer that has the token");
    return SpecialToken{*text, *id};
  }
  const std::string id_key = key + "_id";
  std::optional<std::int64_t> id = first_id(side.model_config, id_key.c_str());
  if (!id) id = first_id(side.generation_config, id_key.c_str());
  if (!id && model_default >= 0) id = model_default;
  if (!id || *id < 0 || *id >= tokenizer.vocab_size()) return std::nullopt;
  return SpecialToken{tokenizer.id_to_token(*id), *id};
}

std::optional<std::string> read_chat_template(const SideFiles& side, std::vector<std::string>& files) {
  const std::string jinja = side.directory + "/chat_template.jinja";
  if (fs::exists(jinja)) {
    files.push_back(jinja);
    return read_text(jinja);
  }
  auto found = side.tokenizer_config.find("chat_template");
  if (found == side.tokenizer_config.end() || found->is_null()) return std::nullopt;
  if (found->is_string()) return found->get<std::string>();
  // A list of named templates: the one named "default", else the first.
  FERRY_CHECK(found->is_array() && !found->empty(), side.directory,
              "/tokenizer_config.json: chat_template must be a string or a list of {\"name\", \"template\"}");
  for (const Json& entry : *found) {
    if (entry.value("name", "") == "default") return entry.at("template").get<std::string>();
  }
  return found->at(0).at("template").get<std::string>();
}

TokenizerInfo read_info(const Tokenizer& tokenizer, const std::string& directory, std::vector<std::string> files,
                        const tokenizer::SentencePieceIds& model_ids) {
  SideFiles side;
  side.directory = directory;
  side.tokenizer_config = read_optional_json(directory + "/tokenizer_config.json", files);
  side.special_tokens_map = read_optional_json(directory + "/special_tokens_map.json", files);
  side.generation_config = read_optional_json(directory + "/generation_config.json", files);
  side.model_config = read_optional_json(directory + "/config.json", files);

  TokenizerInfo info;
  info.bos = resolve_special(tokenizer, side, "bos", model_ids.bos);
  info.eos = resolve_special(tokenizer, side, "eos", model_ids.eos);
  info.pad = resolve_special(tokenizer, side, "pad", model_ids.pad);
  info.unk = resolve_special(tokenizer, side, "unk", model_ids.unk);

  // What tokenizer(text) adds: tokenizer.json's post-processor (SentencePiece: Llama's default of
  // BOS only), unless tokenizer_config.json says otherwise.
  const std::vector<std::int64_t> framed = tokenizer.encode_with_special_tokens("");
  const bool sentencepiece = model_ids.bos >= 0 || model_ids.eos >= 0;
  info.adds_bos = info.bos && (sentencepiece || (!framed.empty() && framed.front() == info.bos->id));
  info.adds_eos = info.eos && !sentencepiece && !framed.empty() && framed.back() == info.eos->id;
  if (side.tokenizer_config.contains("add_bos_token") && side.tokenizer_config["add_bos_token"].is_boolean()) {
    info.adds_bos = info.bos && side.tokenizer_config["add_bos_token"].get<bool>();
  }
  if (side.tokenizer_config.contains("add_eos_token") && side.tokenizer_config["add_eos_token"].is_boolean()) {
    info.adds_eos = info.eos && side.tokenizer_config["add_eos_token"].get<bool>();
  }

  info.stop_ids = all_ids(side.generation_config, "eos_token_id");
  if (info.stop_ids.empty() && info.eos) info.stop_ids.push_back(info.eos->id);
  info.chat_template = read_chat_template(side, files);
  auto max_length = side.tokenizer_config.find("model_max_length");
  // transformers writes a huge number (1e30) for "no limit".
  if (max_length != side.tokenizer_config.end() && max_length->is_number() && max_length->get<double>() < 1e15) {
    info.model_max_length = static_cast<std::int64_t>(max_length->get<double>());
  }
  info.files = std::move(files);
  return info;
}

}  // namespace

const std::vector<std::string>& tokenizer_file_names() {
  static const std::vector<std::string> names = {
      "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
      "chat_template.jinja", "added_tokens.json", "vocab.json", "merges.txt"};
  return names;
}

bool has_tokenizer(const std::string& directory) {
  return fs::exists(directory + "/tokenizer.json") || fs::exists(directory + "/tokenizer.model");
}

std::shared_ptr<const Tokenizer> load_tokenizer(const std::string& path) {
  std::string file = path;
  if (fs::is_directory(path)) {
    file = fs::exists(path + "/tokenizer.json") ? path + "/tokenizer.json" : path + "/tokenizer.model";
    FERRY_CHECK(fs::exists(file), "no tokenizer in ", path, ": looked for ", path, "/tokenizer.json and ", path,
                "/tokenizer.model; give a directory (or file) that holds one");
  } else {
    FERRY_CHECK(fs::exists(path), "tokenizer ", path, " does not exist: give a model directory, a tokenizer.json or ",
                "a tokenizer.model");
    FERRY_CHECK(ends_with(path, ".json") || ends_with(path, ".model"), "cannot tell what tokenizer ", path,
                " is: give a model directory, a Hugging Face tokenizer.json or a SentencePiece .model file");
  }
  tokenizer::SentencePieceIds model_ids;
  std::unique_ptr<Tokenizer> tokenizer = ends_with(file, ".json") ? tokenizer::read_tokenizer_json(file)
                                                                   : tokenizer::read_sentencepiece(file, &model_ids);
  tokenizer->set_info(read_info(*tokenizer, fs::parent_directory(file), {file}, model_ids));
  return std::shared_ptr<const Tokenizer>(std::move(tokenizer));
}

std::vector<std::int64_t> Tokenizer::encode(std::string_view text) const {
  std::vector<std::int32_t> ids;
  encode(text, ids, nullptr);
  return std::vector<std::int64_t>(ids.begin(), ids.end());
}

std::vector<std::int64_t> Tokenizer::encode_with_special_tokens(std::string_view text) const {
  std::vector<std::int64_t> ids;
  if (info().adds_bos) ids.push_back(info().bos->id);
  for (std::int64_t id : encode(text)) ids.push_back(id);
  if (info().adds_eos) ids.push_back(info().eos->id);
  return ids;
}

std::vector<std::vector<std::int32_t>> encode_batch(const Tokenizer& tokenizer, const std::vector<std::string_view>& texts) {
  std::vector<std::vector<std::int32_t>> ids(texts.size());
  tbb::parallel_for(tbb::blocked_range<std::size_t>(0, texts.size(), 16), [&](const tbb::blocked_range<std::size_t>& range) {
    for (std::size_t i = range.begin(); i != range.end(); ++i) tokenizer.encode(texts[i], ids[i], nullptr);
  });
  return ids;
}

}  // namespace ferry
