"""PyTorch FSDP2 with CPUOffloadPolicy on one GPU: the baseline of `ferry bench finetune --mode
fuyou` (issue 7). Builds a LLaMA-shaped model with transformers (random weights), shards every
decoder layer and the root with fully_shard (world size 1), keeps parameters, gradients and
AdamW's states in pinned host memory, computes in bf16 with fp32 reduction, and prints tokens/s
and model TFLOPS (6 x parameters x tokens / s) over the timed steps.

  python3 tools/bench/fsdp2_offload.py --hidden 2560 --layers 32 --heads 20 --intermediate 6912 \
      --batch 8 --seq 1024
"""

import argparse
import os
import time

import torch
import torch.distributed as dist
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard
from transformers import LlamaConfig, LlamaForCausalLM


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=2560)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--heads", type=int, default=20)
    parser.add_argument("--intermediate", type=int, default=6912)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--accum", type=int, default=1, help="micro-batches per optimizer step")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--checkpointing", action="store_true",
                        help="recompute each layer in backward (as ferry's fuyou mode does)")
    args = parser.parse_args()

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29531")
    dist.init_process_group("nccl", rank=0, world_size=1)
    torch.cuda.set_device(0)
    torch.manual_seed(0)

    config = LlamaConfig(hidden_size=args.hidden, num_hidden_layers=args.layers,
                         num_attention_heads=args.heads, num_key_value_heads=args.heads,
                         intermediate_size=args.intermediate, vocab_size=args.vocab,
                         max_position_embeddings=max(4096, args.seq), tie_word_embeddings=False)
    config._attn_implementation = "sdpa"
    model = LlamaForCausalLM(config)  # fp32 on the CPU: the master FSDP2 offloads
    if args.checkpointing:
        model.gradient_checkpointing_enable()
    parameters = sum(p.numel() for p in model.parameters())

    policy = dict(mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32),
                  offload_policy=CPUOffloadPolicy(pin_memory=True))
    for layer in model.model.layers:
        fully_shard(layer, **policy)
    fully_shard(model, **policy)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.0)

    tokens = torch.randint(0, args.vocab, (args.batch, args.seq), device="cuda")

    def step():
        for micro_batch in range(args.accum):
            model.set_requires_gradient_sync(micro_batch + 1 == args.accum)
            loss = model(input_ids=tokens, labels=tokens).loss / args.accum
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / args.steps
    tokens_per_s = args.batch * args.seq * args.accum / seconds
    print(f"fsdp2 cpu-offload: {parameters / 1e9:.2f}B parameters, batch {args.batch} x seq {args.seq}"
          f" x {args.accum} micro-batches"
          f"{', checkpointing' if args.checkpointing else ''}: {seconds:.3f} s/step, "
          f"{tokens_per_s:.0f} tokens/s, {6 * parameters * tokens_per_s / 1e12:.1f} model TFLOPS, "
          f"peak GPU {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB, torch {torch.__version__}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
