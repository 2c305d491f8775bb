"""A model assembled from the user's own torch.nn.Modules, run by the C++ engine."""

from __future__ import annotations

import copy
import math
from typing import List, Tuple

import pytest
import torch
from torch import nn

import ferry

from conftest import requires_cuda

VOCAB, DIM, HEADS, SEQ, BATCH = 40, 16, 2, 12, 4


class Stem(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed(input_ids)


class DecoderLayer(nn.Module):
    """Pre-norm causal self-attention and an MLP, in plain torch; returns a tuple as Hugging
    Face decoder layers do."""

    def __init__(self) -> None:
        super().__init__()
        self.attention_norm = nn.LayerNorm(DIM)
        self.qkv = nn.Linear(DIM, 3 * DIM)
        self.out = nn.Linear(DIM, DIM)
        self.mlp_norm = nn.LayerNorm(DIM)
        self.mlp = nn.Sequential(nn.Linear(DIM, 2 * DIM), nn.GELU(), nn.Linear(2 * DIM, DIM))
        self.register_buffer("causal", torch.ones(SEQ, SEQ, dtype=torch.bool).tril())

    def forward(self, hidden: torch.Tensor) -> Tuple[torch.Tensor, None]:
        batch, seq, _ = hidden.shape
        q, k, v = (self.qkv(self.attention_norm(hidden))
                   .view(batch, seq, 3, HEADS, DIM // HEADS).permute(2, 0, 3, 1, 4))
        scores = q @ k.transpose(-1, -2) / math.sqrt(DIM // HEADS)
        scores = scores.masked_fill(~self.causal[:seq, :seq], float("-inf"))
        attended = (scores.softmax(-1) @ v).transpose(1, 2).reshape(batch, seq, DIM)
        hidden = hidden + self.out(attended)
        return hidden + self.mlp(self.mlp_norm(hidden)), None


class Head(nn.Module):
    def __init__(self, tied_embedding: nn.Embedding = None) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(DIM)
        self.tied_embedding = tied_embedding
        self.lm_head = None if tied_embedding is not None else nn.Linear(DIM, VOCAB, bias=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        hidden = self.norm(hidden)
        if self.tied_embedding is not None:
            return hidden @ self.tied_embedding.weight.t()
        return self.lm_head(hidden)


def make_parts(tied: bool = False) -> Tuple[Stem, List[DecoderLayer], Head]:
    torch.manual_seed(3)
    stem = Stem()
    return stem, [DecoderLayer() for _ in range(3)], Head(stem.embed if tied else None)


def batches(steps: int) -> List[dict]:
    """Counting sequences from random starts: learnable in a few steps."""
    generator = torch.Generator().manual_seed(5)
    result = []
    for _ in range(steps):
        starts = torch.randint(0, VOCAB, (BATCH, 1), generator=generator)
        tokens = (starts + torch.arange(SEQ)) % VOCAB
        labels = tokens.clone()
        labels[:, : SEQ // 3] = -100
        result.append({"input_ids": tokens, "labels": labels})
    return result


def plain_pytorch_losses(stem: nn.Module, blocks: List[nn.Module], head: nn.Module,
                         optimizer_type: type, steps: int, lr: float,
                         weight_decay: float) -> List[float]:
    """The same training with no ferry in the loop but its loss function; AdamW's weight decay
    skips what ferry's engine skips (anything below 2-D: biases and norms), and frozen parameters
    (requires_grad=False) are not the optimizer's."""
    modules = nn.ModuleList([stem, *blocks, head])
    parameters = [p for p in modules.parameters() if p.requires_grad]
    optimizer = optimizer_type(
        [{"params": [p for p in parameters if p.dim() >= 2], "weight_decay": weight_decay},
         {"params": [p for p in parameters if p.dim() < 2], "weight_decay": 0.0}], lr=lr)
    losses = []
    for batch in batches(steps):
        hidden = stem(batch["input_ids"])
        for block in blocks:
            hidden = block(hidden)[0]
        loss = ferry.causal_lm_loss(head(hidden), batch["labels"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def ferry_losses(stem: nn.Module, blocks: List[nn.Module], head: nn.Module, steps: int,
                 **settings) -> List[float]:
    # As the plain loops: no clipping, and no weight decay unless given (a real job's defaults
    # clip at 1.0 and decay by 0.01).
    settings = {"max_grad_norm": 0.0, "weight_decay": 0.0, **settings}
    engine = ferry.Engine(ferry.LayeredModel(stem, blocks, head), device="cpu", **settings)
    return [engine.train_step(batch).loss for batch in batches(steps)]


@pytest.mark.parametrize("mode", ["zero-offload", "gpu"])
def test_user_modules_train_exactly_as_plain_pytorch(mode: str) -> None:
    settings = dict(lr=3e-3, weight_decay=0.1)
    stem, blocks, head = make_parts()
    copies = copy.deepcopy((stem, blocks, head))
    other_copies = copy.deepcopy((stem, blocks, head))

    ours = ferry_losses(stem, blocks, head, 20, mode=mode, **settings)
    # Note: with ferry's own CPU AdamW in the plain loop the only difference left is who drives
    # the modules, and the losses agree bit for bit. torch.optim.AdamW rounds a few updates in
    # the last bit differently, which 20 steps grow to about 1e-6 of the loss.
    same_kernel = plain_pytorch_losses(*copies, ferry.optim.CPUAdamW, 20, **settings)
    torch_adamw = plain_pytorch_losses(*other_copies, torch.optim.AdamW, 20, **settings)

    assert ours == same_kernel
    assert ours == pytest.approx(torch_adamw, rel=1e-5)
    assert ours[-1] < ours[0] - 0.2
    for trained, reference in zip(nn.ModuleList([stem, *blocks, head]).parameters(),
                                  nn.ModuleList([*copies[:1], *copies[1], copies[2]]).parameters()):
        assert torch.equal(trained.detach(), reference.detach())


def decayed_first(module: nn.Module) -> List[Tuple[torch.Tensor, bool]]:
    """A part's parameters in the order the engine packs them, each with whether weight decay
    applies: decayed ones first, then biases and norms (ferry's is_no_decay), each group in
    registration order."""
    flagged = [(p, not (name.endswith("bias") or p.dim() < 2))
               for name, p in module.named_parameters()]
    return [item for item in flagged if item[1]] + [item for item in flagged if not item[1]]


def test_user_modules_train_in_zo2_exactly_as_plain_mezo() -> None:
    """MeZO written out over the same modules with ferry's direction generator: the engine's
    losses and projected gradients agree bit for bit, step after step (so its weights do)."""
    eps, lr, weight_decay, seed, steps = 1e-3, 1e-3, 0.01, 42, 6
    stem, blocks, head = make_parts()
    copies = copy.deepcopy([stem, *blocks, head])
    engine = ferry.Engine(ferry.LayeredModel(stem, blocks, head), device="cpu", mode="zo2",
                          optimizer="sgd", lr=lr, weight_decay=weight_decay, zo_eps=eps,
                          seed=seed)
    results = [engine.train_step(batch) for batch in batches(steps)]

    parts = [decayed_first(part) for part in copies]
    theta = [[p.detach().clone() for p, _ in part] for part in parts]

    def loss_at(direction: List[List[torch.Tensor]], scale: float, batch: dict) -> float:
        for part, weights, z in zip(parts, theta, direction):
            for (param, _), weight, z_i in zip(part, weights, z):
                param.detach().copy_(weight + z_i * scale)
        hidden = copies[0](batch["input_ids"])
        for block in copies[1:-1]:
            hidden = block(hidden)[0]
        return ferry.causal_lm_loss(copies[-1](hidden), batch["labels"]).item()

    with torch.no_grad():
        for step, (batch, result) in enumerate(zip(batches(steps), results), start=1):
            direction_seed = ferry._C.zo_step_seed(seed, step, 0)
            direction = []
            for index, part in enumerate(parts):
                sizes = [p.numel() for p, _ in part]
                flat = ferry._C.optim.zo_normals(direction_seed, index, sum(sizes))
                direction.append([z.view(p.shape) for z, (p, _) in zip(flat.split(sizes), part)])
            plus, minus = loss_at(direction, eps, batch), loss_at(direction, -eps, batch)
            grad = (plus - minus) / (2.0 * eps)
            assert (result.loss_plus, result.loss_minus) == ([plus], [minus])
            assert result.projected_grads == [grad]
            for weights, z, part in zip(theta, direction, parts):
                for i, (weight, z_i, (_, decayed)) in enumerate(zip(weights, z, part)):
                    d = z_i * grad
                    if decayed:
                        d = d + weight * weight_decay
                    weights[i] = weight - d * lr


@pytest.mark.parametrize("mode", ["zero-offload", "gpu"])
def test_frozen_parameters_never_change_and_the_rest_train_as_plain_pytorch(mode: str) -> None:
    """requires_grad=False parameters are a frozen group: a whole stem, a whole block, one weight
    of a block and a head's norm. Weight decay (large here) never touches them; the trainable
    ones follow plain PyTorch's loop over the trainable parameters alone, bit for bit."""
    settings = dict(lr=3e-3, weight_decay=0.5)
    stem, blocks, head = make_parts()
    stem.requires_grad_(False)
    blocks[0].qkv.weight.requires_grad_(False)
    blocks[1].requires_grad_(False)
    head.norm.requires_grad_(False)
    copies = copy.deepcopy((stem, blocks, head))
    everything = nn.ModuleList([stem, *blocks, head])
    before = [p.detach().clone() for p in everything.parameters()]

    ours = ferry_losses(stem, blocks, head, 12, mode=mode, **settings)
    reference = plain_pytorch_losses(*copies, ferry.optim.CPUAdamW, 12, **settings)

    assert ours == reference
    assert ours[-1] < ours[0]
    references = nn.ModuleList([copies[0], *copies[1], copies[2]]).parameters()
    for parameter, start, expected in zip(everything.parameters(), before, references):
        assert torch.equal(parameter.detach(), expected.detach())
        assert torch.equal(parameter.detach(), start) != parameter.requires_grad


def test_a_head_tied_to_the_stem_embedding_trains_as_plain_pytorch() -> None:
    stem, blocks, head = make_parts(tied=True)
    copies = copy.deepcopy((stem, blocks, head))
    ours = ferry_losses(stem, blocks, head, 10, lr=3e-3)
    reference = plain_pytorch_losses(*copies, ferry.optim.CPUAdamW, 10, lr=3e-3,
                                     weight_decay=0.0)
    assert ours == pytest.approx(reference, rel=1e-6)
    assert head.tied_embedding.weight is stem.embed.weight


def test_the_engine_rebinds_the_modules_own_parameters() -> None:
    stem, blocks, head = make_parts()
    weight = stem.embed.weight
    before = weight.detach().clone()
    model = ferry.LayeredModel(stem, blocks, head)
    engine = ferry.Engine(model, device="cpu", lr=1e-2)
    assert stem.embed.weight is weight
    assert weight.data_ptr() == engine.parameters()[0].data_ptr()
    assert torch.equal(weight.detach(), before)
    engine.train_step(batches(1)[0])
    assert not torch.equal(weight.detach(), before)
    # Buffers are registered too, and the module's train/eval flag follows the engine.
    assert blocks[0].training
    with pytest.raises(ValueError, match="already belongs to an Engine"):
        ferry.Engine(model, device="cpu")


def test_context_is_passed_on_request() -> None:
    seen = []

    class ContextBlock(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(DIM, DIM)

        def forward(self, hidden: torch.Tensor, context: ferry.StepContext) -> torch.Tensor:
            seen.append(context)
            return hidden + self.linear(hidden)

    class ContextPart(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor, context: ferry.StepContext) -> torch.Tensor:
            return self.inner(x)

    stem, _, head = make_parts()
    model = ferry.LayeredModel(ContextPart(stem), [ContextBlock()], ContextPart(head),
                               pass_context=True)
    engine = ferry.Engine(model, device="cpu")
    batch = batches(1)[0]
    engine.evaluate(batch)
    assert isinstance(seen[0], ferry.StepContext)
    assert seen[0].positions.shape == batch["input_ids"].shape
    assert seen[0].attention_mask is None


def test_unsupported_modules_raise_clear_errors() -> None:
    stem, blocks, head = make_parts()

    class ReturnsDict(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(DIM, DIM)

        def forward(self, hidden: torch.Tensor) -> dict:
            return {"hidden": self.linear(hidden)}

    engine = ferry.Engine(ferry.LayeredModel(stem, [ReturnsDict()], head), device="cpu")
    with pytest.raises(ferry.Error, match=r"blocks.0 returned a dict; the supported signature "
                                          r"is block\(hidden\) -> hidden"):
        engine.evaluate(batches(1)[0])

    with pytest.raises(ferry.Error, match="is the same tensor as blocks.0"):
        ferry.LayeredModel(stem, [blocks[0], blocks[0]], head)
    with pytest.raises(ferry.Error, match="every part must be a torch.nn.Module"):
        ferry.LayeredModel(stem, [lambda hidden: hidden], head)
    with pytest.raises(ferry.Error, match="at least one block"):
        ferry.LayeredModel(stem, [], head)
    with pytest.raises(ferry.Error, match="'stem' has no parameters"):
        ferry.Engine(ferry.LayeredModel(nn.Identity(), blocks, head), device="cpu")


def test_python_exceptions_in_a_part_reach_the_caller() -> None:
    stem, blocks, head = make_parts()

    class Failing(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(DIM, DIM)

        def forward(self, hidden: torch.Tensor) -> torch.Tensor:
            raise KeyError("the block's own error")

    engine = ferry.Engine(ferry.LayeredModel(stem, [Failing()], head), device="cpu")
    with pytest.raises(KeyError, match="the block's own error"):
        engine.train_step(batches(1)[0])


@requires_cuda
@pytest.mark.parametrize("mode", ["zero-offload", "gpu"])
def test_user_modules_on_cuda_follow_plain_pytorch(mode: str) -> None:
    stem, blocks, head = make_parts()
    copies = [module.cuda() for module in copy.deepcopy([stem, *blocks, head])]
    engine = ferry.Engine(ferry.LayeredModel(stem, blocks, head), device="cuda", mode=mode,
                          lr=3e-3)
    ours = [engine.train_step({k: v.cuda() for k, v in b.items()}).loss for b in batches(10)]
    modules = nn.ModuleList(copies)
    optimizer = torch.optim.AdamW(modules.parameters(), lr=3e-3, weight_decay=0.0)
    reference = []
    for batch in batches(10):
        hidden = copies[0](batch["input_ids"].cuda())
        for block in copies[1:-1]:
            hidden = block(hidden)[0]
        loss = ferry.causal_lm_loss(copies[-1](hidden), batch["labels"].cuda())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        reference.append(loss.item())
    assert ours == pytest.approx(reference, rel=1e-4)
