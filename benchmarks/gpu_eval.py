"""Evaluation's greedy generation on one GPU, today's path against the new one, and a version's
life at real size: a random-initialised Llama-3.2-1B-shaped model (ftpipe.training.families),
1,024 prompts of log-normal length (median ~200 tokens), 64 new tokens each.

    python3 benchmarks/gpu_eval.py --out results/                 # on the GPU machine (no MLflow/Prefect)
    python3 benchmarks/gpu_eval.py --shape llama-tiny --prompts 64  # a CPU smoke run

1. generation: new tokens/s of `generate_reference` (model.generate, batches of 64, as before)
   and `generate_fast`, in bf16 and fp32; every prompt's greedy tokens compared, and where
   they differ, the two top logits at the first differing token, against bf16 (or fp32)
   rounding at that magnitude;
2. phases: LoRA training (the GPU fast path) -> save adapter -> load base + adapter ->
   evaluate -> merged export -> reload, each timed.
Prints one JSON document and writes it to --out.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def make_prompts(tok, n: int, median: int, seed: int = 0) -> list[str]:
    """Texts of log-normal token length (sigma 0.6, 16..1,536 tokens) from the tokenizer's vocabulary."""
    rng = random.Random(seed)
    special = set(tok.all_special_ids)
    vocab = [i for i in range(len(tok)) if i not in special]
    out = []
    for _ in range(n):
        length = int(min(1536, max(16, rng.lognormvariate(math.log(median), 0.6))))
        text = tok.decode([rng.choice(vocab) for _ in range(length)])
        ids = tok(text, add_special_tokens=False)["input_ids"][:length]   # re-encoded: about `length` tokens
        out.append(tok.decode(ids))
    return out


def new_tokens(tok, texts_ids) -> int:
    return sum(len(t) for t in texts_ids)


def reference_ids(model, tok, prompts, max_new, batch_size=64):
    """Today's path (model.generate in batches of 64), returning new token ids per prompt."""
    import torch

    tok.padding_side = "left"
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    out = {}
    with torch.no_grad():
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            enc = tok([prompts[j] for j in idx], return_tensors="pt", padding=True).to(model.device)
            gen = model.generate(**enc, max_new_tokens=max_new, do_sample=False, use_cache=True,
                                 pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
            for j, row in zip(idx, gen[:, enc["input_ids"].shape[1]:].tolist()):
                out[j] = []
                for t in row:              # up to the first end of sequence (padding after it)
                    out[j].append(t)
                    if t == tok.eos_token_id:
                        break
    return [out[j] for j in range(len(prompts))]


def first_difference(model, tok, prompt: str, a: list[int], b: list[int], eps: float) -> dict:
    """At the first token where two greedy outputs part: the top two logits (one row, no
    padding) and whether their gap is within rounding (eps x the larger magnitude)."""
    import torch

    k = next(i for i in range(min(len(a), len(b)) + 1) if i == min(len(a), len(b)) or a[i] != b[i])
    ids = tok(prompt)["input_ids"] + a[:k]
    with torch.no_grad():
        logits = model(torch.tensor([ids], device=model.device)).logits[0, -1].float()
    top = torch.topk(logits, 2)
    gap = (top.values[0] - top.values[1]).item()
    bound = eps * max(abs(top.values[0].item()), 1.0) * 4
    return {"at_token": k, "top2": [round(v, 5) for v in top.values.tolist()], "gap": gap,
            "tokens": [a[k] if k < len(a) else None, b[k] if k < len(b) else None],
            "within_rounding": gap <= bound}


def bench_generation(base: Path, prompts: list[str], max_new: int, dtype_name: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ftpipe.evaluation.generation import generate_fast

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    tok = AutoTokenizer.from_pretrained(base)
    tok.pad_token = tok.pad_token or tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype, device_map={"": 0}
                                                 if torch.cuda.is_available() else None)
    model.eval()
    reference_ids(model, tok, prompts[:64], 4)            # warm-up of both paths
    generate_fast(model, tok, prompts[:64], 4, return_ids=True)
    res = {}
    for name, fn in (("reference", lambda: reference_ids(model, tok, prompts, max_new)),
                     ("fast", lambda: generate_fast(model, tok, prompts, max_new, return_ids=True))):
        sync()
        t0 = time.perf_counter()
        got = fn()
        sync()
        sec = time.perf_counter() - t0
        res[name] = {"seconds": round(sec, 2), "new_tokens": new_tokens(tok, got),
                     "tokens_per_s": round(new_tokens(tok, got) / sec), "ids": got}
    ref, fast = res["reference"].pop("ids"), res["fast"].pop("ids")
    differ = [i for i in range(len(prompts)) if ref[i] != fast[i]]
    eps = {"bf16": 2 ** -8, "fp32": 2 ** -23}[dtype_name]
    details = [first_difference(model, tok, prompts[i], ref[i], fast[i], eps) | {"prompt": i} for i in differ[:50]]
    res.update({"dtype": dtype_name, "prompts": len(prompts), "identical": len(prompts) - len(differ),
                "identical_share": round(1 - len(differ) / len(prompts), 4),
                "speedup": round(res["fast"]["tokens_per_s"] / res["reference"]["tokens_per_s"], 2),
                "differences": details,
                "all_differences_within_rounding": all(d["within_rounding"] for d in details)})
    return res


def phases(base: Path, work: Path, steps: int) -> dict:
    """train (fast path) -> save adapter -> load base + adapter -> evaluate -> merged export -> reload."""
    import torch
    from transformers import AutoModelForCausalLM

    from ftpipe.config import EvalConfig, LoraConfig, ModelConfig, TrainConfig
    from ftpipe.evaluation.generation import load_for_eval
    from ftpipe.evaluation.scoring import evaluate_loaded
    from ftpipe.files import read_jsonl
    from ftpipe.serving.export import export_merged
    from ftpipe.training.launch import train

    rows = read_jsonl(REPO / "data/sources/dates.jsonl")
    (work / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:2400]))
    test = rows[2400:2656]
    t = {}
    t0 = time.perf_counter()
    res = train(ModelConfig(base=str(base)), LoraConfig(r=16, alpha=32),
                TrainConfig(method="lora", max_steps=steps, batch_size=32, lr=1e-3, warmup_steps=5,
                            log_every=max(1, steps // 4), checkpoint_every=0),
                str(work / "train.jsonl"), None, work / "run", log=lambda m: None)
    t["train_s"] = round(time.perf_counter() - t0, 2)
    t["train_tokens_per_s"] = round(res.tokens / res.seconds)
    t["adapter_bytes"] = sum(f.stat().st_size for f in Path(res.adapter_dir).iterdir() if f.is_file())
    sync()
    t0 = time.perf_counter()
    model, tok = load_for_eval(str(base), adapter=res.adapter_dir)
    sync()
    t["load_base_plus_adapter_s"] = round(time.perf_counter() - t0, 2)
    t0 = time.perf_counter()
    scores = evaluate_loaded(model, tok, test, EvalConfig(batch_size=64, max_new_tokens=24), 256, "candidate")
    sync()
    t["evaluate_s"] = round(time.perf_counter() - t0, 2)
    t["evaluate_rows"] = len(test)
    t["exact_match"] = scores.exact_match
    del model
    t0 = time.perf_counter()
    exp = export_merged(str(base), res.adapter_dir, work / "merged")
    t["merged_export_s"] = round(time.perf_counter() - t0, 2)
    t["merged_bytes"], t["merged_files"] = exp.bytes, exp.files
    t0 = time.perf_counter()
    again = AutoModelForCausalLM.from_pretrained(work / "merged", dtype=torch.bfloat16,
                                                 device_map={"": 0} if torch.cuda.is_available() else None)
    sync()
    t["reload_merged_s"] = round(time.perf_counter() - t0, 2)
    del again
    return t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama-3.2-1b")
    ap.add_argument("--prompts", type=int, default=1024)
    ap.add_argument("--median", type=int, default=200)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--train-steps", type=int, default=60)
    ap.add_argument("--dtypes", default="bf16,fp32")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    import torch
    from transformers import AutoTokenizer

    from ftpipe.training.families import random_model

    work = Path(tempfile.mkdtemp(prefix="ftpipe-gpu-eval-"))
    t0 = time.perf_counter()
    base = random_model("llama", work / "base", shape=args.shape, dtype="bfloat16", shard="2GB")
    doc = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
           "torch": torch.__version__, "shape": args.shape, "build_s": round(time.perf_counter() - t0, 1)}
    tok = AutoTokenizer.from_pretrained(base)
    prompts = make_prompts(tok, args.prompts, args.median)
    lengths = sorted(len(tok(p)["input_ids"]) for p in prompts)
    doc["prompt_tokens"] = {"median": lengths[len(lengths) // 2], "p10": lengths[len(lengths) // 10],
                            "p90": lengths[9 * len(lengths) // 10], "max": lengths[-1]}
    doc["generation"] = {}
    for d in args.dtypes.split(","):
        doc["generation"][d] = bench_generation(base, prompts, args.new, d)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        print(json.dumps({d: {k: v for k, v in doc["generation"][d].items() if k != "differences"}}), flush=True)
    doc["phases"] = phases(base, work, args.train_steps)
    text = json.dumps(doc, indent=2)
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gpu_eval.json").write_text(text)


if __name__ == "__main__":
    main()
