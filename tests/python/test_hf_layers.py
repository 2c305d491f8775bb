"""A Hugging Face model's own embedding, decoder layers and head, trained by ferry's engine in
zero-offload mode, against the same model trained by plain PyTorch. Needs transformers (not a
Debian package: the test skips here and runs on the GPU machine) and CUDA."""

from __future__ import annotations

import copy
from typing import List

import pytest
import torch
from torch import nn

import ferry

from conftest import requires_cuda

transformers = pytest.importorskip("transformers")

STEPS, BATCH, SEQ = 10, 4, 32


class Embedding(nn.Module):
    def __init__(self, embed_tokens: nn.Module) -> None:
        super().__init__()
        self.embed_tokens = embed_tokens

    def forward(self, input_ids: torch.Tensor, context: ferry.StepContext) -> torch.Tensor:
        return self.embed_tokens(input_ids)


class DecoderLayer(nn.Module):
    """A transformers decoder layer with the rotary tables its model would hand it."""

    def __init__(self, layer: nn.Module, rotary: nn.Module) -> None:
        super().__init__()
        self.layer = layer
        self.rotary = rotary

    def forward(self, hidden: torch.Tensor, context: ferry.StepContext) -> torch.Tensor:
        positions = context.positions.clamp(min=0)
        out = self.layer(hidden, position_ids=positions,
                         position_embeddings=self.rotary(hidden, positions))
        return out[0] if isinstance(out, tuple) else out


class NormAndHead(nn.Module):
    def __init__(self, norm: nn.Module, lm_head: nn.Module) -> None:
        super().__init__()
        self.norm = norm
        self.lm_head = lm_head

    def forward(self, hidden: torch.Tensor, context: ferry.StepContext) -> torch.Tensor:
        return self.lm_head(self.norm(hidden))


def tiny_llama() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=172,
                                      num_hidden_layers=3, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=128,
                                      attn_implementation="sdpa")
    return transformers.LlamaForCausalLM(config).cuda()


def batches() -> List[dict]:
    generator = torch.Generator().manual_seed(1)
    result = []
    for _ in range(STEPS):
        starts = torch.randint(0, 256, (BATCH, 1), generator=generator)
        tokens = ((starts + torch.arange(SEQ)) % 256).cuda()
        result.append({"input_ids": tokens, "labels": tokens})
    return result


def plain_pytorch_losses(model: nn.Module) -> List[float]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    losses = []
    for batch in batches():
        loss = ferry.causal_lm_loss(model(batch["input_ids"]).logits, batch["labels"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def ferry_losses(model: nn.Module, precision: str) -> List[float]:
    inner = model.model
    layered = ferry.LayeredModel(
        Embedding(inner.embed_tokens),
        [DecoderLayer(layer, inner.rotary_emb) for layer in inner.layers],
        NormAndHead(inner.norm, model.lm_head), pass_context=True)
    engine = ferry.Engine(layered, mode="zero-offload", precision=precision, device="cuda",
                          lr=1e-3)
    return [engine.train_step(batch).loss for batch in batches()]


@requires_cuda
@pytest.mark.parametrize("precision,tolerance", [("fp32", 1e-4), ("bf16", 3e-2)])
def test_hf_decoder_layers_train_in_zero_offload_as_in_plain_pytorch(precision: str,
                                                                     tolerance: float) -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    model = tiny_llama()
    reference = plain_pytorch_losses(copy.deepcopy(model))
    ours = ferry_losses(model, precision)
    assert ours == pytest.approx(reference, rel=tolerance)
    assert ours[-1] < ours[0] - 0.3
