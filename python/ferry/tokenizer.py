"""A model's own tokenizer (docs/tokenizer.md): Hugging Face tokenizer.json, or tokenizer.model
through SentencePiece, with the special tokens the files beside it name, and the chat templates
of the families ferry knows.

    tokenizer = ferry.Tokenizer("/models/Qwen2-0.5B-Instruct")
    ids = tokenizer.encode("Hello world")          # as encode(text, add_special_tokens=False)
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
"""

from __future__ import annotations

import os
from typing import List, Mapping, Optional, Sequence, Tuple, Union

from . import _C

Messages = Sequence[Mapping[str, str]]


class Tokenizer:
    """``path`` is a model directory, a directory holding only tokenizer files, or a
    tokenizer.json / tokenizer.model file. Encoding is thread-safe and releases the GIL."""

    def __init__(self, path: Union[str, os.PathLike, None] = None, *, _native: Optional[_C.Tokenizer] = None) -> None:
        if _native is None:
            if path is None:
                raise TypeError("Tokenizer needs a path (or use Tokenizer.byte_level())")
            _native = _C.load_tokenizer(os.fspath(path))
        self._tokenizer = _native

    @classmethod
    def byte_level(cls) -> "Tokenizer":
        """ferry's built-in tokenizer: bytes 0-255, BOS 256, EOS 257, PAD 258."""
        return cls(_native=_C.byte_tokenizer())

    def encode(self, text: str, add_special_tokens: bool = False) -> List[int]:
        """The ids of ``text``; special tokens written in it are recognised. With
        ``add_special_tokens``, what transformers' ``tokenizer(text)`` adds (BOS for Llama)."""
        return self._tokenizer.encode(text, add_special_tokens)

    def encode_batch(self, texts: Sequence[str]) -> List[List[int]]:
        """Every text encoded, on all cores."""
        return self._tokenizer.encode_batch(list(texts))

    def encode_with_spans(self, text: str) -> Tuple[List[int], List[Tuple[int, int]]]:
        """The ids and, per token, the byte range of ``text`` (UTF-8) it came from."""
        return self._tokenizer.encode_with_spans(text)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """The text of ``ids``; with ``skip_special_tokens``, without BOS, EOS and the other
        special tokens."""
        return self._tokenizer.decode(list(ids), skip_special_tokens)

    def token_to_id(self, token: str) -> Optional[int]:
        """The id of a token of the vocabulary (``"<|im_end|>"``), or None."""
        return self._tokenizer.token_to_id(token)

    def id_to_token(self, id: int) -> str:
        """The vocabulary's token for ``id``, as written in tokenizer.json."""
        return self._tokenizer.id_to_token(id)

    def apply_chat_template(self, messages: Messages, add_generation_prompt: bool = False,
                            template: Optional[str] = None) -> str:
        """The conversation as the model's chat template (or ``template``, one of
        :func:`chat_template_names`) renders it, as transformers' apply_chat_template(tokenize=False)."""
        return self.render_chat(messages, add_generation_prompt, template)[0]

    def render_chat(self, messages: Messages, add_generation_prompt: bool = False,
                    template: Optional[str] = None) -> Tuple[str, List[Tuple[int, int]]]:
        """The rendered text and the character ranges of it that training learns (each assistant
        turn and the token ending it). Ranges are in bytes of the UTF-8 text."""
        text, learned, _, _ = self._tokenizer.apply_chat_template(list(messages), add_generation_prompt, template or "")
        return text, learned

    @property
    def vocab_size(self) -> int:
        """The number of ids, special tokens included (a model's embedding may have more rows)."""
        return self._tokenizer.vocab_size

    @property
    def kind(self) -> str:
        """What the tokenizer is, for messages: ``"tokenizer.json (BPE)"``,
        ``"tokenizer.model (SentencePiece)"`` or ``"byte-level"``."""
        return self._tokenizer.kind

    @property
    def bos_token(self) -> Optional[str]:
        """The beginning-of-sequence token, or None."""
        return self._tokenizer.bos[0] if self._tokenizer.bos else None

    @property
    def bos_token_id(self) -> Optional[int]:
        """The beginning-of-sequence token's id, or None."""
        return self._tokenizer.bos[1] if self._tokenizer.bos else None

    @property
    def eos_token(self) -> Optional[str]:
        """The end-of-sequence token, or None."""
        return self._tokenizer.eos[0] if self._tokenizer.eos else None

    @property
    def eos_token_id(self) -> Optional[int]:
        """The end-of-sequence token's id, or None."""
        return self._tokenizer.eos[1] if self._tokenizer.eos else None

    @property
    def pad_token_id(self) -> Optional[int]:
        """The padding token's id, or None (pad with EOS then, as ``ferry finetune`` does)."""
        return self._tokenizer.pad[1] if self._tokenizer.pad else None

    @property
    def stop_token_ids(self) -> List[int]:
        """Where generation stops: generation_config.json's eos_token_id, else the EOS token."""
        return self._tokenizer.stop_ids

    @property
    def chat_template(self) -> Optional[str]:
        """tokenizer_config.json's (or chat_template.jinja's) Jinja source, as written."""
        return self._tokenizer.chat_template

    def __repr__(self) -> str:
        return f"ferry.Tokenizer({self.kind}, vocab_size={self.vocab_size})"


def chat_template_names() -> List[str]:
    """The chat templates ferry renders: chatml, llama2, llama3, mistral, mistral-v0.1, plain, qwen2."""
    return _C.chat_template_names()


__all__ = ["Tokenizer", "chat_template_names"]
