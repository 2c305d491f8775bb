"""Models the engine drives part by part: stem, blocks, head (docs/model.md)."""

from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Sequence, Union

import torch

from . import _C

DTypeLike = Union[str, torch.dtype, None]

_DTYPE_NAMES = {
    torch.float32: "F32", "float32": "F32", "fp32": "F32", "f32": "F32",
    torch.bfloat16: "BF16", "bfloat16": "BF16", "bf16": "BF16",
    torch.float16: "F16", "float16": "F16", "fp16": "F16", "f16": "F16",
}


def _dtype_name(dtype: DTypeLike) -> Optional[str]:
    if dtype is None:
        return None
    key = dtype.lower() if isinstance(dtype, str) else dtype
    if key not in _DTYPE_NAMES:
        raise ValueError(f"dtype {dtype!r} is not valid: use torch.float32, torch.bfloat16, "
                         "torch.float16 or their names ('fp32', 'bf16', 'fp16')")
    return _DTYPE_NAMES[key]


LORA_KEYS = ("lora_rank", "lora_alpha", "lora_dropout", "lora_targets")
"""The LoRA settings, named as in ``ferry finetune``'s job files."""


def _lora_arguments(settings: Dict[str, Any]) -> Dict[str, Any]:
    unknown = sorted(set(settings) - set(LORA_KEYS))
    if unknown:
        raise TypeError(f"unexpected arguments {unknown}; the LoRA settings are {list(LORA_KEYS)}")
    arguments: Dict[str, Any] = {}
    if "lora_rank" in settings:
        arguments["lora_rank"] = int(settings["lora_rank"])
    if "lora_alpha" in settings:
        arguments["lora_alpha"] = float(settings["lora_alpha"])
    if "lora_dropout" in settings:
        arguments["lora_dropout"] = float(settings["lora_dropout"])
    if "lora_targets" in settings:
        targets = settings["lora_targets"]
        arguments["lora_targets"] = ([t for t in targets.split(",") if t] if isinstance(targets, str)
                                     else [str(t) for t in targets])
    return arguments


class LayeredModel:
    """A model as ferry's engine sees it::

        input_ids --stem--> hidden --blocks[0]--> ... --blocks[-1]--> hidden --head--> logits

    Build one from your own ``torch.nn.Module`` parts, or load a built-in family with
    :meth:`preset` or :meth:`from_pretrained`.

    Supported signatures for your own parts (anything else raises :class:`ferry.Error` at
    the first forward, naming the part and what it returned):

    - ``stem(input_ids) -> hidden``: ``input_ids`` is ``[batch, seq]`` int64;
    - ``block(hidden) -> hidden``, or a tuple whose first element is ``hidden`` (as Hugging
      Face decoder layers return); ``hidden`` is ``[batch, seq, dim]``;
    - ``head(hidden) -> logits``: ``[batch, seq, vocab]``.

    With ``pass_context=True`` every part is called with a second argument, a
    :class:`ferry.StepContext` holding ``positions`` and ``attention_mask`` (from the batch's
    padding mask; ``None`` for plain causal attention).

    The loss is ferry's causal LM loss (:func:`causal_lm_loss`). The parameters with
    ``requires_grad`` are trained; those without are a frozen group (no gradients, optimizer
    state or weight decay, never written back). A tensor may belong to one part only, except
    a head that reuses the stem's embedding (tied weights). The parts keep their parameters
    objects: once an :class:`Engine` holds the model, those parameters are views into the
    engine's memory, so your modules see every update.
    """

    def __init__(self, stem: torch.nn.Module, blocks: Sequence[torch.nn.Module],
                 head: torch.nn.Module, *, pass_context: bool = False) -> None:
        self.stem: Optional[torch.nn.Module] = stem
        self.blocks: List[torch.nn.Module] = list(blocks)
        self.head: Optional[torch.nn.Module] = head
        self._model = _C.python_model(stem, self.blocks, head, pass_context)
        self._bound = False  # set once an Engine holds the model

    @classmethod
    def _wrap(cls, model: "_C.LayeredModel") -> "LayeredModel":
        instance = cls.__new__(cls)
        instance.stem, instance.blocks, instance.head = None, [], None
        instance._model = model
        instance._bound = False
        return instance

    @classmethod
    def preset(cls, name: str, seed: int = 0, dtype: DTypeLike = None, layers: int = 0,
               **lora: Any) -> "LayeredModel":
        """A built-in family by preset name (see :func:`preset_names`), randomly initialised
        as transformers does, deterministically for ``seed``; with ``layers``, only its first
        that many blocks (every other dimension kept). ``lora_rank`` (with ``lora_alpha``,
        ``lora_dropout``, ``lora_targets``) adds LoRA adapters over the frozen base."""
        return cls._wrap(_C.load_model(name, seed, _dtype_name(dtype), int(layers), **_lora_arguments(lora)))

    @classmethod
    def from_pretrained(cls, directory: Union[str, os.PathLike], dtype: DTypeLike = None, seed: int = 0,
                        **lora: Any) -> "LayeredModel":
        """A Hugging Face directory (config.json and safetensors): GPT-2, OPT, LLaMA, Mistral,
        Qwen2. ``dtype`` defaults to config.json's torch_dtype. ``lora_rank`` (with
        ``lora_alpha``, ``lora_dropout``, ``lora_targets``) adds LoRA adapters, drawn from
        ``seed``, over the frozen base."""
        path = os.fspath(directory)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"{path!r} is not a directory with a Hugging Face model")
        return cls._wrap(_C.load_model(path, seed, _dtype_name(dtype), **_lora_arguments(lora)))

    @property
    def num_blocks(self) -> int:
        """The number of blocks between the stem and the head."""
        return self._model.num_blocks

    @property
    def parameter_count(self) -> int:
        """Parameters of stem, blocks and head, frozen ones included."""
        return self._model.parameter_count

    @property
    def hf_config(self) -> Optional[str]:
        """config.json's text for a built-in family; None for a model of your own parts."""
        return self._model.hf_config

    def parameters(self) -> List[torch.Tensor]:
        """Stem, blocks, head, each in registration order."""
        return self._model.parameters()

    def to(self, device: Union[str, torch.device], dtype: DTypeLike = None) -> "LayeredModel":
        """Moves (and casts) every parameter and buffer, in place, for use outside an engine:
        an engine takes the model where it is and places it itself."""
        if self._bound:
            raise ValueError("this LayeredModel belongs to an Engine, whose memory its "
                             "parameters are now; build a new one to use it elsewhere")
        self._model.to(str(device), _dtype_name(dtype))
        return self

    def forward(self, tokens: torch.Tensor,
                padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The whole model in one call, outside any engine: logits ``[batch, seq, vocab]``."""
        return self._model.forward(tokens, padding_mask)

    __call__ = forward

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The model's loss of ``logits`` against aligned ``labels`` (:func:`causal_lm_loss`)."""
        return self._model.loss(logits, labels)

    def __repr__(self) -> str:
        return f"LayeredModel({self.num_blocks} blocks, {self.parameter_count} parameters)"


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy in fp32 of ``logits[:, t]`` against ``labels[:, t + 1]``, skipping
    labels equal to -100; the loss every :class:`LayeredModel` trains with."""
    return _C.causal_lm_loss(logits, labels)


def preset_names() -> List[str]:
    """The names :meth:`LayeredModel.preset` and :class:`Engine` accept."""
    return _C.preset_names()


__all__ = ["DTypeLike", "LORA_KEYS", "LayeredModel", "causal_lm_loss", "preset_names"]
