#include "tokenizer/sentencepiece_tokenizer.h"

#include <dlfcn.h>

#include "ferry/check.h"
#include "ferry/fs.h"
#include "tokenizer/sentencepiece_shim.h"
#include "tokenizer/unicode.h"

namespace ferry::tokenizer {
namespace {

constexpr const char* kShimName = "libferry_sentencepiece.so";

// libferry_sentencepiece's functions, from the copy next to libferry itself (sentencepiece_shim.cpp
// says why it is opened at run time and not linked).
struct Shim {
  decltype(&ferry_spm_load) load;
  decltype(&ferry_spm_free) free;
  decltype(&ferry_spm_encode) encode;
  decltype(&ferry_spm_decode) decode;
  decltype(&ferry_spm_piece_size) piece_size;
  decltype(&ferry_spm_piece_to_id) piece_to_id;
  decltype(&ferry_spm_id_to_piece) id_to_piece;
  decltype(&ferry_spm_special_ids) special_ids;
};

std::string shim_path() {
  Dl_info info{};
  FERRY_ASSERT(dladdr(reinterpret_cast<void*>(&shim_path), &info) != 0 && info.dli_fname != nullptr,
               "dladdr cannot name the library holding ferry's tokenizer");
  return fs::parent_directory(info.dli_fname) + "/" + kShimName;
}

template <typename Function>
void bind(void* handle, const char* name, Function& function, const std::string& path) {
  function = reinterpret_cast<Function>(dlsym(handle, name));
  FERRY_CHECK(function != nullptr, path, " lacks ", name, ": it is not the ferry_sentencepiece this ferry was built with");
}

const Shim& shim() {
  static const Shim functions = [] {
    const std::string path = shim_path();
    void* handle = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL | RTLD_DEEPBIND);
    FERRY_CHECK(handle != nullptr, "cannot load ", path, ", which reads tokenizer.model files through SentencePiece: ",
                dlerror(), " (it is built with ferry, target ferry_sentencepiece, and installed beside libferry)");
    Shim bound{};
    bind(handle, "ferry_spm_load", bound.load, path);
    bind(handle, "ferry_spm_free", bound.free, path);
    bind(handle, "ferry_spm_encode", bound.encode, path);
    bind(handle, "ferry_spm_decode", bound.decode, path);
    bind(handle, "ferry_spm_piece_size", bound.piece_size, path);
    bind(handle, "ferry_spm_piece_to_id", bound.piece_to_id, path);
    bind(handle, "ferry_spm_id_to_piece", bound.id_to_piece, path);
    bind(handle, "ferry_spm_special_ids", bound.special_ids, path);
    return bound;
  }();
  return functions;
}

void append_text(void* context, const char* text, std::size_t size) {
  static_cast<std::string*>(context)->append(text, size);
}

struct EncodeTarget {
  std::vector<std::int32_t>* ids;
  std::vector<TokenSpan>* spans;
};

void append_token(void* context, int id, std::uint32_t begin, std::uint32_t end) {
  auto* target = static_cast<EncodeTarget*>(context);
  target->ids->push_back(id);
  if (target->spans != nullptr) target->spans->push_back({begin, end});
}

// A tokenizer.model through the SentencePiece library itself: ids and text are what its encode
// and decode give. SentencePiece's encode and decode are safe to call from several threads.
class SentencePieceTokenizer final : public Tokenizer {
 public:
  explicit SentencePieceTokenizer(const std::string& path) : path_(path) {
    char error[512] = "";
    model_ = shim().load(path.c_str(), error, sizeof error);
    FERRY_CHECK(model_ != nullptr, "cannot read the SentencePiece model ", path, ": ", error);
    size_ = shim().piece_size(model_);
  }
  ~SentencePieceTokenizer() override { shim().free(model_); }
  SentencePieceTokenizer(const SentencePieceTokenizer&) = delete;
  SentencePieceTokenizer& operator=(const SentencePieceTokenizer&) = delete;

  void encode(std::string_view text, std::vector<std::int32_t>& ids, std::vector<TokenSpan>* spans) const override {
    const std::size_t invalid = first_invalid_utf8(text);
    FERRY_CHECK(invalid == text.size(), "cannot tokenize text that is not valid UTF-8: byte ", invalid, " of ",
                text.size(), " starts no UTF-8 character");
    EncodeTarget target{&ids, spans};
    shim().encode(model_, text.data(), text.size(), append_token, &target);
  }

  std::string decode(const std::vector<std::int64_t>& ids, bool skip_special_tokens) const override {
    std::vector<int> pieces;
    pieces.reserve(ids.size());
    for (std::int64_t id : ids) {
      FERRY_CHECK(id >= 0 && id < size_, "cannot decode token id ", id, ": ", path_, " has ids 0 to ", size_ - 1);
      pieces.push_back(static_cast<int>(id));
    }
    std::string text;
    char error[512] = "";
    FERRY_CHECK(shim().decode(model_, pieces.data(), pieces.size(), append_text, &text, error, sizeof error) == 0,
                "SentencePiece (", path_, ") cannot decode: ", error);
    return text;
  }

  std::int64_t vocab_size() const override { return size_; }

  std::optional<std::int64_t> token_to_id(std::string_view token) const override {
    const int id = shim().piece_to_id(model_, token.data(), token.size());
    if (id < 0) return std::nullopt;
    return id;
  }

  std::string id_to_token(std::int64_t id) const override {
    FERRY_CHECK(id >= 0 && id < size_, "token id ", id, " is outside ", path_, "'s vocabulary: valid are 0 to ",
                size_ - 1);
    std::string piece;
    shim().id_to_piece(model_, static_cast<int>(id), append_text, &piece);
    return piece;
  }

  std::string kind() const override { return "tokenizer.model (SentencePiece)"; }

  SentencePieceIds ids() const {
    SentencePieceIds ids;
    shim().special_ids(model_, &ids.bos, &ids.eos, &ids.pad, &ids.unk);
    return ids;
  }

 private:
  std::string path_;
  ferry_spm* model_ = nullptr;
  std::int64_t size_ = 0;
};

}  // namespace

std::unique_ptr<Tokenizer> read_sentencepiece(const std::string& path, SentencePieceIds* ids) {
  auto tokenizer = std::make_unique<SentencePieceTokenizer>(path);
  *ids = tokenizer->ids();
  return tokenizer;
}

}  // namespace ferry::tokenizer
