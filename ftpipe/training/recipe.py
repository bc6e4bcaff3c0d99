"""The fine-tuning recipe: setup, loop, save — one file, top to bottom.

Importable without prefect, mlflow, dvc or great_expectations, so it runs alone on a GPU
machine, in-process or under torchrun (one process per GPU; see ftpipe/training/launch.py):

    python -m ftpipe.training.launch spec.json                    # what `ftpipe run` does per device

Defaults for the embedded task (params.yaml):
    32 examples a step x ~44 tokens = ~1,400 tokens/step; 1,200 steps ~ 16 epochs of 2,400
    training rows; LoRA r=16 on all linear layers, lr 2e-3 with 40 warm-up steps, cosine
    decay to 10%. On 2 CPU cores: ~9,000 tokens/s, ~3 minutes.

What one step is, whatever the options: `batch_size x grad_accum` examples, chosen by
(seed, step) alone — so a resumed run sees exactly the examples it would have seen, and
N processes under torchrun split each step's examples between them (rank r takes every
N-th) and weight their losses by labelled tokens, so the step is the same as on one device.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ftpipe.config import LoraConfig, ModelConfig, TrainConfig, digest
from ftpipe.training.batches import pack_flat, collate, encode, pack
from ftpipe.files import read_jsonl
from ftpipe.training.models import load_base, pick_dtype
from ftpipe.training.loss import LossModel, mean_loss
from ftpipe.training.step import neftune_hook, forward_backward, step_examples, step_inputs
from ftpipe.training.checkpoints import (verified_checkpoints, full_state, is_fsdp, load_trainable, save_checkpoint, trainable_state)


class TrainingDiverged(RuntimeError):
    """The loss became NaN/inf or exploded: nothing from this run may be registered."""


@dataclass(frozen=True)
class TrainResult:
    model_dir: str            # a full HF checkpoint, loadable with from_pretrained, no peft
    adapter_dir: str | None   # the LoRA adapter (safetensors), for lora/qlora
    method: str
    steps: int                # optimizer steps taken (fewer than max_steps after early stopping)
    train_loss: float         # mean loss over the last logging window
    val_loss: float | None    # of the exported weights
    tokens: int               # real (non-pad) tokens seen, all processes
    seconds: float
    loss_history: list[tuple[int, float]] = field(default_factory=list)
    val_history: list[tuple[int, float]] = field(default_factory=list)
    best_step: int | None = None
    resumed_from: int | None = None
    stopped_early: bool = False



# ------------------------------------------------------------------ data order


# ------------------------------------------------------------------ NEFTune


# ------------------------------------------------------------------ evaluation


# ------------------------------------------------------------------ one optimizer step


# ------------------------------------------------------------------ checkpoints


# ------------------------------------------------------------------ the recipe

def _checkpointing(model) -> None:
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):   # transformers >= 5.2x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def training_dir(root: str | Path, model: ModelConfig, lora: LoraConfig, train: TrainConfig, data_key: str) -> Path:
    """Where a training keeps its checkpoints and exports, keyed by the recipe and the data
    (runs/train-KEY): a crashed `ftpipe run` started again finds and resumes its own."""
    recipe = [model.model_dump(mode="json"), lora.model_dump(mode="json"), train.model_dump(mode="json"), data_key]
    return Path(root) / "runs" / f"train-{digest(recipe, 12)}"


def prepare_model(model, lora_cfg: LoraConfig, train_cfg: TrainConfig):
    """Gradient checkpointing and adapters for the method; the same for the pipeline and the
    benchmarks. QLoRA/int8: the quantized base is frozen and stays as loaded (its embeddings,
    output layer and norms are NOT upcast to fp32 as peft's prepare_model_for_kbit_training
    would: 4 GiB more for an 8B model, for no gain with bf16 compute)."""
    import torch

    train_cfg = train_cfg.resolved(torch.cuda.is_available(), int(os.environ.get("WORLD_SIZE", "1")))
    adapter = train_cfg.method in ("lora", "qlora")
    if train_cfg.kernels == "auto" and not train_cfg.compile:
        # (compiled layers get their RMSNorm/SwiGLU/RoPE fused by inductor instead)
        from ftpipe.training.kernels import apply_liger
        apply_liger(model)
    if adapter:
        model.requires_grad_(False)
    if train_cfg.gradient_checkpointing:
        # Recompute activations in the backward pass: ~30% slower, far less memory.
        _checkpointing(model)
        if adapter:
            model.enable_input_require_grads()
    if adapter:
        import warnings

        from peft import LoraConfig as PeftLoraConfig, get_peft_model
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")  # peft 0.21 on transformers 5
        model = get_peft_model(model, PeftLoraConfig(
            r=lora_cfg.r, lora_alpha=lora_cfg.alpha, lora_dropout=lora_cfg.dropout,
            target_modules=lora_cfg.target_modules, use_dora=lora_cfg.use_dora,
            use_rslora=lora_cfg.use_rslora, task_type="CAUSAL_LM"))
    if train_cfg.compile:
        from ftpipe.training.kernels import compile_layers
        compile_layers(model)
    return model


def fine_tune(model_cfg: ModelConfig, lora_cfg: LoraConfig, train_cfg: TrainConfig,
              train_path: str | Path, val_path: str | Path | None, out_dir: str | Path,
              log: Callable[[str], None] = print,
              on_metrics: Callable[[int, dict], None] | None = None,
              progress: bool | None = None) -> TrainResult:
    import torch
    import torch.distributed as dist

    start = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    # ---- setup: processes ---------------------------------------------------------------
    # Under torchrun each process trains on its share of every step; rank 0 logs and saves.
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    main = rank == 0
    say = log if main else (lambda msg: None)
    train_cfg = train_cfg.resolved(torch.cuda.is_available(), world)
    torch.manual_seed(train_cfg.seed)
    random.seed(train_cfg.seed)

    # ---- setup: model, adapters -------------------------------------------------------
    dtype = pick_dtype(train_cfg.precision)
    # Full fine-tuning keeps fp32 master weights and runs the forward under autocast.
    fsdp = world > 1 and train_cfg.strategy == "fsdp"
    load_dtype = torch.float32 if train_cfg.method == "full" else dtype
    varlen = train_cfg.packing and train_cfg.packing_attention == "auto" and \
        model_cfg.attn_implementation in (None, "ftpipe_varlen")
    if varlen:
        from ftpipe.training.attention import register
        model_cfg = model_cfg.model_copy(update={"attn_implementation": register()})
    model, tokenizer = load_base(model_cfg, load_dtype, device_index=local_rank)
    device = next(model.parameters()).device
    adapter = train_cfg.method in ("lora", "qlora")
    model = prepare_model(model, lora_cfg, train_cfg)
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in trainable)
    n_total = sum(p.numel() for p in model.parameters())
    say(f"method {train_cfg.method}: {n_trainable:,} of {n_total:,} parameters train "
        f"({100 * n_trainable / n_total:.1f}%), dtype {str(dtype).split('.')[-1]}, device {device}"
        + (f", {world} processes" if world > 1 else ""))
    embed = model.get_input_embeddings()
    if train_cfg.neftune_alpha:
        embed.register_forward_hook(neftune_hook(train_cfg.neftune_alpha))
    core = model  # the unwrapped model: what is saved and evaluated
    # The loss from hidden states in chunks (not under FSDP: its root owns the output layer).
    loss_model = LossModel.build(core, train_cfg.loss_chunk_tokens, compiled=bool(train_cfg.compile)) \
        if train_cfg.loss_chunk_tokens and LossModel.supported(core) and not fsdp else None
    if world > 1:
        if train_cfg.strategy == "fsdp":
            from torch.distributed.fsdp import fully_shard

            for layer in core.get_decoder().layers if hasattr(core, "get_decoder") else []:
                fully_shard(layer)
            model = fully_shard(core)
            # fully_shard swaps every parameter for a sharded DTensor: collect them again.
            trainable = [p for p in core.parameters() if p.requires_grad]
        else:
            model = torch.nn.parallel.DistributedDataParallel(
                loss_model or core, device_ids=[local_rank] if device.type == "cuda" else None)
    elif loss_model is not None:
        model = loss_model

    # ---- setup: data ------------------------------------------------------------------
    train_rows = read_jsonl(train_path)
    if not train_rows:
        raise ValueError(f"{train_path}: no training examples")
    train_enc = [encode(tokenizer, r, train_cfg.max_seq_len, train_cfg.completion_only_loss)
                 for r in train_rows]
    val_enc = [encode(tokenizer, r, train_cfg.max_seq_len, True) for r in read_jsonl(val_path)] \
        if val_path and Path(val_path).is_file() else []
    per_step = min(train_cfg.batch_size, len(train_enc))

    def micro_batches(step: int):
        """This process's micro-batches of optimizer step `step` (0-based)."""
        idx = step_examples(len(train_enc), per_step * train_cfg.grad_accum, train_cfg.seed, step)
        for a in range(train_cfg.grad_accum):
            mine = idx[a * per_step: (a + 1) * per_step][rank::world]
            examples = [train_enc[i] for i in mine]
            if not examples:
                continue
            if varlen:
                yield pack_flat(examples, train_cfg.max_seq_len)
            elif train_cfg.packing:
                yield pack(examples, train_cfg.max_seq_len, tokenizer.pad_token_id)
            else:
                b = collate(examples, tokenizer.pad_token_id)
                b["lengths"] = b["attention_mask"].sum(dim=1, keepdim=True).expand_as(b["input_ids"]).contiguous()
                b["real"] = b["attention_mask"].sum()
                yield b

    # ---- setup: optimizer, schedule ---------------------------------------------------
    opt = torch.optim.AdamW(trainable, lr=train_cfg.lr, weight_decay=train_cfg.weight_decay,
                            fused=device.type == "cuda")

    def lr_at(step: int) -> float:  # linear warm-up, then decay to min_lr_ratio
        if step < train_cfg.warmup_steps:
            return (step + 1) / train_cfg.warmup_steps
        if train_cfg.schedule == "constant":
            return 1.0
        progress_ = (step - train_cfg.warmup_steps) / max(1, train_cfg.max_steps - train_cfg.warmup_steps)
        shape = 0.5 * (1 + math.cos(math.pi * progress_)) if train_cfg.schedule == "cosine" else 1 - progress_
        return train_cfg.min_lr_ratio + (1 - train_cfg.min_lr_ratio) * shape

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    use_autocast = device.type == "cuda" and dtype != torch.float32
    autocast = torch.autocast(device.type, dtype=dtype, enabled=use_autocast)
    from ftpipe.training.kernels import adapter_autocast
    adapter_cast = adapter_autocast(core, adapter and use_autocast)

    # ---- resume -----------------------------------------------------------------------
    # A checkpoint is only resumed by the same recipe on the same data: its fingerprint.
    fingerprint = digest([model_cfg.model_dump(mode="json"), lora_cfg.model_dump(mode="json"),
                          train_cfg.model_dump(mode="json", exclude={"resume", "log_every", "checkpoint_every",
                                                                     "keep_checkpoints"}),
                          len(train_enc), sum(len(e[0]) for e in train_enc), world])
    ckpt_dir = out_dir / "checkpoints"
    state = {"step": 0, "tokens": 0, "history": [], "val_history": [], "window": [],
             "best_val": None, "best_step": None, "bad_evals": 0, "elapsed": 0.0,
             "fingerprint": fingerprint}
    resumed_from = None
    for latest in (verified_checkpoints(ckpt_dir, fingerprint, say) if train_cfg.resume else [])[:1]:
        state = json.loads((latest / "state.json").read_text())
        load_trainable(core, latest / "trainable.safetensors")
        # tensors and plain containers only: no pickled code runs from a checkpoint
        saved = torch.load(latest / "optimizer.pt", weights_only=True)
        if is_fsdp(core):
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            set_optimizer_state_dict(core, opt, saved["optimizer"],
                                     options=StateDictOptions(full_state_dict=True))
        else:
            opt.load_state_dict(saved["optimizer"])
        sched.load_state_dict(saved["scheduler"])
        torch.set_rng_state(saved["rng"]["torch"])
        random.setstate(saved["rng"]["python"])
        if saved["rng"]["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(saved["rng"]["cuda"])
        resumed_from = state["step"]
        say(f"resuming from {latest} (step {resumed_from}/{train_cfg.max_steps})")
    best_dir = out_dir / "best"

    bar = None
    if main and (progress if progress is not None else _is_terminal()):
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                   TimeRemainingColumn)
        bar = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(),
                       TextColumn("loss {task.fields[loss]}  {task.fields[tps]} tok/s  ETA"),
                       TimeRemainingColumn())
        task = bar.add_task("train", total=train_cfg.max_steps, completed=state["step"], loss="—", tps="—")
        bar.start()

    # ---- loop --------------------------------------------------------------------------
    model.train()
    loop_start = time.perf_counter() - state["elapsed"]
    stopped_early = False
    step = state["step"]
    upcoming = list(micro_batches(step)) if step < train_cfg.max_steps else []
    try:
        while step < train_cfg.max_steps:
            # Every process weights its token-loss sum by the step's labelled-token total,
            # so gradients are those of one token-mean over the whole step.
            batches, n_label, n_real = step_inputs(upcoming, device, world)
            step_label, step_real = float(n_label), n_real
            # x world: DDP averages gradients over processes; this makes it a sum.
            step_loss = forward_backward(model, batches, world / max(step_label, 1.0), embed, autocast,
                                         adapter_cast, loss_model is not None, device)
            # the next step's micro-batches are built on the CPU while the GPU works on this one
            upcoming = list(micro_batches(step + 1)) if step + 1 < train_cfg.max_steps else []
            if world > 1:
                dist.all_reduce(step_loss)
            step_loss_f = float(step_loss) / max(step_label, 1.0)
            step += 1
            if not math.isfinite(step_loss_f) or step_loss_f > train_cfg.max_loss:
                raise TrainingDiverged(
                    f"training stopped at step {step}: loss {step_loss_f} is "
                    f"{'not finite' if not math.isfinite(step_loss_f) else f'above train.max_loss={train_cfg.max_loss}'}"
                    "; nothing is registered. Lower train.lr or check the data.")
            torch.nn.utils.clip_grad_norm_(trainable, train_cfg.max_grad_norm)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            state["tokens"] += step_real
            state["window"].append(step_loss_f)
            elapsed = time.perf_counter() - loop_start
            if bar is not None:
                bar.update(task, completed=step, loss=f"{step_loss_f:.4f}",
                           tps=f"{state['tokens'] / max(elapsed, 1e-9):,.0f}")
            if step % train_cfg.log_every == 0 or step == train_cfg.max_steps:
                avg = sum(state["window"]) / len(state["window"])
                state["window"] = []
                state["history"].append((step, avg))
                eta = elapsed / max(step - (resumed_from or 0), 1) * (train_cfg.max_steps - step)
                if bar is None:
                    say(f"step {step}/{train_cfg.max_steps}  loss {avg:.4f}  lr {sched.get_last_lr()[0]:.2e}  "
                        f"{state['tokens'] / elapsed:,.0f} tok/s  ETA {eta:.0f}s")
                if on_metrics and main:
                    on_metrics(step, {"train_loss": avg, "learning_rate": sched.get_last_lr()[0],
                                      "tokens_per_second": state["tokens"] / elapsed})
            if train_cfg.eval_every and val_enc and (step % train_cfg.eval_every == 0 or step == train_cfg.max_steps):
                val = mean_loss(core, val_enc, 64, tokenizer.pad_token_id)
                state["val_history"].append((step, val))
                if on_metrics and main:
                    on_metrics(step, {"val_loss": val})
                if state["best_val"] is None or val < state["best_val"] - train_cfg.early_stopping_min_delta:
                    state["best_val"], state["best_step"], state["bad_evals"] = val, step, 0
                    best = trainable_state(core)  # every rank: a collective under FSDP
                    if main:
                        from safetensors.torch import save_file
                        best_dir.mkdir(parents=True, exist_ok=True)
                        save_file(best, str(best_dir / "trainable.safetensors"))
                else:
                    state["bad_evals"] += 1
                say(f"step {step}: validation loss {val:.4f} (best {state['best_val']:.4f} at step "
                    f"{state['best_step']})")
                if train_cfg.early_stopping_patience and state["bad_evals"] >= train_cfg.early_stopping_patience:
                    say(f"early stopping at step {step}: no improvement in {state['bad_evals']} evaluations")
                    stopped_early = True
            state["step"], state["elapsed"] = step, time.perf_counter() - loop_start
            if train_cfg.checkpoint_every and (step % train_cfg.checkpoint_every == 0) \
                    and step < train_cfg.max_steps and not stopped_early:
                save_checkpoint(ckpt_dir, step, core, opt, sched, state, train_cfg.keep_checkpoints, main)
            if stopped_early:
                break
    finally:
        if bar is not None:
            bar.stop()

    # The best validation checkpoint is what gets exported when validation ran during training.
    if state["best_step"] is not None and (best_dir / "trainable.safetensors").is_file() \
            and state["best_step"] != step:
        load_trainable(core, best_dir / "trainable.safetensors")
        say(f"exporting the best checkpoint: step {state['best_step']} (validation loss {state['best_val']:.4f})")
    val_loss = state["best_val"] if state["best_step"] is not None else (
        mean_loss(core, val_enc, 64, tokenizer.pad_token_id) if val_enc else None)
    if val_loss is not None:
        say(f"validation loss {val_loss:.4f} on {len(val_enc)} examples")

    # ---- save --------------------------------------------------------------------------
    model_dir = out_dir / "model"
    adapter_dir = out_dir / "adapter" if adapter else None
    if varlen:  # the exported model uses the default attention, not the training kernel
        base_model = core.get_base_model() if hasattr(core, "get_base_model") else core
        base_model.set_attn_implementation("sdpa")
    # Under FSDP the weights are sharded: gather them (every rank) before rank 0 saves.
    gathered = full_state(core) if is_fsdp(core) else None
    if main:
        if adapter:
            # adapter_model.safetensors + adapter_config.json
            core.save_pretrained(adapter_dir, state_dict=gathered)
            if train_cfg.method == "qlora" or is_fsdp(core):
                # Merge into a base reloaded unquantized (never into 4-bit or sharded weights).
                from peft import PeftModel
                base, _ = load_base(model_cfg, torch.float32, for_training=False, device_index=local_rank)
                merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
            else:
                merged = core.merge_and_unload()
            merged.save_pretrained(model_dir)
        else:
            core.save_pretrained(model_dir, state_dict=gathered)
        tokenizer.save_pretrained(model_dir)
    history = [tuple(h) for h in state["history"]]
    result = TrainResult(
        model_dir=str(model_dir), adapter_dir=str(adapter_dir) if adapter_dir else None,
        method=train_cfg.method, steps=step,
        train_loss=history[-1][1] if history else float("nan"), val_loss=val_loss,
        tokens=state["tokens"], seconds=time.perf_counter() - start, loss_history=history,
        val_history=[tuple(v) for v in state["val_history"]], best_step=state["best_step"],
        resumed_from=resumed_from, stopped_early=stopped_early)
    if main:
        (out_dir / "train_result.json").write_text(json.dumps(result.__dict__, indent=2))
        shutil.rmtree(ckpt_dir, ignore_errors=True)  # finished: the export replaces them
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return result


def _is_terminal() -> bool:
    import sys

    return sys.stdout.isatty()
