"""Batches are checked where they enter the C++ engine: every error names the tensor and what is
wrong with it (dtype, shape, or the first bad value and its place) and what would be valid."""

from __future__ import annotations

import re
from typing import Dict

import pytest
import torch
from torch import nn

import ferry

VOCAB = 512  # tiny-gpt2's (the byte tokenizer uses its first 259 ids)


@pytest.fixture(scope="module")
def engine() -> ferry.Engine:
    return ferry.Engine("tiny-gpt2", device="cpu", seed=1)


def good_batch() -> Dict[str, torch.Tensor]:
    batch = next(ferry.data.DataLoader(ferry.data.addition_dataset(1, 1, "train", 16), 2, 8, pack=False,
                                       answer_only=True, seed=1))
    return {key: value.clone() for key, value in batch.items()}


def raises(engine: ferry.Engine, batch: object, message: str) -> None:
    """train_step, forward and evaluate refuse `batch` alike, and nothing is trained."""
    for call in (engine.train_step, engine.forward, engine.evaluate):
        with pytest.raises(ferry.Error, match=message):
            call(batch)
    with pytest.raises(ferry.Error, match=message):
        engine.evaluate([good_batch(), batch])  # a loader's batches, evaluated in C++
    assert engine.steps_taken == 0


def test_the_engine_knows_the_model_vocabulary(engine: ferry.Engine) -> None:
    assert engine.vocab_size == VOCAB


def test_ids_outside_the_vocabulary_are_named_with_their_place(engine: ferry.Engine) -> None:
    batch = good_batch()
    batch["input_ids"][1, 3] = VOCAB
    raises(engine, batch, re.escape(f"input_ids[1, 3] is {VOCAB}: valid token ids are 0 to {VOCAB - 1} "
                                    f"(vocab_size {VOCAB})"))
    batch["input_ids"][0, 0] = -7
    raises(engine, batch, re.escape("input_ids[0, 0] is -7"))
    batch = good_batch()
    batch["labels"][0, 5] = 1000
    raises(engine, batch, re.escape("labels[0, 5] is 1000: valid labels are -100 (not learned) and token ids "
                                    f"0 to {VOCAB - 1}"))
    with pytest.raises(ferry.Error, match=re.escape(f"tokens[0, 1] is {VOCAB}")):
        engine.logits(torch.tensor([[1, VOCAB]]))
    with pytest.raises(ferry.Error, match=re.escape(f"tokens[0, 1] is {VOCAB + 5}")):
        engine.generate([1, VOCAB + 5], 2)


def test_an_empty_batch_is_refused_with_its_shape(engine: ferry.Engine) -> None:
    empty = torch.zeros(0, 8, dtype=torch.long)
    raises(engine, {"input_ids": empty, "labels": empty}, re.escape("input_ids has shape [0, 8]: a batch needs "
                                                                      "at least one row of at least one token"))
    raises(engine, {"input_ids": torch.zeros(2, 0, dtype=torch.long), "labels": torch.zeros(2, 0, dtype=torch.long)},
           re.escape("input_ids has shape [2, 0]"))


def test_dtypes_and_shapes_name_the_tensor(engine: ferry.Engine) -> None:
    batch = good_batch()
    raises(engine, {**batch, "input_ids": batch["input_ids"].float()},
           "input_ids is torch.float32: token ids must be an integer tensor")
    raises(engine, {**batch, "input_ids": batch["input_ids"].bool()}, "input_ids is torch.bool")
    raises(engine, {**batch, "input_ids": batch["input_ids"][0]}, re.escape("input_ids has shape [8]: it must be "
                                                                            "[batch, seq]"))
    raises(engine, {**batch, "labels": batch["labels"].double()}, "labels is torch.float64")
    raises(engine, {**batch, "labels": batch["labels"][:, 1:]},
           re.escape("labels has shape [2, 7] but input_ids [2, 8]"))
    raises(engine, {**batch, "attention_mask": torch.ones(2, 1, 8, 8, dtype=torch.long)},
           re.escape("attention_mask has shape [2, 1, 8, 8] but input_ids [2, 8]"))
    raises(engine, {**batch, "attention_mask": torch.ones(2, 7, dtype=torch.long)},
           re.escape("attention_mask has shape [2, 7]"))
    raises(engine, {**batch, "attention_mask": torch.full((2, 8), 0.5)},
           re.escape("attention_mask[0, 0] is 0.5: valid are 1 (a real token) and 0 (padding)"))
    raises(engine, {**batch, "position_ids": batch["position_ids"].float()}, "position_ids is torch.float32")
    raises(engine, {**batch, "position_ids": batch["position_ids"][:1]},
           re.escape("position_ids has shape [1, 8] but input_ids [2, 8]"))


def test_what_is_valid_passes_in_every_integer_and_mask_dtype(engine: ferry.Engine) -> None:
    fresh = ferry.Engine("tiny-gpt2", device="cpu", seed=1)
    batch = good_batch()
    reference = fresh.evaluate(batch)
    converted = {"input_ids": batch["input_ids"].int(), "labels": batch["labels"].int(),
                 "attention_mask": batch["attention_mask"].bool()}
    assert fresh.evaluate(converted) == reference
    assert fresh.train_step(converted).step == 1


def test_a_mapping_that_is_not_a_dict_is_a_batch(engine: ferry.Engine) -> None:
    """transformers' BatchEncoding is a UserDict: a Mapping, not a dict."""
    from collections import UserDict

    batch = good_batch()
    assert ferry.Engine("tiny-gpt2", device="cpu", seed=1).evaluate(UserDict(batch)) == engine.evaluate(batch)
    with pytest.raises(TypeError, match="a batch needs 'labels'"):
        engine.train_step(UserDict(input_ids=batch["input_ids"]))


class Stem(nn.Module):
    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, 8)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed(input_ids)


class PositionalStem(Stem):
    """Two embeddings: which one holds the tokens, ferry does not guess."""

    def __init__(self, vocab: int) -> None:
        super().__init__(vocab)
        self.positions = nn.Embedding(64, 8)


def model_of(stem: nn.Module, vocab: int) -> ferry.LayeredModel:
    return ferry.LayeredModel(stem, [nn.Linear(8, 8)], nn.Linear(8, vocab))


def test_your_own_stem_is_checked_against_its_embedding() -> None:
    engine = ferry.Engine(model_of(Stem(40), 40), device="cpu")
    assert engine.vocab_size == 40
    tokens = torch.tensor([[1, 2, 40, 3]])
    with pytest.raises(ferry.Error, match=re.escape("input_ids[0, 2] is 40: valid token ids are 0 to 39 "
                                                    "(vocab_size 40)")):
        engine.train_step({"input_ids": tokens, "labels": tokens})
    unnamed = ferry.Engine(model_of(PositionalStem(40), 40), device="cpu")
    assert unnamed.vocab_size is None
    with pytest.raises(ferry.Error, match=re.escape("input_ids[0, 0] is -1: valid token ids are 0 and above")):
        unnamed.train_step({"input_ids": -tokens, "labels": tokens})
