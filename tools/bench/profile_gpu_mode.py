"""Where a gpu-mode step's time goes: torch.profiler over ferry's engine (kernels launched from
C++ are recorded too), against the wall time. Usage: python3 profile_gpu_mode.py [batch]"""

import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

import ferry

batch_size = int(sys.argv[1]) if len(sys.argv) > 1 else 8
engine = ferry.Engine("llama-1.3b", mode="gpu", precision="bf16", device="cuda", lr=1e-5,
                      keep_graph_blocks=24)
tokens = torch.randint(0, 32000, (batch_size, 1024))
batch = {"input_ids": tokens, "labels": tokens}
for _ in range(3):
    engine.train_step(batch)
torch.cuda.synchronize()
start = time.perf_counter()
for _ in range(3):
    engine.train_step(batch)
torch.cuda.synchronize()
print(f"ferry gpu mode, batch {batch_size}: {(time.perf_counter() - start) / 3:.4f} s/step unprofiled")
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
    start = time.perf_counter()
    for _ in range(3):
        engine.train_step(batch)
    torch.cuda.synchronize()
    wall = (time.perf_counter() - start) / 3
events = prof.key_averages()
device_us = sum(e.self_device_time_total if hasattr(e, "self_device_time_total") else e.self_cuda_time_total
                for e in events) / 3
print(f"profiled: {wall:.4f} s/step wall, {device_us / 1e6:.4f} s/step of device time (kernels + copies)")
sort = "self_device_time_total" if hasattr(events[0], "self_device_time_total") else "self_cuda_time_total"
print(events.table(sort_by=sort, row_limit=40, max_name_column_width=60))
print(events.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60))
