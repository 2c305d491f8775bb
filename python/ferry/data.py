"""ferry's data layer (docs/data.md): datasets from your own token ids or from files, a
byte-level tokenizer, a loader that packs or pads examples into batches with an exact resume
position, and the built-in addition task.

    ids = [tokenizer.encode(text) for text in texts]          # your own token ids
    dataset = ferry.data.make_dataset(ids, vocab_size=engine.vocab_size)
    loader = ferry.data.DataLoader(dataset, batch_size=8, sequence_length=512)
    for batch in loader:          # endless: dicts of int64 [batch, seq] tensors
        engine.train_step(batch)

Instruction data learns only the completions: give each example's prompt length and train with
``answer_only=True`` (the labels of prompt tokens are then -100)::

    dataset = ferry.data.make_dataset([p + c for p, c in pairs], [len(p) for p, _ in pairs])
    loader = ferry.data.DataLoader(dataset, 8, 512, pack=False, answer_only=True)
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import torch

from ._C import data as _data

ByteTokenizer = _data.ByteTokenizer
Dataset = _data.Dataset

TokenIds = Union[Sequence[int], torch.Tensor]
"""One example's token ids: a list (or any sequence) of ints, or a 1-D integer tensor."""


def make_dataset(examples: Iterable[TokenIds], prompt_lengths: Optional[Iterable[int]] = None, *,
                 labels: Optional[Iterable[TokenIds]] = None, vocab_size: Optional[int] = None,
                 name: str = "the examples") -> Dataset:
    """A dataset of your own token ids, held in memory, as ferry's C++ data layer holds the
    examples it tokenizes itself (``ferry::data::make_dataset``).

    ``examples`` is an iterable of token-id sequences: lists of ints, 1-D integer tensors, numpy
    arrays, the rows of a 2-D tensor, a Hugging Face dataset's ``["input_ids"]`` column. Each
    example needs at least one token. ``prompt_lengths``, one per example, counts its leading
    tokens that answer-only training does not learn (a :class:`DataLoader` with
    ``answer_only=True`` sets their labels to -100, so the loss is on the completion alone);
    without it every token is learned. Instead of prompt lengths, ``labels`` may say it per token
    as Hugging Face's supervised fine-tuning data does: one sequence per example, aligned with its
    tokens (not shifted), the token where it is learned and -100 where not (a multi-turn
    conversation's assistant turns); like prompt lengths they take effect with
    ``answer_only=True``. With ``vocab_size`` every id must be in
    ``[0, vocab_size)`` (pass the model's, ``engine.vocab_size``); without, ids must be
    non-negative. ``name`` names the dataset in error messages.

    A :class:`DataLoader` packs or pads these examples exactly as it does a file's (docs/data.md):
    packed rows concatenate examples, positions restarting at each; padded rows hold one example
    each, truncated or padded with ``pad_token`` (label -100, mask 0).

    Raises ``TypeError`` for an example, length or label that is not ints (naming it:
    ``examples[3][7] is 2.5 (float)``), ``ValueError`` for lengths or labels that do not match the
    examples (``labels[0][2] is 7 but examples[0][2] is 8``), :class:`ferry.Error` for an empty
    example, a prompt longer than its example, or an id outside the vocabulary, naming the
    example, the position, the id and the valid range.
    """
    return _data.make_dataset(examples, prompt_lengths, labels, vocab_size, name)


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

    ``pack`` concatenates examples into full rows (an example that does not fit continues in the
    next row, positions restarting at each example); otherwise each row is one example, padded or
    truncated to ``sequence_length`` (``ferry finetune`` packs text and pads instruction data).
    ``answer_only`` sets the labels of prompt tokens to -100. ``shuffle`` draws a new order every
    epoch from ``seed``. With ``vocab_size`` every id must be below it (an error names the id, its
    position and the example). ``pad_token`` fills padding (default: the byte tokenizer's PAD,
    258; give your tokenizer's pad or EOS id, as ``ferry finetune`` does). :meth:`state` and
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
        """Continues from a :meth:`state` of a loader over the same dataset, seed and shuffle
        setting (refused otherwise, changing nothing); batch size and sequence length may
        differ."""
        self._loader.restore(json.dumps(state))


__all__ = ["ByteTokenizer", "DataLoader", "Dataset", "TokenIds", "addition_dataset", "addition_problems",
           "make_dataset", "open_dataset"]
