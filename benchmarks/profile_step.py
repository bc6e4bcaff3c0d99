#!/usr/bin/env python3
"""Profile optimizer steps of ftpipe's recipe on a benchmark shape (torch.profiler): where the
time of a step goes, CPU side and GPU side, and how busy the GPU is.

    python3 benchmarks/profile_step.py [--model llama-3.2-1b] [--method lora] [--budget 16384] [--trace out.json.gz]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import train_throughput as tt  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama-3.2-1b")
    ap.add_argument("--method", default="lora")
    ap.add_argument("--budget", type=int, default=16384)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--gc", action="store_true")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--trace", default=None, help="write a Chrome trace here (.json.gz)")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    import torch
    from torch.profiler import ProfilerActivity, profile

    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = tt.load_config(args.model, args.quick)
    n = (args.steps + 2) * tt.PER_STEP
    examples = tt.make_examples(n, cfg.vocab_size)
    v = dict(model=args.model, recipe="ftpipe", method=args.method, budget=args.budget, gc=args.gc,
             compile=args.compile)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    # only the steady-state steps are recorded (the two warm-up steps compile)
    sched = torch.profiler.schedule(wait=0, warmup=2, active=args.steps, repeat=1)
    with profile(activities=acts, schedule=sched,
                 with_stack=os.environ.get("FTPIPE_PROFILE_STACK") == "1") as prof:
        t0 = time.perf_counter()
        res = tt.run_ftpipe(v, cfg, examples, steps=args.steps, warmup=2, device=device, step_hook=prof.step)
        wall = time.perf_counter() - t0
    print(f"== {args.model} {args.method} budget {args.budget}: step seconds",
          [round(x, 3) for x in res["step_s"]], "tokens", res["tokens"], f"run {wall:.1f}s")
    ka = prof.key_averages()
    gpu_us = sum(e.self_device_time_total for e in ka if e.device_type.name == "CUDA"   # kernels, not the
                 and not e.key.startswith("ProfilerStep")) if device == "cuda" else 0     # profiler's step spans
    timed = sum(res["step_s"][2:])
    print(f"GPU kernel time over the {args.steps} profiled steps: {gpu_us / 1e6:.3f} s; their wall time "
          f"{timed:.3f} s: the GPU is busy {gpu_us / 1e6 / max(timed, 1e-9):.0%} of a step")
    print(ka.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60))
    if device == "cuda":
        print(ka.table(sort_by="self_cuda_time_total", row_limit=25, max_name_column_width=60))
    if os.environ.get("FTPIPE_PROFILE_STACK") == "1":
        print(prof.key_averages(group_by_stack_n=6).table(sort_by="self_cpu_time_total", row_limit=12,
                                                           max_name_column_width=60))
    if args.trace:
        prof.export_chrome_trace(args.trace)


if __name__ == "__main__":
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "0")
    main()
