#!/usr/bin/env python3
"""Profile one optimizer step of ftpipe's recipe on a benchmark shape (torch.profiler):
where the time of a step goes, CPU side and GPU side.

    python3 benchmarks/profile_step.py [--model llama-3.2-1b] [--method lora] [--budget 16384]
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import train_throughput as tt  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama-3.2-1b")
    ap.add_argument("--method", default="lora")
    ap.add_argument("--budget", type=int, default=16384)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    import torch
    from torch.profiler import ProfilerActivity, profile

    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = tt.load_config(args.model, args.quick)
    examples = tt.make_examples(4 * tt.PER_STEP, cfg.vocab_size)
    v = dict(model=args.model, recipe="ftpipe", method=args.method, budget=args.budget)
    tt.run_ftpipe(v, cfg, examples[: 2 * tt.PER_STEP], steps=1, warmup=1, device=device)   # warm
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=acts) as prof:
        res = tt.run_ftpipe(v, cfg, examples[2 * tt.PER_STEP:], steps=1, warmup=1, device=device)
    print("step seconds", [round(x, 3) for x in res["step_s"]], "tokens", res["tokens"])
    key = "cuda_time_total" if device == "cuda" else "cpu_time_total"
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=30))
    print(prof.key_averages().table(sort_by=key, row_limit=30))


if __name__ == "__main__":
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "0")
    main()
