"""Evaluation's greedy generation on one GPU, today's path against the new one, and a version's
life at real size: a random-initialised Llama-3.2-1B-shaped model (ftpipe.training.families),
1,024 prompts of log-normal length (median ~200 tokens), 64 new tokens each.

    python3 benchmarks/gpu_eval.py --out results/                 # on the GPU machine (no MLflow/Prefect)
    python3 benchmarks/gpu_eval.py --shape llama-tiny --prompts 64  # a CPU smoke run

1. generation: new tokens/s of `generate_reference` (model.generate, batches of 64, as before)
   and `generate_fast` (its static-cache CUDA-graph decode, and the shrinking-batch loop
   before it), in bf16 and fp32; every prompt's greedy tokens compared, and where
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


def bench_generation(base: Path, prompts: list[str], max_new: int, dtype_name: str, extra: bool = True) -> dict:
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
    for static in (True, False):
        try:
            generate_fast(model, tok, prompts[:64], 4, return_ids=True, static=static)
        except Exception as exc:  # noqa: BLE001 - the timed call reports it
            print("warm-up failed:", static, exc, flush=True)
    res = {}
    variants = [("reference", lambda: reference_ids(model, tok, prompts, max_new)),
                # the default on a GPU: a static cache, each batch's decode step one CUDA graph
                ("fast", lambda: generate_fast(model, tok, prompts, max_new, return_ids=True)),
                # the path before (2026-11-30): rows leave the batch, a growing cache, eager steps
                ("fast_shrinking", lambda: generate_fast(model, tok, prompts, max_new, return_ids=True,
                                                         static=False))]
    if dtype_name == "bf16" and extra == "budget":   # the batch limits of generate_fast (static decode)
        variants = [("fast", lambda: generate_fast(model, tok, prompts, max_new, return_ids=True)),
                    ("fast_rows256", lambda: generate_fast(model, tok, prompts, max_new, max_rows=256,
                                                           return_ids=True)),
                    ("fast_rows1024_512k", lambda: generate_fast(model, tok, prompts, max_new, max_rows=1024,
                                                                 max_batch_tokens=512 * 1024, return_ids=True)),
                    ("fast_rows2048_1m", lambda: generate_fast(model, tok, prompts, max_new, max_rows=2048,
                                                               max_batch_tokens=1024 * 1024, return_ids=True))]
    elif dtype_name == "bf16" and extra:   # what the batch size alone gives, either way
        variants += [("reference_batch256", lambda: reference_ids(model, tok, prompts, max_new, 256)),
                     ("fast_rows128", lambda: generate_fast(model, tok, prompts, max_new, max_rows=128,
                                                            return_ids=True)),
                     ("fast_rows1024", lambda: generate_fast(model, tok, prompts, max_new, max_rows=1024,
                                                             max_batch_tokens=512 * 1024, return_ids=True))]
    kept = {}
    for name, fn in variants:
        sync()
        t0 = time.perf_counter()
        try:
            got = fn()
        except Exception as exc:  # noqa: BLE001 - reported; the other variants still run
            import traceback

            res[name] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-2500:]}
            print(name, dtype_name, res[name], flush=True)
            continue
        sync()
        sec = time.perf_counter() - t0
        res[name] = {"seconds": round(sec, 2), "new_tokens": new_tokens(tok, got),
                     "tokens_per_s": round(new_tokens(tok, got) / sec)}
        kept[name] = got
        print(name, dtype_name, res[name], flush=True)
    if "reference" not in kept:
        from ftpipe.evaluation.generation import token_budget

        return res | {"dtype": dtype_name, "token_budget": token_budget(model)}
    if "fast" not in kept:
        return res | {"dtype": dtype_name}
    ref, fast = kept["reference"], kept["fast"]
    for name in kept:
        res[name]["identical_to_reference"] = sum(a == b for a, b in zip(ref, kept[name]))
    differ = [i for i in range(len(prompts)) if ref[i] != fast[i]]
    eps = {"bf16": 2 ** -8, "fp32": 2 ** -23}[dtype_name]
    details = [first_difference(model, tok, prompts[i], ref[i], fast[i], eps) | {"prompt": i} for i in differ[:50]]
    res.update({"dtype": dtype_name, "prompts": len(prompts), "identical": len(prompts) - len(differ),
                "identical_share": round(1 - len(differ) / len(prompts), 4),
                "speedup": round(res["fast"]["tokens_per_s"] / res["reference"]["tokens_per_s"], 2),
                "differences": details,
                "all_differences_within_rounding": all(d["within_rounding"] for d in details)})
    return res


def profile_fast(base: Path, prompts: list[str], max_new: int) -> dict:
    """Where generate_fast spends its time (bf16): the top operators by GPU and by CPU time."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ftpipe.evaluation.generation import generate_fast

    tok = AutoTokenizer.from_pretrained(base)
    tok.pad_token = tok.pad_token or tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16, device_map={"": 0})
    generate_fast(model, tok, prompts[:32], 4)
    sync()
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        generate_fast(model, tok, prompts, max_new)
        sync()
    wall = time.perf_counter() - t0
    table = prof.key_averages()
    top = lambda key: [{"op": e.key[:60], "ms": round(getattr(e, key) / 1000, 1), "calls": e.count}
                       for e in sorted(table, key=lambda e: -getattr(e, key))[:15]]
    return {"prompts": len(prompts), "wall_s": round(wall, 2), "by_gpu_time": top("device_time_total"),
            "by_cpu_self_time": top("self_cpu_time_total")}


def static_compiled(base: Path, prompts: list[str], max_new: int, rows: int = 256, bucket: int = 256) -> dict:
    """An experiment, not the library's path: a static KV cache per batch (rows padded to a
    fixed count, widths bucketed) and the decode step under torch.compile (CUDA graphs).
    Times a first pass (compiles included) and a second (compiled)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, StaticCache

    tok = AutoTokenizer.from_pretrained(base)
    tok.pad_token = tok.pad_token or tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16, device_map={"": 0})
    model.eval()
    step = torch.compile(model.forward, mode="reduce-overhead")
    ids = tok(prompts)["input_ids"]
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))

    def one_pass() -> int:
        made = 0
        with torch.inference_mode():
            for b in range(0, len(order), rows):
                idx = order[b:b + rows]
                width = -(-len(ids[idx[0]]) // bucket) * bucket
                total = width + max_new
                x = torch.full((rows, width), tok.pad_token_id, dtype=torch.long)
                mask = torch.ones((rows, total), dtype=torch.long)
                for r in range(rows):
                    row = ids[idx[min(r, len(idx) - 1)]]
                    x[r, width - len(row):] = torch.tensor(row)
                    mask[r, :width - len(row)] = 0
                x, mask = x.cuda(), mask.cuda()
                pos = (mask[:, :width].cumsum(-1) - 1).clamp(min=0)
                cache = StaticCache(config=model.config, max_batch_size=rows, max_cache_len=total,
                                    device="cuda", dtype=torch.bfloat16)
                logits = model(input_ids=x, attention_mask=mask, position_ids=pos, past_key_values=cache,
                               cache_position=torch.arange(width, device="cuda"), logits_to_keep=1).logits[:, -1]
                last = pos[:, -1:]
                for t in range(max_new):
                    nxt = logits.argmax(-1, keepdim=True)
                    made += len(idx)
                    if t == max_new - 1:
                        break
                    last = last + 1
                    logits = step(input_ids=nxt, attention_mask=mask, position_ids=last, past_key_values=cache,
                                  cache_position=torch.tensor([width + t], device="cuda")).logits[:, -1].clone()
        sync()
        return made

    res = {}
    for name in ("first_pass", "second_pass"):
        t0 = time.perf_counter()
        made = one_pass()
        sec = time.perf_counter() - t0
        res[name] = {"seconds": round(sec, 2), "tokens_per_s": round(made / sec)}
        print("static_compiled", name, res[name], flush=True)
    return res | {"prompts": len(prompts), "rows": rows, "bucket": bucket}


def prefill_ab(base: Path, prompts: list[str], max_new: int, reps: int) -> dict:
    """generate_fast (bf16, static decode) with the prompts padded on the right for the prefill
    (the library's: unmasked causal attention, SDPA's flash kernel) and on the left (before:
    a padding mask, SDPA's memory-efficient kernel), interleaved `reps` times on one model:
    seconds and tokens/s of each pass, and how many prompts get the same tokens both ways."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ftpipe.evaluation import generation

    tok = AutoTokenizer.from_pretrained(base)
    tok.pad_token = tok.pad_token or tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16, device_map={"": 0})
    library = generation._right_padded_prefill
    variants = {"right": library, "left": lambda m: None}
    res, outs = {name: [] for name in variants}, {}
    generation.generate_fast(model, tok, prompts[:32], 4)
    try:
        for _ in range(reps):
            for name, fn in variants.items():
                generation._right_padded_prefill = fn
                sync()
                t0 = time.perf_counter()
                outs[name] = generation.generate_fast(model, tok, prompts, max_new, return_ids=True)
                sync()
                sec = time.perf_counter() - t0
                res[name].append({"seconds": round(sec, 3), "tokens_per_s": round(len(prompts) * max_new / sec)})
                print("prefill_ab", name, res[name][-1], flush=True)
    finally:
        generation._right_padded_prefill = library
    return res | {"same_tokens": sum(a == b for a, b in zip(outs["right"], outs["left"])), "prompts": len(prompts)}


def agreement(base: Path, work: Path, steps: int, n: int, max_new: int = 24) -> dict:
    """bf16 agreement of generate_fast with model.generate where the model is sure of its answers:
    the random model's top logits tie at most steps (any two kernels then part ways), so first it
    is fully fine-tuned `steps` steps on the date task (the rows before the last n), then both
    paths answer the last n date prompts (none of them trained on) in bf16, compared token by
    token as bench_generation does."""
    from ftpipe.config import LoraConfig, ModelConfig, TrainConfig
    from ftpipe.data.formatting import prompt_of
    from ftpipe.files import read_jsonl
    from ftpipe.training.launch import train

    rows = read_jsonl(REPO / "data/sources/dates.jsonl")
    (work / "agree-train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:-n]))
    t0 = time.perf_counter()
    res = train(ModelConfig(base=str(base)), LoraConfig(),
                TrainConfig(method="full", max_steps=steps, batch_size=32, lr=3e-4, warmup_steps=20,
                            log_every=max(1, steps // 5), checkpoint_every=0),
                str(work / "agree-train.jsonl"), None, work / "agree-full", log=lambda m: print(m, flush=True))
    trained = {"steps": steps, "train_s": round(time.perf_counter() - t0, 1), "train_loss": res.train_loss}
    print("agreement: trained", trained, flush=True)
    prompts = [prompt_of(r) for r in rows[-n:]]
    return {"trained": trained, "bf16": bench_generation(Path(res.model_dir), prompts, max_new, "bf16", extra=False)}


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
    ap.add_argument("--train-steps", type=int, default=60, help="0: no train -> export phases")
    ap.add_argument("--dtypes", default="bf16,fp32")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--lean", action="store_true", help="only the reference and the fast path")
    ap.add_argument("--budget", action="store_true", help="only generate_fast, at three batch limits")
    ap.add_argument("--profile", type=int, default=0, help="profile generate_fast on this many prompts")
    ap.add_argument("--agreement", type=int, default=0, help="full fine-tune N steps, then bf16 agreement")
    ap.add_argument("--ab", type=int, default=0, help="bf16 prefill padded right vs left, N times each")
    ap.add_argument("--static", type=int, default=0, help="the static-cache compiled experiment on this many prompts")
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
    def save():
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "gpu_eval.json").write_text(json.dumps(doc, indent=2))

    doc["generation"] = {}
    for d in [d for d in args.dtypes.split(",") if d]:   # --dtypes "": no generation comparison
        doc["generation"][d] = bench_generation(base, prompts, args.new, d,
                                                extra="budget" if args.budget else not args.lean)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        print(json.dumps({d: doc["generation"][d]})[:6000], flush=True)
        save()
    if args.agreement:
        doc["agreement"] = agreement(base, work, args.agreement, args.prompts)
        print(json.dumps(doc["agreement"])[:4000], flush=True)
        save()
    if torch.cuda.is_available() and args.ab:
        doc["prefill_ab"] = prefill_ab(base, prompts, args.new, args.ab)
        save()
    if torch.cuda.is_available() and args.profile:
        doc["profile_fast"] = profile_fast(base, prompts[:args.profile], args.new)
        print(json.dumps(doc["profile_fast"]), flush=True)
        save()
    if args.train_steps:
        doc["phases"] = phases(base, work, args.train_steps)
        print(json.dumps(doc["phases"]), flush=True)
        save()
    if torch.cuda.is_available() and args.static:
        torch.cuda.empty_cache()
        doc["static_compiled"] = static_compiled(base, prompts[:args.static], args.new)
        save()
    print(json.dumps(doc, indent=2)[:3000])


if __name__ == "__main__":
    main()
