"""The engine: drives a LayeredModel block by block in one of ferry's modes (docs/engine.md)."""

from __future__ import annotations

import json
import math
import os
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Union

import torch

from . import _C
from ._C import BudgetExceeded
from .model import LORA_KEYS, DTypeLike, LayeredModel
from .job import with_job_defaults
from .plan import Plan, plan

Batch = Union[Mapping[str, torch.Tensor], Any]
"""A mapping (a dict, transformers' ``BatchEncoding``), or an object with attributes, holding
``input_ids`` and ``labels`` (integer ``[batch, seq]``, at least one row and column; labels
aligned with input_ids, not shifted, -100 where nothing is learned) and optionally
``attention_mask`` (``[batch, seq]``, 1 at real tokens, 0 at padding) and ``position_ids``
(``[batch, seq]``, from 0; where they restart, a packed document starts). Ids must be in
``[0, engine.vocab_size)``. The engine checks every batch before it computes anything: a bad one
raises :class:`ferry.Error` naming the tensor, its dtype or shape, or the first bad value and its
place (``input_ids[1, 7] is 300: valid token ids are 0 to 258 (vocab_size 259)``); a field that
is not a tensor raises ``TypeError``."""

# Keys of a `ferry finetune` job file that describe its training loop rather than the engine.
# In Python the loop is yours, so the engine accepts and ignores them: a job file loads as is.
LOOP_KEYS = ("data", "out", "resume", "save_every", "eval_problems", "log_every", "demo_digits",
             "batch", "seq", "export", "tokenizer", "data_format", "template", "answer_only", "pack",
             "eval_data", "eval_every", "export_precision", "adapter", "max_nonfinite_losses", "overwrite",
             "keep_checkpoints")


def engine_settings() -> List[str]:
    """The engine settings a config accepts, named as in ``ferry finetune``'s job files."""
    return list(_C.engine_config_keys())


class Engine:
    """Fine-tunes a model with ferry's runtime.

    ``model`` is a preset name (``"tiny-llama"``, see :func:`ferry.preset_names`), a Hugging
    Face directory, or a :class:`ferry.LayeredModel`. The configuration comes as a dict
    mirroring a ``ferry finetune`` JSON job file and/or as keyword arguments (which win)::

        engine = ferry.Engine("tiny-llama", mode="zero-offload", lr=1e-3, gpu_budget="8GiB")
        engine = ferry.Engine(config=json.load(open("job.json")))

    Engine settings (:func:`engine_settings`): mode (``"gpu"``, ``"zero-offload"``,
    ``"fuyou"``, ``"auto"``, ``"zo2"``), precision
    (``"fp32"``, ``"bf16"``, ``"fp16"``), device (``"auto"``, the default here, ``"cpu"``,
    ``"cuda[:N]"``), gpu_budget, host_budget (bytes or ``"24GiB"``; 0: no limit), optimizer
    (``"adamw"``, ``"adam"``, ``"sgd"``, ``"adagrad"``), lr, beta1, beta2, eps, weight_decay,
    momentum, nesterov, schedule (``"constant"``, ``"linear"``, ``"cosine"``), warmup, steps
    (the schedule's length), min_lr_ratio, grad_accum, max_grad_norm, loss_scale,
    keep_graph_blocks, offload_checkpoints, optimizer_threads, trace, nvme (directories),
    nvme_budget, staged (a directory ``ferry stage`` filled), delayed_update and
    delayed_update_warmup (zero-offload), fuyou_host_blocks, fuyou_window, activations,
    micro_batch_order, base_storage (``"compute"`` or ``"fp8"``: a LoRA base in fp8 e4m3), and for zo2: seed, zo_eps, zo_samples, zo_blocks (``"gpu"``, ``"host"``,
    ``"nvme"``), zo_gpu_blocks (a number or ``"auto"``), zo_host_blocks, zo_storage,
    zo_transfer (``"storage"``, ``"bf16"``, ``"fp8"``), zo_window, zo_write_back. A missing
    setting takes the default of a real ``ferry finetune`` job (the same table: AdamW at lr 5e-5,
    2e-4 with LoRA, weight decay 0.01, clipping at norm 1.0, precision bf16 on CUDA and fp32 on the
    CPU, zero-offload; zo2: SGD at 1e-7, 1e-4 with LoRA, no decay or clipping), but for the schedule: the loop is
    yours, so its length is ``steps``; with it the default is cosine with 3% warm-up, without it
    the lr is constant after ``warmup`` steps (0 unless given). They are parsed by the same C++
    function the CLI uses.

    With ``mode="auto"`` and no ``placement``, the engine is placed by :func:`ferry.plan` for
    micro-batches of ``batch`` x ``seq`` tokens (both required), with the hardware figures of
    ``hardware=`` (a preset) or ``calibration=`` (a file), or a quick calibration of this
    machine; ``engine.plan`` is that plan. As ``ferry finetune`` does, it plans twice: the
    placement of a first plan trains two profiled steps of random tokens on a model built again
    from the same preset or checkpoint (its weights are read twice), and the plan made from the
    measured compute and CPU update rate places the engine. ``profile=False``, or a
    :class:`ferry.LayeredModel` of your own (which cannot be built again), keeps the first plan.

    Besides the engine settings: ``model`` (when the argument is not given), ``seed`` (also the
    random initialisation of a preset, default 0, as in the CLI), ``dtype`` (a preset's or
    checkpoint's parameter dtype) and LoRA's ``lora_rank`` (adapters of this rank on the blocks'
    linears over a frozen base; 0, the default: train every parameter), ``lora_alpha`` (8),
    ``lora_dropout`` (0) and ``lora_targets`` (``"all-linear"``, or PEFT's target_modules names). The job file's loop keys (:data:`LOOP_KEYS`) are ignored. An unknown key
    raises :class:`ferry.Error` listing the valid ones.

    Raises :class:`ferry.BudgetExceeded` when the budgets cannot hold what the mode needs.
    """

    def __init__(self, model: Union[str, os.PathLike, LayeredModel, None] = None,
                 config: Optional[Mapping[str, Any]] = None, **settings: Any) -> None:
        merged: Dict[str, Any] = dict(config or {})
        merged.update(settings)
        name = merged.pop("model", None)
        seed = int(merged.get("seed", 0))
        dtype: DTypeLike = merged.pop("dtype", None)
        layers = int(merged.pop("layers", 0))
        lora = {key: merged.pop(key) for key in LORA_KEYS if key in merged}
        # What mode="auto" plans with; batch and seq are also loop keys, dropped below.
        planning = {"batch": merged.get("batch"), "seq": merged.get("seq"),
                    "hardware": merged.pop("hardware", None), "calibration": merged.pop("calibration", None),
                    "profile": bool(merged.pop("profile", True))}
        for key in LOOP_KEYS:
            merged.pop(key, None)
        merged = with_job_defaults(merged, lora)
        if model is None:
            model = name
        if model is None:
            raise TypeError("Engine needs a model: a preset name, a Hugging Face directory or "
                            "a ferry.LayeredModel")
        rebuild: Optional[Any] = None  # builds the model again, for mode="auto"'s profile
        if isinstance(model, LayeredModel):
            if model._bound:
                raise ValueError("this LayeredModel already belongs to an Engine, which has "
                                 "moved its parameters into its own memory; build a new one")
            if dtype is not None or lora:
                raise TypeError("dtype and the LoRA settings apply to a preset or a checkpoint; a LayeredModel "
                                "keeps its parameters (freeze some with requires_grad=False)")
            self.model = model
        elif isinstance(model, (str, os.PathLike)):
            path = os.fspath(model)
            if os.path.isdir(path) and layers:
                raise ValueError(f"layers={layers} truncates a preset; {path} is a Hugging Face directory")

            def build() -> LayeredModel:
                return (LayeredModel.from_pretrained(path, dtype, seed, **lora) if os.path.isdir(path)
                        else LayeredModel.preset(path, seed, dtype, layers, **lora))
            rebuild = build
            self.model = build()
        else:
            raise TypeError(f"model must be a preset name, a Hugging Face directory or a "
                            f"ferry.LayeredModel, not {type(model).__name__}")
        self.plan: Optional[Plan] = None
        if merged.get("mode") == "auto" and "placement" not in merged:
            self.plan = self._place(model, rebuild, merged, **planning)
            merged["placement"] = self.plan["placement"]
            merged["gpu_working"] = self.plan["gpu_working"]
        self._settings = merged
        self._engine = _C.Engine(self.model._model, json.dumps(merged))
        self.model._bound = True

    def _place(self, source: Any, rebuild: Optional[Any], settings: Dict[str, Any], batch: Optional[int],
               seq: Optional[int], hardware: Optional[str], calibration: Optional[str], profile: bool) -> Plan:
        if batch is None or seq is None:
            raise TypeError("mode='auto' plans the placement for the micro-batch it will train on: "
                            "give batch= and seq= (or a placement=)")
        if self.model.hf_config is not None:  # the model's own shape, --layers and all
            target = self.model.hf_config
        elif isinstance(source, (str, os.PathLike)):
            target = os.fspath(source)
        else:
            raise TypeError("mode='auto' plans from the model's shape, which a model of your own modules "
                            "does not have: give a placement= (ferry.plan of an equal preset), or a preset mode")
        # The plan is for this engine: its precision as the engine resolves it on its device.
        planning = {k: v for k, v in settings.items() if k not in ("mode", "device", "seed")}
        planning["precision"] = _C.engine_precision(json.dumps(settings))
        planned = plan(target, "auto", batch=int(batch), seq=int(seq), hardware=hardware,
                       calibration=calibration, **planning)
        if not planned.fits:
            raise BudgetExceeded(f"mode='auto' finds no placement within the budgets:\n{planned}")
        if not profile or rebuild is None or self.model.hf_config is None:
            return planned
        placed = {**settings, "placement": planned["placement"], "gpu_working": planned["gpu_working"]}
        tokens = torch.randint(json.loads(self.model.hf_config)["vocab_size"], (int(batch), int(seq)))
        measured = json.loads(_C.profile_compute(rebuild()._model, json.dumps(placed),
                                                 {"input_ids": tokens, "labels": tokens}))
        planned = plan(target, "auto", batch=int(batch), seq=int(seq), hardware=hardware,
                       calibration=calibration, measured=measured, **planning)
        if not planned.fits:
            raise BudgetExceeded(f"mode='auto' finds no placement within the budgets with the profiled "
                                 f"compute:\n{planned}")
        return planned

    # --- training -------------------------------------------------------------------------

    def train_step(self, batch: Batch) -> Optional[_C.StepResult]:
        """forward, backward and, every ``grad_accum`` micro-batches, step. Returns the
        step's :class:`ferry.StepResult` when one was taken, else None. ``batch`` is checked
        first (:data:`Batch`)."""
        return self._engine.train_step(batch)

    def forward(self, batch: Batch) -> torch.Tensor:
        """One micro-batch's loss (a scalar tensor); :meth:`backward` must follow before the
        next forward."""
        return self._engine.forward(batch)

    def backward(self, loss: torch.Tensor) -> None:
        """Backward through the model block by block; offloaded gradients go down as each
        block finishes."""
        self._engine.backward(loss)

    def step(self) -> _C.StepResult:
        """Applies the accumulated gradients; once every ``grad_accum`` micro-batches."""
        return self._engine.step()

    def flush(self) -> None:
        """zo2 applies each step's update when the parts next come to the device; this applies
        it now. :meth:`evaluate`, :meth:`logits`, :meth:`generate` and :meth:`save` flush
        first; call it at the end of training before reading the weights any other way. A
        no-op in the other modes."""
        self._engine.flush()

    # --- inference ------------------------------------------------------------------------

    def evaluate(self, batches: Union[Batch, Iterable[Batch]],
                 max_batches: Optional[int] = None) -> Union[float, Dict[str, float]]:
        """Without gradients, changing no training state: for one batch, its loss; for a loader
        or any iterable of batches (a :class:`ferry.data.DataLoader` with ``single_pass=True``
        runs out after one pass; ``max_batches`` stops sooner), the mean loss over every learned
        token, as a dict of ``loss``, ``perplexity``, ``tokens`` and ``batches``."""
        if isinstance(batches, Mapping) or hasattr(batches, "input_ids"):
            return self._engine.evaluate(batches)
        loss_sum, tokens, count = 0.0, 0, 0
        chunk: List[Batch] = []

        def flush() -> None:
            nonlocal loss_sum, tokens
            if chunk:
                result = self._engine.evaluate_batches(chunk)
                if result["tokens"] > 0:
                    loss_sum += result["loss"] * result["tokens"]
                    tokens += result["tokens"]
                chunk.clear()

        for batch in batches:
            chunk.append(batch)
            count += 1
            if len(chunk) == 32:
                flush()
            if max_batches is not None and count >= max_batches:
                break
        flush()
        loss = loss_sum / tokens if tokens else float("nan")
        return {"loss": loss, "perplexity": math.exp(loss) if tokens else float("nan"), "tokens": tokens,
                "batches": count}

    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits ``[batch, seq, vocab]`` for integer tokens ``[batch, seq]``, without
        gradients; ``tokens`` is checked as a batch's ``input_ids`` are."""
        return self._engine.logits(tokens)

    def generate(self, prompt: Union[Sequence[int], torch.Tensor], max_new_tokens: int,
                 stop_token: Optional[int] = None, *, temperature: float = 0.0, top_p: float = 1.0,
                 top_k: int = 0, stop_tokens: Sequence[int] = (), seed: int = 0,
                 vocab_size: int = 0) -> List[int]:
        """The new token ids after ``prompt``, at most ``max_new_tokens``, stopping before any of
        ``stop_token`` / ``stop_tokens``. Greedy at temperature 0; otherwise sampled from
        softmax(logits / temperature) within the ``top_k`` most likely (0: all) and the smallest
        set of probability ``top_p``, with a generator seeded by ``seed``; only ids below
        ``vocab_size`` (0: all; a tokenizer's, when the embedding is padded past it)."""
        if isinstance(prompt, torch.Tensor):
            prompt = prompt.flatten().tolist()
        stops = list(stop_tokens) + ([stop_token] if stop_token is not None else [])
        return self._engine.generate_sampled(list(prompt), max_new_tokens, temperature, top_p, top_k, stops, seed,
                                             vocab_size)

    def generate_text(self, tokenizer: Any, prompt: str, max_new_tokens: int = 128, *, chat: bool = False,
                      system: Optional[str] = None, template: Optional[str] = None, temperature: float = 0.0,
                      top_p: float = 1.0, top_k: int = 0, seed: int = 0) -> str:
        """Text after ``prompt`` with a :class:`ferry.Tokenizer`, as ``ferry generate`` makes it:
        with ``chat``, the prompt (after a ``system`` message) rendered by the chat template with
        a generation prompt, stopping at the template's end-of-turn token too; else the prompt
        with the special tokens the tokenizer adds. Stops at the tokenizer's stop ids."""
        stops = list(tokenizer.stop_token_ids)
        if chat:
            messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
            text, _, _, end_of_turn = tokenizer._tokenizer.apply_chat_template(messages, True, template or "")
            ids = tokenizer.encode(text)
            if end_of_turn and tokenizer.token_to_id(end_of_turn) is not None:
                stops.append(tokenizer.token_to_id(end_of_turn))
        else:
            ids = tokenizer.encode(prompt, add_special_tokens=True)
        new = self.generate(ids, max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                            stop_tokens=stops, seed=seed, vocab_size=tokenizer.vocab_size)
        return tokenizer.decode(new, skip_special_tokens=True)

    # --- checkpoints ----------------------------------------------------------------------

    def save(self, directory: Union[str, os.PathLike],
             extra: Optional[Mapping[str, Any]] = None) -> None:
        """Writes a checkpoint atomically: safetensors under Hugging Face names, the optimizer
        state, and trainer_state.json with ``extra`` (any JSON-serialisable dict, e.g. a data
        loader's :meth:`ferry.data.DataLoader.state`)."""
        self._engine.save(os.fspath(directory), json.dumps(dict(extra or {})))

    def load(self, directory: Union[str, os.PathLike]) -> Dict[str, Any]:
        """Restores what :meth:`save` wrote and returns its ``extra``."""
        return json.loads(self._engine.load(os.fspath(directory)))

    def export_pretrained(self, directory: Union[str, os.PathLike],
                          precision: Optional[str] = None) -> None:
        """Writes the trained model for inference, atomically: config.json and safetensors under
        Hugging Face names in ``precision`` ("fp32", "bf16" or "fp16"; default: the engine's),
        without optimizer state, so ``transformers``' ``from_pretrained`` loads the directory.
        Built-in families only."""
        self._engine.export_pretrained(os.fspath(directory), precision or "")

    def export_adapter(self, directory: Union[str, os.PathLike], base_model_name_or_path: str = "") -> None:
        """Writes the LoRA adapters as PEFT saves them (adapter_config.json and
        adapter_model.safetensors under PEFT's names), atomically, for
        ``peft.PeftModel.from_pretrained``. :meth:`export_pretrained` writes the merged model."""
        self._engine.export_adapter(os.fspath(directory), base_model_name_or_path)

    # --- what it is and what it did -------------------------------------------------------

    def stats(self) -> Dict[str, Any]:
        """Seconds per phase and the residency manager's figures: ``steps``,
        ``forward_seconds``, ``backward_seconds``, ``optimizer_seconds``,
        ``optimizer_wait_seconds``, ``cpu_update_seconds`` and ``cpu_updated_elements`` (the
        CPU worker's arithmetic and the elements it updated), ``tiers`` (per tier: budget, used,
        peak bytes, refusals)
        and ``transfers`` (per ``"from->to"`` pair: bytes, transfers, busy and waited
        seconds)."""
        return self._engine.stats()

    def write_trace(self, path: Union[str, os.PathLike]) -> str:
        """Writes the Chrome trace recorded with ``trace=True``; returns the overlap
        summary."""
        return self._engine.write_trace(os.fspath(path))

    def parameters(self) -> List[torch.Tensor]:
        """The model's parameters, as views into the engine's memory."""
        return self._engine.parameters()

    @property
    def settings(self) -> Dict[str, Any]:
        """The engine settings this engine was built with, every default filled in (a copy)."""
        return dict(self._settings)

    @property
    def steps_taken(self) -> int:
        """Optimizer steps taken so far (restored by :meth:`load`)."""
        return self._engine.steps_taken

    @property
    def current_lr(self) -> float:
        """The learning rate the next step will use."""
        return self._engine.current_lr

    @property
    def mode(self) -> str:
        """The mode the engine runs: ``"gpu"``, ``"zero-offload"``, ``"fuyou"``, ``"auto"`` or
        ``"zo2"``."""
        return self._engine.mode

    @property
    def precision(self) -> str:
        """The compute precision: ``"fp32"``, ``"bf16"`` or ``"fp16"``."""
        return self._engine.precision

    @property
    def device(self) -> torch.device:
        """The device the model computes on."""
        return torch.device(self._engine.device)

    @property
    def vocab_size(self) -> Optional[int]:
        """The token ids a batch may hold, ``[0, vocab_size)``: the model's vocabulary (a built-in
        family's config, or the rows of the only ``torch.nn.Embedding`` of your own stem); None
        when the model names none, and then ids need only be non-negative."""
        return self._engine.vocab_size

    @property
    def rank(self) -> int:
        """This process's rank under torchrun (0 alone); it trains on its own rows of each
        global batch: ``batch[rank * b:(rank + 1) * b]`` (docs/distributed.md)."""
        return self._engine.rank

    @property
    def world_size(self) -> int:
        """The number of processes training together under torchrun (1 alone)."""
        return self._engine.world_size

    def __repr__(self) -> str:
        return (f"ferry.Engine(mode={self.mode!r}, precision={self.precision!r}, "
                f"device={str(self.device)!r}, blocks={self._engine.num_blocks}, "
                f"parameters={self._engine.parameter_count}, steps_taken={self.steps_taken})")


__all__ = ["Batch", "Engine", "LOOP_KEYS", "engine_settings"]
