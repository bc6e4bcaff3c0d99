#!/usr/bin/env python3
"""DPO throughput: ftpipe's `fine_tune` (train.objective: dpo) vs TRL's DPOTrainer, on the same
card, the same preference pairs, LoRA r16 on all linear layers, bf16.

    python3 benchmarks/dpo_throughput.py --out DIR              # Llama-3.2-1B shape, both, one call
    python3 benchmarks/dpo_throughput.py --out DIR --quick      # tiny shape, CPU or GPU: a smoke test

The model is randomly initialised from the real config (benchmarks/configs/, no weight
download) and saved with a word-level tokenizer whose words are the model's token ids, so
both trainers read the same text and see the same tokens. Pairs: a prompt (log-normal
length, median 192 tokens) and two answers (median 96 tokens each), fixed seed.

Both take 64 pairs a step (16 a micro-batch x 4), lr 5e-5 with linear decay and no warm-up,
beta 0.1, sigmoid loss, AdamW, grad norm 1.0. TRL scores the reference with the adapter
disabled each step (its default); ftpipe scores it once before the first step. Measured:
real tokens/s over the timed steps (each pair's prompt counted with each answer, as both
compute them), the warm-up apart; the setup (model load, reference pass where precomputed,
compile) and the time from load to the last step; peak GiB; the mean DPO loss of the last 5 steps.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

PER_STEP, MICRO = 64, 16
LR, BETA = 5e-5, 0.1


def make_pairs(n: int, vocab: int, seed: int = 0) -> list[dict]:
    import numpy as np

    rng = np.random.default_rng(seed)

    def words(median: float, lo: int, hi: int) -> str:
        n_tok = int(np.clip(np.rint(np.exp(rng.normal(math.log(median), 0.6))), lo, hi))
        return " ".join(f"t{i}" for i in rng.integers(10, vocab - 1, n_tok))

    return [{"_format": "preference", "prompt": words(192, 16, 1024), "chosen": " " + words(96, 4, 512),
             "rejected": " " + words(96, 4, 512)} for _ in range(n)]


def save_model_and_tokenizer(cfg, dest: Path) -> Path:
    import torch
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2} | {f"t{i}": i for i in range(3, cfg.vocab_size)}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.config.pad_token_id, model.config.eos_token_id = 0, 1
    model.save_pretrained(dest)
    fast.save_pretrained(dest)
    return dest


def pair_tokens(tok, pairs: list[dict]) -> list[int]:
    """Real tokens of each pair as computed: prompt + chosen + EOS, prompt + rejected + EOS."""
    out = []
    for p in pairs:
        n_p = len(tok(p["prompt"])["input_ids"])
        out.append(2 * n_p + len(tok(p["chosen"])["input_ids"]) + len(tok(p["rejected"])["input_ids"]) + 2)
    return out


def run_ftpipe(model_dir: Path, pairs: list[dict], steps: int, warmup: int, work: Path) -> dict:
    import torch

    from ftpipe.config import LoraConfig, ModelConfig, TrainConfig
    from ftpipe.training.recipe import fine_tune
    from ftpipe.training.step import step_examples
    from transformers import AutoTokenizer

    (work / "train.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    tok = AutoTokenizer.from_pretrained(model_dir)
    lengths = pair_tokens(tok, pairs)
    stamps, losses = [], []

    def on_metrics(step, m):
        if "train_loss" in m:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            stamps.append((step, time.perf_counter()))
            losses.append(m["train_loss"])

    total = warmup + steps
    cfg = TrainConfig(method="lora", objective="dpo", max_steps=total, batch_size=MICRO, grad_accum=PER_STEP // MICRO,
                      lr=LR, schedule="linear", min_lr_ratio=0.0, warmup_steps=0, log_every=1,
                      checkpoint_every=0, max_seq_len=4096, eval_every=0)
    cfg = cfg.model_copy(update={"dpo": cfg.dpo.model_copy(update={"beta": BETA})})
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    fine_tune(ModelConfig(base=str(model_dir)), LoraConfig(r=16, alpha=32), cfg, work / "train.jsonl", None,
              work / "out", log=lambda m: print("  ftpipe:", m, flush=True), on_metrics=on_metrics, progress=False)
    wall = stamps[-1][1] - t0
    times = [b - a for (_, a), (_, b) in zip(stamps, stamps[1:])]
    tokens = [sum(lengths[i] for i in step_examples(len(pairs), PER_STEP, 0, s)) for s in range(total)]
    return {"setup_s": stamps[0][1] - t0, "wall_s": wall, "step_s": times[warmup - 1:], "tokens": tokens[warmup:],
            "losses": losses, "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None}


def run_trl(model_dir: Path, pairs: list[dict], steps: int, warmup: int, work: Path, precompute: bool = False) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig as PeftLoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    cuda = torch.cuda.is_available()
    tok = AutoTokenizer.from_pretrained(model_dir)
    lengths = pair_tokens(tok, pairs)
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16 if cuda else torch.float32,
                                                 attn_implementation="sdpa").to("cuda" if cuda else "cpu")
    times, losses, mark = [], [], {}

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()
            mark["t"] = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - mark["t"])

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    class Sequential(DPOTrainer):
        def _get_train_sampler(self, *args, **kwargs):
            return torch.utils.data.SequentialSampler(self.train_dataset)

    total = warmup + steps
    order = [pairs[i % len(pairs)] for i in range(total * PER_STEP)]
    data = Dataset.from_list([{k: p[k] for k in ("prompt", "chosen", "rejected")} for p in order])
    args = DPOConfig(output_dir=str(work / "trl"), per_device_train_batch_size=MICRO,
                     gradient_accumulation_steps=PER_STEP // MICRO, max_steps=total, learning_rate=LR,
                     lr_scheduler_type="linear", warmup_steps=0, beta=BETA, loss_type=["sigmoid"], logging_steps=1,
                     report_to="none", save_strategy="no", disable_tqdm=True, bf16=cuda, use_cpu=not cuda,
                     gradient_checkpointing=False, max_length=None, dataloader_num_workers=0,
                     precompute_ref_log_probs=precompute)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer = Sequential(model=model, args=args, train_dataset=data, processing_class=tok,
                         peft_config=PeftLoraConfig(r=16, lora_alpha=32, target_modules="all-linear",
                                                    task_type="CAUSAL_LM"), callbacks=[Timer()])
    setup = time.perf_counter() - t0
    trainer.train()
    wall = time.perf_counter() - t0
    tokens = [sum(lengths[i % len(pairs)] for i in range(s * PER_STEP, (s + 1) * PER_STEP)) for s in range(total)]
    return {"setup_s": setup, "wall_s": wall, "step_s": times[warmup:], "tokens": tokens[warmup:], "losses": losses,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None}


VARIANTS = ("ftpipe", "trl", "trl-precompute")


def one(name: str, model_dir: str, n_pairs: int, vocab: int, steps: int, warmup: int, out_json: str) -> None:
    pairs = make_pairs(n_pairs, vocab)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            if name == "ftpipe":
                res = run_ftpipe(Path(model_dir), pairs, steps, warmup, Path(tmp))
            else:
                res = run_trl(Path(model_dir), pairs, steps, warmup, Path(tmp), precompute=name == "trl-precompute")
            tps = sum(res["tokens"][: len(res["step_s"])]) / sum(res["step_s"])
            last = res["losses"][-5:]
            res |= {"name": name, "tokens_per_s": tps, "final_loss": sum(last) / len(last), "steps": steps,
                    "warmup": warmup, "spread": (min(res["step_s"]), max(res["step_s"]))}
        except Exception:  # noqa: BLE001 - one variant's failure is reported, the others still run
            res = {"name": name, "error": traceback.format_exc()[-3000:]}
    Path(out_json).write_text(json.dumps(res, indent=2))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", default=",".join(VARIANTS))
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    from benchmarks.train_throughput import load_config

    cfg = load_config("llama-3.2-1b", a.quick)
    steps, warmup = (3, 1) if a.quick else (a.steps, a.warmup)
    n_pairs = PER_STEP * (steps + warmup)
    if a.one:
        one(a.one, a.model_dir, n_pairs, cfg.vocab_size, steps, warmup, str(out / f"{a.one}.json"))
        return
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = save_model_and_tokenizer(cfg, Path(tmp) / "model")
        for name in a.only.split(","):
            print(f"== {name}", flush=True)
            proc = subprocess.run([sys.executable, __file__, "--out", str(out), "--one", name, "--model-dir",
                                   str(model_dir), "--steps", str(steps), "--warmup", str(warmup)]
                                  + (["--quick"] if a.quick else []), env=os.environ | {"PYTHONUNBUFFERED": "1"})
            f = out / f"{name}.json"
            results.append(json.loads(f.read_text()) if f.is_file() else {"name": name, "error": f"exit {proc.returncode}"})
            print(json.dumps({k: v for k, v in results[-1].items() if k not in ("step_s", "tokens", "losses")}), flush=True)
    import torch

    card = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    by = {r["name"]: r for r in results}
    lines = [f"DPO, LoRA r16, {'tiny' if a.quick else 'Llama-3.2-1B'} shape, {card}, {time.strftime('%Y-%m-%d')}",
             "| variant | tokens/s (timed steps) | step s (min-max) | setup s | load to last step s | peak GiB | loss (last 5 steps) |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['name']} | failed: {r['error'].splitlines()[-1][:120]} | | | | | |")
        else:
            lines.append(f"| {r['name']} | {r['tokens_per_s']:,.0f} | {r['spread'][0]:.3f}-{r['spread'][1]:.3f} | "
                         f"{r['setup_s']:.1f} | {r['wall_s']:.1f} | {r['peak_gib'] or 0:.1f} | {r['final_loss']:.4f} |")
    for other in ("trl", "trl-precompute"):
        if "tokens_per_s" in by.get("ftpipe", {}) and "tokens_per_s" in by.get(other, {}):
            f, t = by["ftpipe"], by[other]
            lines.append(f"ftpipe / {other}: {f['tokens_per_s'] / t['tokens_per_s']:.2f}x tokens/s; loss "
                         f"{f['final_loss']:.4f} vs {t['final_loss']:.4f} ({100 * (f['final_loss'] / t['final_loss'] - 1):+.1f}%)")
    (out / "dpo_throughput.md").write_text("\n".join(lines) + "\n")
    (out / "dpo_throughput.json").write_text(json.dumps(results, indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
