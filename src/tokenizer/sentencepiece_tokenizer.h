#pragma once

// A tokenizer.model, read through libsentencepiece.

#include <memory>
#include <string>

#include "ferry/tokenizer.h"

namespace ferry::tokenizer {

// The model's own special ids; -1 where it has none.
struct SentencePieceIds {
  int bos = -1, eos = -1, pad = -1, unk = -1;
};

// Throws ferry::Error naming the file when SentencePiece cannot read it.
std::unique_ptr<Tokenizer> read_sentencepiece(const std::string& path, SentencePieceIds* ids);

}  // namespace ferry::tokenizer
