#!/usr/bin/env python3
"""GPU training throughput: ftpipe's recipe vs the widely published HF Trainer recipe vs
TRL's SFTTrainer, on the same card, the same examples in the same order.

    python3 benchmarks/train_throughput.py --out DIR            # every variant, one call
    python3 benchmarks/train_throughput.py --out DIR --only llama-3.2-1b/ftpipe
    python3 benchmarks/train_throughput.py --out DIR --quick    # tiny shapes, CPU or GPU: a smoke test

Models are randomly initialised from the real architecture configs in benchmarks/configs/
(no weight downloads). Data: synthetic instruction examples, fixed seed, lengths
log-normal around a median of 256 tokens (sigma 0.9) clipped to [16, 2048], the first 30%
of each example a prompt masked from the loss; 64 examples per optimizer step.

Each variant runs in its own process (a clean peak-memory reading); DDP variants under
torchrun. Measured: real (non-pad) tokens/s over the timed steps (warm-up reported
apart), peak `max_memory_allocated`, MFU against 989 TFLOP/s (bf16 dense, H100/H200 SXM),
and the loss at the last step.

FLOPs per example of L tokens (N = parameters of the linear layers incl. the output
layer, d = heads x head_dim, layers = decoder layers):
    full fine-tune   6*N*L + 6*layers*d*L^2            (causal attention: half of L^2 scored)
    LoRA / QLoRA     2/3 of that + 6*N_adapter*L        (no weight gradients for frozen weights)

ftpipe's variants call the recipe's own building blocks (ftpipe.training.recipe.prepare_model,
pack_flat, the ftpipe_varlen attention, LossModel's chunked loss, fused AdamW, the same
token-weighted loss over a step) on pre-tokenized examples; the pipeline's fine_tune
loop drives the same calls.
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

PEAK = 989e12
PER_STEP = 64
STEPS = 20       # timed optimizer steps per variant, after its warm-up

# name -> settings. recipe: ftpipe | reference | trl. budget: tokens per micro-batch.
PADDED = dict(recipe="ftpipe", packing=False, chunk=0, budget=2048, kernels="none",
              note="bf16 reference: padded batches, full logits, no Liger")
NO_LIGER = dict(recipe="ftpipe", budget=16384, kernels="none", note="varlen + chunked CE, no Liger")
L1, Q05, L8 = "llama-3.2-1b", "qwen2.5-0.5b", "llama-3.1-8b"
VARIANTS: dict[str, dict] = {
    # the seed recipe (fp32, ~5.5 s a step on an H200): 8 timed steps, the denominator of a ratio
    f"{L1}/reference": dict(model=L1, recipe="reference", method="lora", warmup=1, steps=8),
    f"{L1}/trl": dict(model=L1, recipe="trl", method="lora"),
    f"{L1}/ftpipe-padded": dict(model=L1, method="lora", **PADDED),
    # ftpipe as a GPU run of the pipeline trains: packed varlen rows, fused CE, torch.compile
    f"{L1}/ftpipe": dict(model=L1, recipe="ftpipe", method="lora", budget=16384, compile=True, warmup=3),
    f"{L1}/ftpipe-eager": dict(model=L1, recipe="ftpipe", method="lora", budget=16384,
                               note="no torch.compile (Liger RMSNorm/SwiGLU/RoPE instead)"),
    f"{L1}/ftpipe-noliger": dict(model=L1, method="lora", **NO_LIGER),
    f"{L1}/ftpipe-peftcast": dict(model=L1, recipe="ftpipe", method="lora", budget=16384, peft_cast=True,
                                  note="eager, peft casting each adapter input to fp32 (its default)"),
    f"{L1}/ftpipe-ddp2": dict(model=L1, recipe="ftpipe", method="lora", budget=16384, devices=2),
    f"{L1}/ftpipe-32k": dict(model=L1, recipe="ftpipe", method="lora", budget=32768, compile=True, warmup=3,
                             note="32,768-token micro-batches"),
    f"{Q05}/ftpipe-padded": dict(model=Q05, method="full", **PADDED),
    f"{Q05}/ftpipe": dict(model=Q05, recipe="ftpipe", method="full", budget=16384, compile=True, warmup=3),
    f"{Q05}/ftpipe-eager": dict(model=Q05, recipe="ftpipe", method="full", budget=16384,
                                note="no torch.compile (Liger kernels instead)"),
    f"{Q05}/ftpipe-noliger": dict(model=Q05, method="full", **NO_LIGER),
    f"{Q05}/ftpipe-4k": dict(model=Q05, recipe="ftpipe", method="full", budget=4096,
                             note="eager, 4,096-token micro-batches (memory target)"),
    f"{Q05}/ftpipe-gc": dict(model=Q05, recipe="ftpipe", method="full", budget=16384, gc=True,
                             note="eager, activation checkpointing, 16k"),
    f"{Q05}/ftpipe-gc-32k": dict(model=Q05, recipe="ftpipe", method="full", budget=32768, gc=True, compile=True,
                                 warmup=3, note="checkpointing + compile, 32,768-token micro-batches"),
    f"{Q05}/ftpipe-8k": dict(model=Q05, recipe="ftpipe", method="full", budget=8192, compile=True, warmup=3,
                             note="no checkpointing, 8,192-token micro-batches"),
    f"{Q05}/ftpipe-12k": dict(model=Q05, recipe="ftpipe", method="full", budget=12288, compile=True, warmup=3,
                              note="no checkpointing, 12,288-token micro-batches"),
    f"{Q05}/ftpipe-gc-32k-flce": dict(model=Q05, recipe="ftpipe", method="full", budget=32768, gc=True, compile=True,
                                      warmup=3, liger=True, note="as gc-32k, with Liger's fused linear cross-entropy"),
    f"{Q05}/ftpipe-gc-32k-c2k": dict(model=Q05, recipe="ftpipe", method="full", budget=32768, gc=True, compile=True,
                                     warmup=3, chunk=2048, note="as gc-32k, loss chunks of 2,048 tokens"),
    f"{L1}/ftpipe-liger": dict(model=L1, recipe="ftpipe", method="lora", budget=16384, compile=True, warmup=3,
                               liger=True, note="as ftpipe, Liger's fused linear cross-entropy instead of ftpipe's"),
    f"{L8}/ftpipe": dict(model=L8, recipe="ftpipe", method="lora", budget=6144, warmup=3, compile=True),
    f"{L8}/ftpipe-padded": dict(model=L8, method="lora", steps=8, **PADDED),
    f"{L8}/ftpipe-eager": dict(model=L8, recipe="ftpipe", method="lora", budget=6144, warmup=2,
                               note="no torch.compile"),
    f"{L8}/ftpipe-qlora": dict(model=L8, recipe="ftpipe", method="qlora", budget=2048, gc=True, warmup=1,
                               note="NF4 + double quant, 2,048-token micro-batches, checkpointing"),
    f"{L8}/ftpipe-qlora-nogc": dict(model=L8, recipe="ftpipe", method="qlora", budget=2048, warmup=1,
                                    note="NF4, 2,048-token micro-batches, no checkpointing"),
    f"{L8}/ftpipe-qlora-8k": dict(model=L8, recipe="ftpipe", method="qlora", budget=8192, gc=True,
                                  warmup=1, note="NF4, sequences up to 2,048 packed 8,192 tokens a micro-batch, "
                                                 "checkpointing"),
    f"{L8}/ftpipe-qlora-8k-compile": dict(model=L8, recipe="ftpipe", method="qlora", budget=8192, gc=True,
                                          compile=True, warmup=2,
                                          note="NF4, 8,192-token micro-batches, checkpointing, torch.compile"),
    f"{L8}/ftpipe-qlora-7k-compile": dict(model=L8, recipe="ftpipe", method="qlora", budget=7168, gc=True,
                                          compile=True, warmup=2,
                                          note="NF4, 7,168-token micro-batches, checkpointing, torch.compile"),
    f"{L8}/ftpipe-qlora-6k-compile": dict(model=L8, recipe="ftpipe", method="qlora", budget=6144, gc=True,
                                          compile=True, warmup=2,
                                          note="NF4, 6,144-token micro-batches, checkpointing, torch.compile"),
    f"{L8}/ftpipe-qlora-16k": dict(model=L8, recipe="ftpipe", method="qlora", budget=16384, gc=True,
                                   warmup=1, note="NF4, 16,384-token micro-batches, checkpointing"),
}
QUICK = {"llama-3.2-1b": "tiny-llama", "qwen2.5-0.5b": "tiny-qwen", "llama-3.1-8b": "tiny-llama"}


# ------------------------------------------------------------------ data and FLOPs

def make_examples(n: int, vocab: int, seed: int = 0, max_len: int = 2048) -> list[tuple[list[int], list[int]]]:
    import numpy as np

    rng = np.random.default_rng(seed)
    lengths = np.clip(np.rint(np.exp(rng.normal(math.log(256), 0.9, n))), 16, max_len).astype(int)
    out = []
    for L in lengths:
        ids = rng.integers(10, vocab - 1, int(L)).tolist()
        p = int(0.3 * L)
        out.append((ids, [-100] * p + ids[p:]))
    return out


def linear_params(cfg) -> tuple[int, int]:
    """(parameters of the decoder layers' linear maps, parameters of the output layer)."""
    h, layers, inter = cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size
    heads = cfg.num_attention_heads
    hd = getattr(cfg, "head_dim", None) or h // heads
    kv = getattr(cfg, "num_key_value_heads", heads)
    per_layer = h * heads * hd + 2 * h * kv * hd + heads * hd * h + 3 * h * inter
    return layers * per_layer, cfg.vocab_size * h


def attention_width(cfg) -> int:
    """Query heads x head size: the width of the attention scores' products."""
    heads = cfg.num_attention_heads
    return heads * (getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)


def labelled(labels: list[int]) -> int:
    """Positions whose next token is a label: the only ones whose logits the loss needs."""
    return sum(1 for x in labels[1:] if x != -100)


def step_flops(cfg, examples, method: str, n_adapter: int, head_all: bool) -> float:
    """The model FLOPs of one optimizer step over `examples` ((ids, labels) pairs), counting
    the work the recipe does: the output layer on every token where it computes full logits
    (head_all), else only on the labelled positions (ftpipe's chunked loss); no recomputation
    (checkpointing) counted, as MFU is defined. Frozen weights (LoRA, QLoRA) get no weight
    gradient: 4 FLOPs per parameter and token instead of 6; attention has no weights, so its
    backward is done in full either way."""
    body, head = linear_params(cfg)
    d = attention_width(cfg)
    per_weight = 6 if method == "full" else 4
    total = 0.0
    for ids, labels in examples:
        L = len(ids)
        total += per_weight * (body * L + head * (L if head_all else labelled(labels)))
        total += 6 * cfg.num_hidden_layers * d * L * L   # causal: half of L^2 scored, fwd + 2x bwd
        if method != "full":
            total += 6 * n_adapter * L
    return total


def step_flops_old(cfg, lengths: list[int], method: str, n_adapter: int) -> float:
    """The accounting of the figures before 2026-12-01: the output layer on every token, and
    LoRA's 2/3 applied to attention too. Reported beside the new figure once."""
    body, head = linear_params(cfg)
    n = body + head
    d = attention_width(cfg)
    full = sum(6 * n * L + 6 * cfg.num_hidden_layers * d * L * L for L in lengths)
    if method == "full":
        return full
    return full * 2 / 3 + sum(6 * n_adapter * L for L in lengths)


# ------------------------------------------------------------------ models

def load_config(name: str, quick: bool):
    from transformers import AutoConfig

    cfg = json.loads((HERE / "configs" / f"{QUICK[name] if quick else name}.json").read_text())
    return AutoConfig.for_model(cfg.pop("model_type"), **cfg)


def build_model(cfg, dtype, device, attn: str | None = None):
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, **({"attn_implementation": attn} if attn else {}))
    return model


def quantize_nf4(model, compute_dtype):
    """Swap every decoder linear layer for a bitsandbytes NF4 (double-quantized) one, as
    from_pretrained(quantization_config=BitsAndBytesConfig(load_in_4bit...)) would."""
    import bitsandbytes as bnb
    import torch

    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, torch.nn.Linear) and name != "lm_head":
                q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      compute_dtype=compute_dtype, compress_statistics=True, quant_type="nf4",
                                      device="meta")
                w = child.weight.data.to("cpu")
                q.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4", compress_statistics=True)
                if child.bias is not None:
                    q.bias = torch.nn.Parameter(child.bias.data, requires_grad=False)
                q = q.to("cuda")
                setattr(parent, name, q)
                del child
    torch.cuda.empty_cache()
    return model


# ------------------------------------------------------------------ the ftpipe recipe

def micro_batches(examples, budget: int):
    """Consecutive examples, at most `budget` tokens per micro-batch."""
    out, cur, size = [], [], 0
    for ex in examples:
        if cur and size + len(ex[0]) > budget:
            out.append(cur)
            cur, size = [], 0
        cur.append(ex)
        size += len(ex[0])
    if cur:
        out.append(cur)
    return out


def run_ftpipe(v: dict, cfg, examples, steps: int, warmup: int, device: str, step_hook=None) -> dict:
    import torch
    import torch.distributed as dist

    from ftpipe.config import LoraConfig, TrainConfig
    from ftpipe.training.kernels import adapter_autocast
    from ftpipe.training.attention import register
    from ftpipe.training.batches import collate, pack_flat
    from ftpipe.training.loss import LossModel
    from ftpipe.training.step import forward_backward, step_inputs
    from ftpipe.training.recipe import prepare_model

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if world > 1:
        dist.init_process_group("nccl" if device == "cuda" else "gloo")
        if device == "cuda":
            torch.cuda.set_device(local)
    dev = torch.device(device, local) if device == "cuda" else torch.device("cpu")
    packing, chunk = v.get("packing", True), v.get("chunk", 4096)
    method = v["method"]
    bf16 = device == "cuda"
    dtype = torch.bfloat16 if bf16 else torch.float32
    t0 = time.perf_counter()
    # full fine-tuning keeps fp32 master weights under bf16 autocast, as the recipe does
    model = build_model(cfg, torch.float32 if method == "full" else dtype, dev, register() if packing else "sdpa")
    if method == "qlora":
        model = quantize_nf4(model, dtype)
    lora = LoraConfig(r=16, alpha=32, dropout=0.0, target_modules="all-linear")
    tc = TrainConfig(method=method, gradient_checkpointing=bool(v.get("gc")), packing=packing,
                     loss_chunk_tokens=chunk, kernels=v.get("kernels", "auto"), compile=bool(v.get("compile")))
    model = prepare_model(model, lora, tc)
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_adapter = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "lora_" in n)
    loss_model = LossModel.build(model, chunk, bool(v.get("liger")), bool(v.get("compile"))) if chunk else None
    runner = loss_model or model
    if world > 1:
        runner = torch.nn.parallel.DistributedDataParallel(runner, device_ids=[local] if device == "cuda" else None)
    opt = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=0.0, fused=device == "cuda")
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16)
    adapter_cast = adapter_autocast(model, method != "full" and bf16 and not v.get("peft_cast"))
    embed = model.get_input_embeddings()

    def build(step: int) -> list[dict]:   # the pipeline's micro_batches(): CPU work
        mine = examples[step * PER_STEP:(step + 1) * PER_STEP][rank::world]
        groups = micro_batches(mine, v.get("budget", 16384))
        out = [pack_flat(g, 4096) if packing else collate(g, 0) for g in groups]
        for b in out:
            if not packing:
                b["real"] = b["attention_mask"].sum()
            b.pop("lengths", None)
        return out

    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    setup_s = time.perf_counter() - t0
    times, losses, tokens = [], [], []
    # The loop of ftpipe.training.recipe.fine_tune: the next step's micro-batches are built while the
    # GPU works, the host waits only to read the step's loss. Each step's time runs from its
    # start to the next one's (the last one to a final synchronize).
    upcoming = build(0)
    s0 = time.perf_counter()
    for step in range(warmup + steps):
        if step == warmup and times and device == "cuda":   # warm-up (compile) apart from the timed steps
            torch.cuda.synchronize()
            now = time.perf_counter()
            times[-1] += now - s0
            s0 = now
        batches, n_label, n_real = step_inputs(upcoming, dev, world)
        step_loss = forward_backward(runner, batches, world / max(float(n_label), 1.0), embed, autocast,
                                     adapter_cast, loss_model is not None, dev)
        upcoming = build(step + 1) if step + 1 < warmup + steps else []
        if world > 1:
            dist.all_reduce(step_loss)
        losses.append(float(step_loss) / max(float(n_label), 1.0))
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step == warmup + steps - 1 and device == "cuda":
            torch.cuda.synchronize()
        now = time.perf_counter()
        times.append(now - s0)
        s0 = now
        tokens.append(int(n_real))
        if step_hook is not None:   # the profiler (profile_step.py)
            step_hook()
    out = {"setup_s": setup_s, "step_s": times, "losses": losses, "tokens": tokens, "n_adapter": n_adapter,
           "peak_gib": torch.cuda.max_memory_allocated(dev) / 2**30 if device == "cuda" else None,
           "world": world}
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return out if rank == 0 else {}


# ------------------------------------------------------------------ HF Trainer and TRL

def _tiny_tokenizer(vocab: int):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(WordLevel({"<pad>": 0, "<eos>": 1, "<unk>": 2}, unk_token="<unk>"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


class _Timer:
    def __init__(self):
        self.times, self.losses, self._t = [], [], None

    def callback(self):
        import torch
        from transformers import TrainerCallback

        timer = self

        class CB(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                timer._t = time.perf_counter()

            def on_step_end(self, args, state, control, **kw):
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                timer.times.append(time.perf_counter() - timer._t)

            def on_log(self, args, state, control, logs=None, **kw):
                if logs and "loss" in logs:
                    timer.losses.append(float(logs["loss"]))

        return CB()


def _sequential(trainer_cls):
    import torch

    class Sequential(trainer_cls):
        def _get_train_sampler(self, *args, **kwargs):  # the same examples in the same order
            return torch.utils.data.SequentialSampler(self.train_dataset)

    return Sequential


def _train_timed(trainer, timer, t0, examples, steps, warmup, device, **extra) -> dict:
    import torch

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    setup_s = time.perf_counter() - t0
    trainer.train()
    tokens = [sum(len(e[0]) for e in examples[s * PER_STEP:(s + 1) * PER_STEP]) for s in range(warmup + steps)]
    return {"setup_s": setup_s, "step_s": timer.times, "losses": timer.losses, "tokens": tokens, "world": 1,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None, **extra}


def run_reference(v: dict, cfg, examples, steps: int, warmup: int, device: str) -> dict:
    """The recipe as widely published: HF Trainer, default arguments (fp32), LoRA r=16
    alpha=32 on peft's default modules, batch 4 (x16 accumulation = 64 per step), dynamic padding."""
    import torch
    from peft import LoraConfig as PeftLoraConfig, get_peft_model
    from transformers import Trainer, TrainingArguments

    t0 = time.perf_counter()
    model = build_model(cfg, torch.float32, device)
    model = get_peft_model(model, PeftLoraConfig(r=16, lora_alpha=32, task_type="CAUSAL_LM"))
    n_adapter = sum(p.numel() for p in model.parameters() if p.requires_grad)
    data = [{"input_ids": i, "labels": lab} for i, lab in examples[: (warmup + steps) * PER_STEP]]

    def collator(batch):
        b = collate([(x["input_ids"], x["labels"]) for x in batch], 0)
        return {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"], "labels": b["labels"]}

    from ftpipe.training.batches import collate
    timer = _Timer()
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(output_dir=tmp, per_device_train_batch_size=4, gradient_accumulation_steps=16,
                                 max_steps=warmup + steps, logging_steps=1, report_to="none", save_strategy="no",
                                 disable_tqdm=True, dataloader_num_workers=0, use_cpu=device != "cuda")
        trainer = _sequential(Trainer)(model=model, args=args, train_dataset=data, data_collator=collator,
                                       callbacks=[timer.callback()])
        return _train_timed(trainer, timer, t0, examples, steps, warmup, device, n_adapter=n_adapter)


def run_trl(v: dict, cfg, examples, steps: int, warmup: int, device: str) -> dict:
    """TRL's SFTTrainer with its best documented settings that run here: bf16, padding-free
    batches, completion-only loss, Liger kernels if they load; LoRA r=16 on all linear layers."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig as PeftLoraConfig
    from trl import SFTConfig, SFTTrainer

    try:
        import liger_kernel  # noqa: F401
        liger = True
    except Exception:  # noqa: BLE001
        liger = False
    t0 = time.perf_counter()
    model = build_model(cfg, torch.bfloat16 if device == "cuda" else torch.float32, device)
    rows = [{"input_ids": ids, "completion_mask": [0 if x == -100 else 1 for x in lab]}
            for ids, lab in examples[: (warmup + steps) * PER_STEP]]
    timer = _Timer()
    with tempfile.TemporaryDirectory() as tmp:
        args = SFTConfig(output_dir=tmp, per_device_train_batch_size=16, gradient_accumulation_steps=4,
                         max_steps=warmup + steps, logging_steps=1, report_to="none", save_strategy="no",
                         disable_tqdm=True, bf16=device == "cuda", padding_free=True, completion_only_loss=True,
                         use_liger_kernel=liger, gradient_checkpointing=False, max_length=None,
                         learning_rate=1e-4, dataloader_num_workers=0, use_cpu=device != "cuda")
        trainer = _sequential(SFTTrainer)(model=model, args=args, train_dataset=Dataset.from_list(rows),
                                          processing_class=_tiny_tokenizer(cfg.vocab_size),
                                          peft_config=PeftLoraConfig(r=16, lora_alpha=32, target_modules="all-linear",
                                                                     task_type="CAUSAL_LM"),
                                          callbacks=[timer.callback()])
        n_adapter = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
        return _train_timed(trainer, timer, t0, examples, steps, warmup, device, n_adapter=n_adapter, liger=liger)


# ------------------------------------------------------------------ one variant / all of them

def one(name: str, quick: bool, out_json: str) -> None:
    import torch

    v = VARIANTS[name]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = load_config(v["model"], quick)
    steps, warmup = (2, 1) if quick else (v.get("steps", STEPS), v.get("warmup", 2))
    examples = make_examples((warmup + steps) * PER_STEP, cfg.vocab_size, max_len=512 if quick else 2048)
    runner = {"ftpipe": run_ftpipe, "reference": run_reference, "trl": run_trl}[v["recipe"]]
    try:
        res = runner(v, cfg, examples, steps, warmup, device)
    except Exception as exc:  # noqa: BLE001 - a variant that cannot run is reported, not fatal
        res = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-3000:]}
    if not res:  # a non-zero rank
        return
    if "error" not in res:
        import statistics

        timed = res["step_s"][warmup:]
        toks = res["tokens"][warmup: warmup + len(timed)]
        head_all = v["recipe"] != "ftpipe" or not v.get("chunk", 4096)
        step_examples = [examples[s * PER_STEP:(s + 1) * PER_STEP] for s in range(warmup, warmup + len(timed))]
        flops = sum(step_flops(cfg, ex, v["method"], res["n_adapter"], head_all) for ex in step_examples)
        flops_old = sum(step_flops_old(cfg, [len(e[0]) for e in ex], v["method"], res["n_adapter"])
                        for ex in step_examples)
        per_step = [t / s for t, s in zip(toks, timed)]
        mean = statistics.fmean(per_step)
        res |= {"tokens_per_s": sum(toks) / sum(timed), "mfu": flops / sum(timed) / PEAK / res["world"],
                "mfu_old": flops_old / sum(timed) / PEAK / res["world"],
                "step_tokens_per_s": per_step,
                "spread": statistics.pstdev(per_step) / mean if len(per_step) > 1 else 0.0,
                "step_min_max": [min(per_step), max(per_step)],
                "warmup_s": sum(res["step_s"][:warmup]), "loss_last": res["losses"][-1] if res["losses"] else None,
                "steps_timed": len(timed), "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                "torch": torch.__version__}
    res |= {"variant": name, **{k: v[k] for k in ("model", "recipe", "method")}, "note": v.get("note", "")}
    try:
        from torch.nn.attention.varlen import varlen_attn
        import inspect
        res["varlen_signature"] = str(inspect.signature(varlen_attn))
    except Exception as exc:  # noqa: BLE001
        res["varlen_signature"] = f"unavailable: {exc}"
    Path(out_json).write_text(json.dumps(res, indent=2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--only", default="", help="comma-separated variant names")
    ap.add_argument("--quick", action="store_true", help="tiny shapes: check the script, not the speed")
    ap.add_argument("--variant", help=argparse.SUPPRESS)
    ap.add_argument("--json", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.variant:
        one(args.variant, args.quick, args.json)
        return
    args.out.mkdir(parents=True, exist_ok=True)
    order = ["llama-3.2-1b/ftpipe", "llama-3.2-1b/ftpipe-noliger", "llama-3.2-1b/trl", "llama-3.2-1b/reference", "qwen2.5-0.5b/ftpipe",
             "qwen2.5-0.5b/ftpipe-noliger", "llama-3.1-8b/ftpipe", "llama-3.1-8b/ftpipe-qlora", "llama-3.2-1b/ftpipe-ddp2",
             "llama-3.2-1b/ftpipe-padded", "qwen2.5-0.5b/ftpipe-padded",
             "qwen2.5-0.5b/ftpipe-4k", "llama-3.2-1b/ftpipe-32k", "llama-3.1-8b/ftpipe-qlora-nogc"]
    order += [n for n in VARIANTS if n not in order]
    wanted = [n for n in args.only.split(",") if n]
    unknown = [n for n in wanted if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"--only: unknown variant(s) {', '.join(unknown)}; known: {', '.join(order)}")
    names = wanted or order
    results = []
    for name in names:
        v = VARIANTS[name]
        path = args.out / (name.replace("/", "__") + ".json")
        cmd = [sys.executable, str(Path(__file__).resolve()), "--out", str(args.out), "--variant", name,
               "--json", str(path)] + (["--quick"] if args.quick else [])
        if v.get("devices", 1) > 1:
            import torch
            n = v["devices"]
            if torch.cuda.is_available() and torch.cuda.device_count() < n:
                results.append({"variant": name, "error": f"needs {n} GPUs, {torch.cuda.device_count()} visible"})
                continue
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
                   *cmd[1:]]
        t0 = time.perf_counter()
        print(f"== {name}", flush=True)
        env = os.environ | {"OMP_NUM_THREADS": "4"}
        if v.get("devices", 1) == 1 and "CUDA_VISIBLE_DEVICES" not in os.environ:
            env["CUDA_VISIBLE_DEVICES"] = "0"   # one card: Trainer would otherwise use DataParallel
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0 or not path.is_file():
            results.append({"variant": name, "error": f"exit {proc.returncode}", "log": (proc.stdout + proc.stderr)[-3000:]})
        else:
            results.append(json.loads(path.read_text()))
        r = results[-1]
        print(f"   {time.perf_counter() - t0:.0f}s  " + (f"ERROR {r['error']}" if "error" in r else
              f"{r['tokens_per_s']:,.0f} tok/s (sd {r['spread']:.1%})  MFU {r['mfu']:.1%} (old count {r['mfu_old']:.1%})  peak {r['peak_gib'] or 0:.1f} GiB  "
              f"loss {r['loss_last']:.4f}"), flush=True)
        if "error" in r:
            print((r.get("traceback") or r.get("log") or "")[-1500:], flush=True)
        (args.out / "results.json").write_text(json.dumps(results, indent=2))   # partial results survive
        (args.out / "results.md").write_text(table(results))
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    (args.out / "results.md").write_text(table(results))
    print(table(results))


def loss_gap(r: dict, ref: dict | None) -> float | None:
    """The largest relative difference of r's loss from its bf16 reference's, step by step
    over the steps both ran (the same examples at each step)."""
    if not ref or "error" in ref or "error" in r or r is ref:
        return None
    pairs = list(zip(r.get("losses") or [], ref.get("losses") or []))
    return max(abs(a - b) / abs(b) for a, b in pairs) if pairs else None


def table(results: list[dict]) -> str:
    by = {r["variant"]: r for r in results}
    lines = []
    for model in dict.fromkeys(r["variant"].split("/")[0] for r in results):
        # the reference: the padded full-logits bf16 run, else the HF Trainer recipe, else (QLoRA) bf16 LoRA
        ref = by.get(f"{model}/ftpipe-padded") or by.get(f"{model}/reference") or by.get(f"{model}/ftpipe")
        lines += [f"### {model}", "",
                  "| variant | tokens/s | spread (sd, min-max) | MFU (work done) | MFU (old count) | peak GiB "
                  "| loss at last step | loss vs bf16 ref | steps timed | warm-up s | note |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for name, r in by.items():
            if not name.startswith(model + "/"):
                continue
            if "error" in r:
                lines.append(f"| {name} | — | — | — | — | — | — | — | — | — | could not run: {r['error'][:200]} |")
                continue
            gap = loss_gap(r, ref)
            lo, hi = r.get("step_min_max") or (0, 0)
            lines.append(f"| {name} | {r['tokens_per_s']:,.0f} | {r.get('spread', 0):.1%}, {lo:,.0f}-{hi:,.0f} | "
                         f"{r['mfu']:.1%} | {r.get('mfu_old', 0):.1%} | {(r['peak_gib'] or 0):.1f} | "
                         f"{r['loss_last']:.4f} | {'—' if gap is None else f'{gap:.2%}'} | {r.get('steps_timed')} | "
                         f"{r['warmup_s']:.1f} | {r.get('note', '')} |")
        lines.append("")
    ratio = lambda a, b: (f"{by[a]['tokens_per_s'] / by[b]['tokens_per_s']:.2f}x"  # noqa: E731
                          if a in by and b in by and "error" not in by[a] and "error" not in by[b] else "—")
    lines += ["| ratio | value |", "|---|---|",
              f"| Llama-3.2-1B ftpipe / reference | {ratio('llama-3.2-1b/ftpipe', 'llama-3.2-1b/reference')} |",
              f"| Llama-3.2-1B ftpipe / TRL | {ratio('llama-3.2-1b/ftpipe', 'llama-3.2-1b/trl')} |",
              f"| Llama-3.2-1B 2 GPUs / 1 GPU | {ratio('llama-3.2-1b/ftpipe-ddp2', 'llama-3.2-1b/ftpipe')} |",
              f"| Llama-3.2-1B 2 GPUs / 1 GPU (eager) | {ratio('llama-3.2-1b/ftpipe-ddp2', 'llama-3.2-1b/ftpipe-eager')} |",
              f"| Llama-3.1-8B QLoRA / LoRA | {ratio('llama-3.1-8b/ftpipe-qlora', 'llama-3.1-8b/ftpipe')} |",
              f"| Llama-3.1-8B QLoRA 8k / LoRA | {ratio('llama-3.1-8b/ftpipe-qlora-8k', 'llama-3.1-8b/ftpipe')} |",
              f"| Llama-3.1-8B QLoRA 8k compiled / LoRA | {ratio('llama-3.1-8b/ftpipe-qlora-8k-compile', 'llama-3.1-8b/ftpipe')} |",
              f"| Llama-3.1-8B QLoRA 7k compiled / LoRA | {ratio('llama-3.1-8b/ftpipe-qlora-7k-compile', 'llama-3.1-8b/ftpipe')} |",
              f"| Llama-3.1-8B QLoRA 6k compiled / LoRA | {ratio('llama-3.1-8b/ftpipe-qlora-6k-compile', 'llama-3.1-8b/ftpipe')} |",
              f"| Llama-3.1-8B QLoRA 16k / LoRA | {ratio('llama-3.1-8b/ftpipe-qlora-16k', 'llama-3.1-8b/ftpipe')} |", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
