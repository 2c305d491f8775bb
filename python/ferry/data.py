"""ferry's data layer (docs/data.md): token datasets, a byte-level tokenizer, a loader with an
exact resume position, and the built-in addition task.

    dataset = ferry.data.addition_dataset(max_digits=1, seed=1, split="train", count=20000)
    loader = ferry.data.DataLoader(dataset, batch_size=32, sequence_length=16, pack=False,
                                   answer_only=True, seed=1)
    for batch in loader:          # endless: dicts of int64 [batch, seq] tensors
        engine.train_step(batch)
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, Iterator, List, Optional, Tuple, Union

import torch

from ._C import data as _data

ByteTokenizer = _data.ByteTokenizer
Dataset = _data.Dataset


def open_dataset(path: Union[str, os.PathLike], example_tokens: int, tokenizer: Optional[Any] = None,
                 data_format: str = "auto", template: Optional[str] = None) -> Dataset:
    """A token file (``.bin``, windows of ``example_tokens``), records (``.jsonl``, one a line, or
    ``.json``, a list: text, prompt/completion, alpaca, messages or sharegpt, told by their keys or
    by ``data_format``) or plain text, chosen by extension. Text is tokenized with ``tokenizer``
    (a :class:`ferry.Tokenizer`; default: the byte-level one); conversations use ``template`` (a
    chat template name; default: the tokenizer's own, else plain). ``dataset.learned(i)`` tells
    which tokens of example i answer-only training learns."""
    native = tokenizer._tokenizer if tokenizer is not None else None
    return _data.open_dataset(os.fspath(path), example_tokens, native, data_format, template or "")


def addition_problems(max_digits: int, seed: int, split: str, count: int) -> List[Tuple[str, str]]:
    """``count`` (prompt, completion) pairs of the addition task, e.g. ("07+68=", "075");
    ``split`` is "train" or "eval", which never overlap for one seed."""
    return _data.addition_problems(max_digits, seed, split, count)


def addition_dataset(max_digits: int, seed: int, split: str, count: int) -> Dataset:
    """The addition problems byte-tokenized as prompt-completion examples."""
    return _data.addition_dataset(max_digits, seed, split, count)


class DataLoader:
    """An endless iterator of batches (one pass with ``single_pass``, the last batch padded: what
    :meth:`ferry.Engine.evaluate` runs over): dicts with ``input_ids``, ``labels``,
    ``attention_mask`` and ``position_ids``, int64 ``[batch_size, sequence_length]``.

    ``pack`` concatenates examples into full rows; otherwise each row is one example, padded or
    truncated. ``answer_only`` sets the labels of prompt tokens to -100. :meth:`state` and
    :meth:`restore` resume exactly, also in a new process.
    """

    def __init__(self, dataset: Dataset, batch_size: int, sequence_length: int, *,
                 pack: bool = True, answer_only: bool = False, shuffle: bool = True,
                 seed: int = 0, vocab_size: Optional[int] = None, pad_token: Optional[int] = None,
                 single_pass: bool = False) -> None:
        self.dataset = dataset
        self._loader = _data.DataLoader(dataset, batch_size, sequence_length, pack, answer_only,
                                        shuffle, seed, vocab_size, pad_token, single_pass)

    def __iter__(self) -> Iterator[Dict[str, torch.Tensor]]:
        return self

    def __next__(self) -> Dict[str, torch.Tensor]:
        if self._loader.finished:
            raise StopIteration
        return self._loader.next()

    def state(self) -> Dict[str, Any]:
        """The position in the stream, JSON-serialisable (save it with a checkpoint)."""
        return json.loads(self._loader.state())

    def restore(self, state: Dict[str, Any]) -> None:
        self._loader.restore(json.dumps(state))


__all__ = ["ByteTokenizer", "DataLoader", "Dataset", "addition_dataset", "addition_problems",
           "open_dataset"]
