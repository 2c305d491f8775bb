// libferry_sentencepiece: the only code that links libsentencepiece, behind a C interface that
// libferry opens with dlopen when it first reads a tokenizer.model.
//
// Note: Debian's libsentencepiece carries its own copy of protobuf and exports its symbols. Linked
// into a process that also has libprotobuf (Debian's LibTorch links it), the two copies interpose
// each other and the process crashes while the libraries initialise. Opened with RTLD_LOCAL and
// RTLD_DEEPBIND, this module and its libsentencepiece bind to their own protobuf and stay out of
// everyone else's symbol lookups.

#include <sentencepiece_processor.h>

#include <cstdint>
#include <cstring>
#include <memory>
#include <string>

#include "tokenizer/sentencepiece_shim.h"

struct ferry_spm {
  sentencepiece::SentencePieceProcessor processor;
};

namespace {

void set_error(char* error, std::size_t size, const std::string& message) {
  if (size == 0) return;
  std::strncpy(error, message.c_str(), size - 1);
  error[size - 1] = '\0';
}

}  // namespace

extern "C" {

ferry_spm* ferry_spm_load(const char* path, char* error, std::size_t error_size) {
  auto model = std::make_unique<ferry_spm>();
  const auto status = model->processor.Load(path);
  if (!status.ok()) {
    set_error(error, error_size, status.ToString());
    return nullptr;
  }
  return model.release();
}

void ferry_spm_free(ferry_spm* model) { delete model; }

int ferry_spm_encode(const ferry_spm* model, const char* text, std::size_t size, ferry_spm_token_fn on_token,
                     void* context) {
  const sentencepiece::ImmutableSentencePieceText pieces =
      model->processor.EncodeAsImmutableProto(absl::string_view(text, size));
  for (const auto& piece : pieces.pieces()) {
    on_token(context, static_cast<int>(piece.id()), piece.begin(), piece.end());
  }
  return 0;
}

int ferry_spm_decode(const ferry_spm* model, const int* ids, std::size_t count, ferry_spm_text_fn on_text,
                     void* context, char* error, std::size_t error_size) {
  std::string text;
  const auto status = model->processor.Decode(std::vector<int>(ids, ids + count), &text);
  if (!status.ok()) {
    set_error(error, error_size, status.ToString());
    return 1;
  }
  on_text(context, text.data(), text.size());
  return 0;
}

int ferry_spm_piece_size(const ferry_spm* model) { return model->processor.GetPieceSize(); }

int ferry_spm_piece_to_id(const ferry_spm* model, const char* piece, std::size_t size) {
  const std::string_view wanted(piece, size);
  const int id = model->processor.PieceToId(absl::string_view(piece, size));
  return model->processor.IdToPiece(id) == wanted ? id : -1;
}

void ferry_spm_id_to_piece(const ferry_spm* model, int id, ferry_spm_text_fn on_text, void* context) {
  const std::string& piece = model->processor.IdToPiece(id);
  on_text(context, piece.data(), piece.size());
}

void ferry_spm_special_ids(const ferry_spm* model, int* bos, int* eos, int* pad, int* unk) {
  *bos = model->processor.bos_id();
  *eos = model->processor.eos_id();
  *pad = model->processor.pad_id();
  *unk = model->processor.unk_id();
}

}  // extern "C"
