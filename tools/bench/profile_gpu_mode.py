"""Where a gpu-mode step's time goes: torch.profiler over ferry's engine (kernels launched from
C++ are recorded too) and over the plain loop `ferry bench finetune` compares it with (the same
model in bf16, one autograd graph, fused AdamW over bf16 states), against the wall time.
Usage: python3 profile_gpu_mode.py [batch] [rows]"""

import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

import ferry

batch_size = int(sys.argv[1]) if len(sys.argv) > 1 else 8
rows = int(sys.argv[2]) if len(sys.argv) > 2 else 30
tokens = torch.randint(0, 32000, (batch_size, 1024))


def measure(name, train_step):
    for _ in range(3):
        train_step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(3):
        train_step()
    torch.cuda.synchronize()
    print(f"{name}, batch {batch_size}: {(time.perf_counter() - start) / 3:.4f} s/step unprofiled")
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        for _ in range(3):
            train_step()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - start) / 3
    events = prof.key_averages()
    sort = "self_device_time_total" if hasattr(events[0], "self_device_time_total") else "self_cuda_time_total"
    device_us = sum(getattr(e, sort) for e in events) / 3
    print(f"{name} profiled: {wall:.4f} s/step wall, {device_us / 1e6:.4f} s/step of device time")
    print(events.table(sort_by=sort, row_limit=rows, max_name_column_width=70))
    print(events.table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=70))


def plain_loop():
    model = ferry.LayeredModel.preset("llama-1.3b", dtype="bf16").to("cuda")
    params = model.parameters()
    optimizer = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0, fused=True)
    device_tokens = tokens.cuda()

    def train_step():
        loss = model.loss(model.forward(device_tokens), device_tokens)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    measure("plain loop", train_step)


def ferry_gpu_mode():
    engine = ferry.Engine("llama-1.3b", mode="gpu", precision="bf16", device="cuda", lr=1e-5,
                          keep_graph_blocks=24)
    batch = {"input_ids": tokens, "labels": tokens}
    measure("ferry gpu mode", lambda: engine.train_step(batch))


which = sys.argv[3] if len(sys.argv) > 3 else "both"
if which in ("both", "plain"):
    plain_loop()
    torch.cuda.empty_cache()
if which in ("both", "ferry"):
    ferry_gpu_mode()
