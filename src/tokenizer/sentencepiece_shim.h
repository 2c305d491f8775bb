#pragma once

// The C interface of libferry_sentencepiece (sentencepiece_shim.cpp), which libferry opens at run
// time. Plain C types only, so nothing of either side's C++ crosses it.

#include <cstddef>
#include <cstdint>

extern "C" {

struct ferry_spm;
using ferry_spm_token_fn = void (*)(void* context, int id, std::uint32_t begin, std::uint32_t end);
using ferry_spm_text_fn = void (*)(void* context, const char* text, std::size_t size);

// Null on failure, with SentencePiece's message in error.
ferry_spm* ferry_spm_load(const char* path, char* error, std::size_t error_size);
void ferry_spm_free(ferry_spm* model);
// Calls on_token for each piece of SentencePiece's encode(text), with its byte span.
int ferry_spm_encode(const ferry_spm* model, const char* text, std::size_t size, ferry_spm_token_fn on_token,
                     void* context);
// SentencePiece's decode(ids); nonzero on failure, with the message in error.
int ferry_spm_decode(const ferry_spm* model, const int* ids, std::size_t count, ferry_spm_text_fn on_text,
                     void* context, char* error, std::size_t error_size);
int ferry_spm_piece_size(const ferry_spm* model);
// -1 when the piece is not in the vocabulary.
int ferry_spm_piece_to_id(const ferry_spm* model, const char* piece, std::size_t size);
void ferry_spm_id_to_piece(const ferry_spm* model, int id, ferry_spm_text_fn on_text, void* context);
void ferry_spm_special_ids(const ferry_spm* model, int* bos, int* eos, int* pad, int* unk);

}  // extern "C"
