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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from ftpipe.config import LoraConfig, ModelConfig, TrainConfig, digest
from ftpipe.files import read_jsonl
from ftpipe.training.batches import collate, encode, pack, pack_flat
from ftpipe.training.checkpoints import (
    full_state,
    is_fsdp,
    load_trainable,
    save_checkpoint,
    trainable_state,
    verified_checkpoints,
)
from ftpipe.training.loss import LossModel, mean_loss
from ftpipe.training.models import load_base, pick_dtype
from ftpipe.training.preference import dpo_forward_backward
from ftpipe.training.step import (
    forward_backward,
    neftune_hook,
    step_examples,
    step_inputs,
)


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
    stages: list[dict] = field(default_factory=list)   # a staged run (train.stages): what each stage did

    @staticmethod
    def chained(results: list[TrainResult], objectives: list[str]) -> TrainResult:
        """The stages of one run as one result: the last stage's weights and losses, every
        stage's curve on one step axis (each after the stages before it), and each stage's summary."""
        last, offset, losses, vals, stages = results[-1], 0, [], [], []
        for i, (r, objective) in enumerate(zip(results, objectives), 1):
            losses += [(offset + s, v) for s, v in r.loss_history]
            vals += [(offset + s, v) for s, v in r.val_history]
            stages.append({"stage": i, "objective": objective, "first_step": offset + 1, "steps": r.steps,
                           "train_loss": r.train_loss, "val_loss": r.val_loss, "tokens": r.tokens,
                           "seconds": round(r.seconds, 1), "dir": str(Path(r.model_dir).parent)})
            offset += r.steps
        return TrainResult(last.model_dir, last.adapter_dir, last.method, offset, last.train_loss, last.val_loss,
                           sum(r.tokens for r in results), sum(r.seconds for r in results), losses, vals,
                           None if last.best_step is None else offset - last.steps + last.best_step,
                           last.resumed_from, last.stopped_early, stages)


def _checkpointing(model) -> None:
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):   # transformers >= 5.2x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def training_dir(root: str | Path, model: ModelConfig, lora: LoraConfig, train: TrainConfig, data_key: str,
                 source: str = "", revision: str | None = None) -> Path:
    """Where a training keeps its checkpoints and exports, keyed by the recipe and the data
    (runs/train-KEY): a crashed `ftpipe run` started again finds and resumes its own.

    source, revision: what the start weights are (model.base as configured and its revision:
    model.revision, else the sha256 of a local folder's safetensors weights; or models:/NAME/V),
    keyed in place of where this machine keeps them (model.base): a moved or cloned project
    finds its trainings, and a local base rebuilt in place with other safetensors weights does
    not reuse a training of the old one."""
    if source:
        model = model.model_copy(update={"base": source, "revision": revision})
    recipe = [model.model_dump(mode="json"), lora.model_dump(mode="json"), train.model_dump(mode="json"), data_key]
    return Path(root) / "runs" / f"train-{digest(recipe, 12)}"


def prepare_model(model, lora_cfg: LoraConfig, train_cfg: TrainConfig, start_adapter: str | None = None):
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

        from peft import LoraConfig as PeftLoraConfig
        from peft import get_peft_model
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")  # peft 0.21 on transformers 5
        if start_adapter:          # continue an adapter version's own adapter (its LoRA config)
            from peft import PeftModel

            return _compiled(PeftModel.from_pretrained(model, start_adapter, is_trainable=True), train_cfg)
        model = get_peft_model(model, PeftLoraConfig(
            r=lora_cfg.r, lora_alpha=lora_cfg.alpha, lora_dropout=lora_cfg.dropout,
            target_modules=lora_cfg.target_modules, use_dora=lora_cfg.use_dora,
            use_rslora=lora_cfg.use_rslora, task_type="CAUSAL_LM"))
    return _compiled(model, train_cfg)


def _compiled(model, train_cfg: TrainConfig):
    if train_cfg.compile:
        from ftpipe.training.kernels import compile_layers
        compile_layers(model)
    return model


# ------------------------------------------------------------------ the state of a run

@dataclass
class Progress:
    """Where training is and what it has seen: all a checkpoint carries besides tensors."""
    fingerprint: str                      # the recipe and data it belongs to (a resume must match)
    step: int = 0
    tokens: int = 0                       # real tokens seen, all processes
    history: list = field(default_factory=list)       # (step, mean loss of its logging window)
    val_history: list = field(default_factory=list)   # (step, validation loss)
    window: list = field(default_factory=list)        # step losses since the last log line
    window_rewards: list = field(default_factory=list)  # DPO: (reward accuracy sum, margin sum, pairs) per step
    best_val: float | None = None
    best_step: int | None = None
    bad_evals: int = 0                    # evaluations in a row without improvement
    elapsed: float = 0.0                  # seconds in the loop, across resumes


@dataclass(frozen=True)
class Processes:
    """This process among the torchrun processes (one of one without torchrun)."""
    world: int
    rank: int
    local_rank: int

    @property
    def main(self) -> bool:
        return self.rank == 0


@dataclass
class Trainee:
    """The model side of a run: `model` is what steps (DDP / FSDP / loss wrapper), `core` the
    unwrapped (peft) model that is saved and evaluated."""
    model: object
    core: object
    tokenizer: object
    trainable: list
    embed: object
    device: object
    dtype: object
    loss_model: bool
    varlen: bool
    model_cfg: ModelConfig   # with the attention implementation training used


@dataclass
class Batches:
    """The encoded examples (DPO: pairs), and this process's micro-batches of any step."""
    train: list
    val: list
    micro_batches: Callable[[int], list]
    ref: object = None        # DPO: the reference log-probs (n, 2) of train pairs, and of val pairs
    val_ref: object = None


@dataclass
class Optimizer:
    opt: object
    sched: object
    autocast: object
    adapter_cast: object


# ------------------------------------------------------------------ the recipe

def fine_tune(model_cfg: ModelConfig, lora_cfg: LoraConfig, train_cfg: TrainConfig,
              train_path: str | Path, val_path: str | Path | None, out_dir: str | Path,
              log: Callable[[str], None] = print,
              on_metrics: Callable[[int, dict], None] | None = None,
              progress: bool | None = None, val_batch_size: int = 64,
              start_adapter: str | None = None) -> TrainResult:
    """Setup, resume, loop, save. val_batch_size: examples per validation forward (eval.batch_size).
    start_adapter: a LoRA adapter folder to continue training (its own LoRA config) instead of a new one."""
    import torch

    start = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    procs = setup_processes()
    say = log if procs.main else (lambda msg: None)
    train_cfg = train_cfg.resolved(torch.cuda.is_available(), procs.world)
    torch.manual_seed(train_cfg.seed)
    random.seed(train_cfg.seed)
    t = setup_model(model_cfg, lora_cfg, train_cfg, procs, say, start_adapter)
    data = setup_batches(t, train_cfg, train_path, val_path, procs)
    o = setup_optimizer(t, train_cfg)
    fingerprint = digest([t.model_cfg.model_dump(mode="json"), lora_cfg.model_dump(mode="json"), start_adapter,
                          train_cfg.model_dump(mode="json", exclude={"resume", "log_every", "checkpoint_every",
                                                                     "keep_checkpoints"}),
                          len(data.train), sum(len(e[0]) for e in data.train), procs.world])
    if train_cfg.objective == "dpo":
        reference(t, data, train_cfg, out_dir / "reference.pt", fingerprint, val_batch_size, say)
    state, resumed_from = resume(out_dir / "checkpoints", fingerprint, t, o, train_cfg, say)
    stopped_early = train_loop(t, data, o, state, train_cfg, procs, out_dir, resumed_from, say, on_metrics,
                               val_batch_size, procs.main and (progress if progress is not None else _is_terminal()))
    val_loss = best_weights(t, data, state, out_dir / "best", train_cfg, val_batch_size, say)
    adapter_dir = save(t, train_cfg, out_dir, procs)
    history = [tuple(h) for h in state.history]
    result = TrainResult(
        model_dir=str(out_dir / "model"), adapter_dir=str(adapter_dir) if adapter_dir else None,
        method=train_cfg.method, steps=state.step, train_loss=history[-1][1] if history else float("nan"),
        val_loss=val_loss, tokens=state.tokens, seconds=time.perf_counter() - start, loss_history=history,
        val_history=[tuple(v) for v in state.val_history], best_step=state.best_step,
        resumed_from=resumed_from, stopped_early=stopped_early)
    if procs.main:
        tmp = out_dir / "train_result.json.tmp"     # whole or absent: a finished training is found by it
        tmp.write_text(json.dumps(result.__dict__, indent=2))
        os.replace(tmp, out_dir / "train_result.json")
        shutil.rmtree(out_dir / "checkpoints", ignore_errors=True)  # finished: the export replaces them
    if procs.world > 1:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
    return result


def setup_processes() -> Processes:
    """Under torchrun each process trains on its share of every step; rank 0 logs and saves."""
    import torch
    import torch.distributed as dist

    procs = Processes(int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0")),
                      int(os.environ.get("LOCAL_RANK", "0")))
    if procs.world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if torch.cuda.is_available():
        torch.cuda.set_device(procs.local_rank)
    return procs


def setup_model(model_cfg: ModelConfig, lora_cfg: LoraConfig, train_cfg: TrainConfig, procs: Processes,
                say: Callable[[str], None], start_adapter: str | None = None) -> Trainee:
    """The base model loaded (full fine-tuning keeps fp32 master weights under autocast),
    adapters and kernels applied, the loss from hidden states where the model allows it,
    wrapped for DDP or sharded by FSDP under torchrun."""
    import torch

    dtype = pick_dtype(train_cfg.precision)
    fsdp = procs.world > 1 and train_cfg.strategy == "fsdp"
    varlen = train_cfg.packing and train_cfg.packing_attention == "auto" and \
        model_cfg.attn_implementation in (None, "ftpipe_varlen")
    if varlen:
        from ftpipe.training.attention import register
        model_cfg = model_cfg.model_copy(update={"attn_implementation": register()})
    model, tokenizer = load_base(model_cfg, torch.float32 if train_cfg.method == "full" else dtype,
                                 device_index=procs.local_rank)
    device = next(model.parameters()).device
    core = prepare_model(model, lora_cfg, train_cfg, start_adapter)
    if start_adapter and train_cfg.method in ("lora", "qlora"):
        say(f"continuing the LoRA adapter of the start weights ({start_adapter}), with its own LoRA config")
    trainable = [p for p in core.parameters() if p.requires_grad]
    n_trainable, n_total = sum(p.numel() for p in trainable), sum(p.numel() for p in core.parameters())
    say(f"method {train_cfg.method}: {n_trainable:,} of {n_total:,} parameters train "
        f"({100 * n_trainable / n_total:.1f}%), dtype {str(dtype).split('.')[-1]}, device {device}"
        + (f", {procs.world} processes" if procs.world > 1 else ""))
    embed = core.get_input_embeddings()
    if train_cfg.neftune_alpha:
        embed.register_forward_hook(neftune_hook(train_cfg.neftune_alpha))
    # the loss from hidden states in chunks (not under FSDP: its root owns the output layer)
    loss_model = LossModel.build(core, train_cfg.loss_chunk_tokens, compiled=bool(train_cfg.compile)) \
        if train_cfg.loss_chunk_tokens and LossModel.supported(core) and not fsdp else None
    stepped = loss_model or core
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        for layer in core.get_decoder().layers if hasattr(core, "get_decoder") else []:
            fully_shard(layer)
        stepped = fully_shard(core)
        trainable = [p for p in core.parameters() if p.requires_grad]   # now sharded DTensors
    elif procs.world > 1:
        stepped = torch.nn.parallel.DistributedDataParallel(
            stepped, device_ids=[procs.local_rank] if device.type == "cuda" else None)
    return Trainee(stepped, core, tokenizer, trainable, embed, device, dtype, loss_model is not None, varlen, model_cfg)


def setup_batches(t: Trainee, train_cfg: TrainConfig, train_path: str | Path, val_path: str | Path | None,
                  procs: Processes) -> Batches:
    """Every example encoded once (prompt masked unless completion_only_loss is off); a step's
    `batch_size x grad_accum` examples chosen by (seed, step), this process taking every
    world-th, laid out as varlen-packed, packed or padded micro-batches."""
    train_rows = read_jsonl(train_path)
    if not train_rows:
        raise ValueError(f"{train_path}: no training examples")
    val_rows = read_jsonl(val_path) if val_path and Path(val_path).is_file() else []
    pad = t.tokenizer.pad_token_id
    if train_cfg.objective == "dpo":
        return _pair_batches(t, train_cfg, train_path, train_rows, val_rows, procs)
    train = [encode(t.tokenizer, r, train_cfg.max_seq_len, train_cfg.completion_only_loss) for r in train_rows]
    val = [encode(t.tokenizer, r, train_cfg.max_seq_len, True) for r in val_rows]
    per_step = min(train_cfg.batch_size, len(train))

    def micro_batches(step: int) -> list:
        """This process's micro-batches of optimizer step `step` (0-based)."""
        idx = step_examples(len(train), per_step * train_cfg.grad_accum, train_cfg.seed, step)
        out = []
        for a in range(train_cfg.grad_accum):
            examples = [train[i] for i in idx[a * per_step: (a + 1) * per_step][procs.rank::procs.world]]
            if not examples:
                continue
            if t.varlen:
                out.append(pack_flat(examples, train_cfg.max_seq_len))
            elif train_cfg.packing:
                out.append(pack(examples, train_cfg.max_seq_len, pad))
            else:
                b = collate(examples, pad)
                b["lengths"] = b["attention_mask"].sum(dim=1, keepdim=True).expand_as(b["input_ids"]).contiguous()
                b["real"] = b["attention_mask"].sum()
                out.append(b)
        return out

    return Batches(train, val, micro_batches)


def _pair_batches(t: Trainee, train_cfg: TrainConfig, train_path, train_rows: list, val_rows: list,
                  procs: Processes) -> Batches:
    """DPO: the preference pairs among the rows (SFT rows are not used), a step's pairs chosen
    like SFT examples, each micro-batch the chosen and the rejected answers padded together."""
    import torch

    from ftpipe.training.preference import encode_pairs, pair_batch, width_multiple

    train = encode_pairs(t.tokenizer, train_rows, train_cfg.max_seq_len)
    if not train:
        raise ValueError(f"{train_path}: train.objective=dpo needs preference pairs (prompt, chosen, rejected); "
                         f"its {len(train_rows)} rows hold none")
    val = encode_pairs(t.tokenizer, val_rows, train_cfg.max_seq_len)
    per_step = min(train_cfg.batch_size, len(train))

    def micro_batches(step: int) -> list:
        idx = step_examples(len(train), per_step * train_cfg.grad_accum, train_cfg.seed, step)
        out = []
        for a in range(train_cfg.grad_accum):
            mine = idx[a * per_step: (a + 1) * per_step][procs.rank::procs.world]
            if mine:
                b = pair_batch([train[i] for i in mine], t.tokenizer.pad_token_id, width_multiple(t.device))
                b["index"] = torch.tensor(mine)
                out.append(b)
        return out

    return Batches(train, val, micro_batches)


def reference(t: Trainee, data: Batches, train_cfg: TrainConfig, path: Path, fingerprint: str, batch_size: int,
              say: Callable[[str], None]) -> None:
    """DPO's reference: the start weights' log-probs of every pair, scored once before the first
    step (kept in `path`: a resumed run, whose weights have moved, reads them back)."""
    import torch

    from ftpipe.training.preference import reference_logps

    if path.is_file():
        saved = torch.load(path, weights_only=True)
        if saved.get("fingerprint") == [fingerprint]:
            data.ref, data.val_ref = saved["train"], saved["val"]
            return
    began = time.perf_counter()
    args = (max(batch_size, train_cfg.batch_size), t.tokenizer.pad_token_id, train_cfg.dpo.loss == "ipo", t.device)
    data.ref, data.val_ref = reference_logps(t.core, data.train, *args), reference_logps(t.core, data.val, *args)
    torch.save({"fingerprint": [fingerprint], "train": data.ref, "val": data.val_ref}, path)
    say(f"DPO reference: log-probs of {len(data.train)} training and {len(data.val)} validation pairs under the "
        f"start weights in {time.perf_counter() - began:.1f}s (beta {train_cfg.dpo.beta}, loss {train_cfg.dpo.loss})")


def val_loss_of(t: Trainee, data: Batches, train_cfg: TrainConfig, batch_size: int) -> float:
    """The validation loss of the objective: token loss (SFT) or mean DPO loss over pairs."""
    if train_cfg.objective == "dpo":
        from ftpipe.training.preference import dpo_val_loss

        return dpo_val_loss(t.core, data.val, data.val_ref, train_cfg, batch_size, t.tokenizer.pad_token_id,
                            t.device)
    return mean_loss(t.core, data.val, batch_size, t.tokenizer.pad_token_id)


def setup_optimizer(t: Trainee, train_cfg: TrainConfig) -> Optimizer:
    """AdamW (fused on GPU), linear warm-up then cosine / linear decay to min_lr_ratio (or
    constant), autocast for low-precision compute, bf16 inputs for LoRA layers under it."""
    import torch

    from ftpipe.training.kernels import adapter_autocast

    opt = torch.optim.AdamW(t.trainable, lr=train_cfg.lr, weight_decay=train_cfg.weight_decay,
                            fused=t.device.type == "cuda")

    def lr_at(step: int) -> float:
        if step < train_cfg.warmup_steps:
            return (step + 1) / train_cfg.warmup_steps
        if train_cfg.schedule == "constant":
            return 1.0
        done = (step - train_cfg.warmup_steps) / max(1, train_cfg.max_steps - train_cfg.warmup_steps)
        shape = 0.5 * (1 + math.cos(math.pi * done)) if train_cfg.schedule == "cosine" else 1 - done
        return train_cfg.min_lr_ratio + (1 - train_cfg.min_lr_ratio) * shape

    low = t.device.type == "cuda" and t.dtype != torch.float32
    return Optimizer(opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_at),
                     torch.autocast(t.device.type, dtype=t.dtype, enabled=low),
                     adapter_autocast(t.core, train_cfg.method in ("lora", "qlora") and low))


def resume(ckpt_dir: Path, fingerprint: str, t: Trainee, o: Optimizer, train_cfg: TrainConfig,
           say: Callable[[str], None]) -> tuple[Progress, int | None]:
    """The newest verified checkpoint of this recipe and data (weights, optimizer, schedule,
    RNG), or a fresh start: (progress, the step resumed from)."""
    import torch

    for latest in (verified_checkpoints(ckpt_dir, fingerprint, say) if train_cfg.resume else [])[:1]:
        state = Progress(**json.loads((latest / "state.json").read_text()))
        load_trainable(t.core, latest / "trainable.safetensors")
        # tensors and plain containers only: no pickled code runs from a checkpoint
        saved = torch.load(latest / "optimizer.pt", weights_only=True)
        if is_fsdp(t.core):
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                set_optimizer_state_dict,
            )

            set_optimizer_state_dict(t.core, o.opt, saved["optimizer"], options=StateDictOptions(full_state_dict=True))
        else:
            o.opt.load_state_dict(saved["optimizer"])
        o.sched.load_state_dict(saved["scheduler"])
        torch.set_rng_state(saved["rng"]["torch"])
        random.setstate(saved["rng"]["python"])
        if saved["rng"]["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(saved["rng"]["cuda"])
        say(f"resuming from {latest} (step {state.step}/{train_cfg.max_steps})")
        return state, state.step
    return Progress(fingerprint), None


def train_loop(t: Trainee, data: Batches, o: Optimizer, state: Progress, train_cfg: TrainConfig, procs: Processes,
               out_dir: Path, resumed_from: int | None, say: Callable[[str], None],
               on_metrics: Callable[[int, dict], None] | None, val_batch_size: int, bar: bool) -> bool:
    """Steps until max_steps (or early stopping: returns True): forward/backward weighted by
    the step's labelled tokens, clip, step; log every log_every steps, validate every
    eval_every (the best weights kept), checkpoint every checkpoint_every."""
    import torch
    import torch.distributed as dist

    progress = _progress_bar(train_cfg.max_steps, state.step) if bar else None
    t.model.train()
    loop_start = time.perf_counter() - state.elapsed
    stopped_early = False
    step = state.step
    upcoming = data.micro_batches(step) if step < train_cfg.max_steps else []
    try:
        while step < train_cfg.max_steps:
            # Every process weights its token-loss sum by the step's labelled-token total,
            # so gradients are those of one token-mean over the whole step.
            if train_cfg.objective == "dpo":
                batches, n_label, n_real = _pair_inputs(upcoming, t.device)
                step_loss, acc, margin = dpo_forward_backward(
                    t.core, batches, data.ref, train_cfg,
                    procs.world / max(float(n_label), 1.0), o.autocast, o.adapter_cast, t.device)
                state.window_rewards.append((float(acc), float(margin), n_label))
            else:
                batches, n_label, n_real = step_inputs(upcoming, t.device, procs.world)
                # x world: DDP averages gradients over processes; this makes it a sum.
                step_loss = forward_backward(t.model, batches, procs.world / max(float(n_label), 1.0), t.embed,
                                             o.autocast, o.adapter_cast, t.loss_model, t.device)
            # the next step's micro-batches are built on the CPU while the GPU works on this one
            upcoming = data.micro_batches(step + 1) if step + 1 < train_cfg.max_steps else []
            if procs.world > 1:
                dist.all_reduce(step_loss)
            loss = float(step_loss) / max(float(n_label), 1.0)
            step += 1
            if not math.isfinite(loss) or loss > train_cfg.max_loss:
                raise TrainingDiverged(
                    f"training stopped at step {step}: loss {loss} is "
                    f"{'not finite' if not math.isfinite(loss) else f'above train.max_loss={train_cfg.max_loss}'}"
                    "; nothing is registered. Lower train.lr or check the data.")
            torch.nn.utils.clip_grad_norm_(t.trainable, train_cfg.max_grad_norm)
            o.opt.step()
            o.sched.step()
            o.opt.zero_grad(set_to_none=True)
            state.tokens += n_real
            state.window.append(loss)
            elapsed = time.perf_counter() - loop_start
            if progress is not None:
                progress[0].update(progress[1], completed=step, loss=f"{loss:.4f}",
                                   tps=f"{state.tokens / max(elapsed, 1e-9):,.0f}")
            if step % train_cfg.log_every == 0 or step == train_cfg.max_steps:
                _log_window(state, step, elapsed, resumed_from, o, train_cfg, say if progress is None else None,
                            on_metrics if procs.main else None)
            if train_cfg.eval_every and data.val and (step % train_cfg.eval_every == 0 or step == train_cfg.max_steps):
                stopped_early = validate(t, data, state, step, out_dir / "best", train_cfg, procs, val_batch_size,
                                         say, on_metrics if procs.main else None)
            state.step, state.elapsed = step, time.perf_counter() - loop_start
            if train_cfg.checkpoint_every and step % train_cfg.checkpoint_every == 0 \
                    and step < train_cfg.max_steps and not stopped_early:
                save_checkpoint(out_dir / "checkpoints", step, t.core, o.opt, o.sched, asdict(state),
                                train_cfg.keep_checkpoints, procs.main)
            if stopped_early:
                break
    finally:
        if progress is not None:
            progress[0].stop()
    return stopped_early


def _pair_inputs(batches: list[dict], device) -> tuple[list[dict], int, int]:
    """A DPO step's micro-batches on the device: (batches, pairs, real tokens). One process:
    train.objective=dpo refuses train.devices > 1."""
    n_pairs = sum(int(b["index"].numel()) for b in batches)
    n_real = sum(int(b["real"]) for b in batches)
    return [{k: (v.to(device) if k != "index" else v) for k, v in b.items()} for b in batches], n_pairs, n_real


def _log_window(state: Progress, step: int, elapsed: float, resumed_from: int | None, o: Optimizer,
                train_cfg: TrainConfig, say: Callable[[str], None] | None,
                on_metrics: Callable[[int, dict], None] | None) -> None:
    """The mean loss of the steps since the last log line: into the history, the log, MLflow."""
    avg = sum(state.window) / len(state.window)
    state.window = []
    state.history.append((step, avg))
    lr = o.sched.get_last_lr()[0]
    rewards = {}
    if state.window_rewards:     # DPO: the implicit reward accuracy and margin of the window's pairs
        pairs = max(sum(n for *_, n in state.window_rewards), 1)
        rewards = {"train_reward_accuracy": sum(a for a, _, _ in state.window_rewards) / pairs,
                   "train_reward_margin": sum(m for _, m, _ in state.window_rewards) / pairs}
        state.window_rewards = []
    if say:
        eta = elapsed / max(step - (resumed_from or 0), 1) * (train_cfg.max_steps - step)
        extra = "".join(f"  {k[6:].replace('_', ' ')} {v:.3f}" for k, v in rewards.items())
        say(f"step {step}/{train_cfg.max_steps}  loss {avg:.4f}{extra}  lr {lr:.2e}  "
            f"{state.tokens / elapsed:,.0f} tok/s  ETA {eta:.0f}s")
    if on_metrics:
        on_metrics(step, {"train_loss": avg, "learning_rate": lr, "tokens_per_second": state.tokens / elapsed}
                   | rewards)


def validate(t: Trainee, data: Batches, state: Progress, step: int, best_dir: Path, train_cfg: TrainConfig,
             procs: Processes, batch_size: int, say: Callable[[str], None],
             on_metrics: Callable[[int, dict], None] | None) -> bool:
    """Validation loss now; the best weights so far kept in best_dir; True when early stopping
    has run out of patience."""
    val = val_loss_of(t, data, train_cfg, batch_size)
    state.val_history.append((step, val))
    if on_metrics:
        on_metrics(step, {"val_loss": val})
    if state.best_val is None or val < state.best_val - train_cfg.early_stopping_min_delta:
        state.best_val, state.best_step, state.bad_evals = val, step, 0
        best = trainable_state(t.core)  # every rank: a collective under FSDP
        if procs.main:
            from safetensors.torch import save_file

            best_dir.mkdir(parents=True, exist_ok=True)
            save_file(best, str(best_dir / "trainable.safetensors"))
    else:
        state.bad_evals += 1
    say(f"step {step}: validation loss {val:.4f} (best {state.best_val:.4f} at step {state.best_step})")
    if train_cfg.early_stopping_patience and state.bad_evals >= train_cfg.early_stopping_patience:
        say(f"early stopping at step {step}: no improvement in {state.bad_evals} evaluations")
        return True
    return False


def best_weights(t: Trainee, data: Batches, state: Progress, best_dir: Path, train_cfg: TrainConfig,
                 batch_size: int, say: Callable[[str], None]) -> float | None:
    """The weights to export: the best validation checkpoint when validation ran during
    training, else the last step's; returns their validation loss."""
    if state.best_step is not None and (best_dir / "trainable.safetensors").is_file() \
            and state.best_step != state.step:
        load_trainable(t.core, best_dir / "trainable.safetensors")
        say(f"exporting the best checkpoint: step {state.best_step} (validation loss {state.best_val:.4f})")
    val_loss = state.best_val if state.best_step is not None else (
        val_loss_of(t, data, train_cfg, batch_size) if data.val else None)
    if val_loss is not None:
        say(f"validation loss {val_loss:.4f} on {len(data.val)} examples")
    return val_loss


def save(t: Trainee, train_cfg: TrainConfig, out_dir: Path, procs: Processes) -> Path | None:
    """The export: out_dir/model, a full checkpoint from_pretrained loads without peft (the
    adapter merged into a base reloaded unquantized for QLoRA or FSDP), and out_dir/adapter
    (adapter_model.safetensors + adapter_config.json) for LoRA / QLoRA."""
    import torch

    adapter_dir = out_dir / "adapter" if train_cfg.method in ("lora", "qlora") else None
    if t.varlen:  # the exported model uses the default attention, not the training kernel
        base_model = t.core.get_base_model() if hasattr(t.core, "get_base_model") else t.core
        base_model.set_attn_implementation("sdpa")
    gathered = full_state(t.core) if is_fsdp(t.core) else None   # every rank: FSDP shards gathered
    if not procs.main:
        return adapter_dir
    if adapter_dir is None:   # the weights only, in the training dtype (bf16 on GPUs: half the fp32 masters)
        state = gathered if gathered is not None else t.core.state_dict()
        cast: dict[int, object] = {}     # tied weights (one tensor under two names) stay one tensor
        for k, v in state.items():
            if v.is_floating_point() and v.data_ptr() not in cast:
                cast[v.data_ptr()] = v.to(t.dtype)
        state = {k: cast.get(v.data_ptr(), v) if v.is_floating_point() else v for k, v in state.items()}
        t.core.config.dtype = t.dtype
        t.core.save_pretrained(out_dir / "model", state_dict=state)
    else:
        t.core.save_pretrained(adapter_dir, state_dict=gathered)
        if train_cfg.method == "qlora" or is_fsdp(t.core):
            from peft import PeftModel

            base, _ = load_base(t.model_cfg, torch.float32, for_training=False, device_index=procs.local_rank)
            merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
        else:
            merged = t.core.merge_and_unload()
        merged.save_pretrained(out_dir / "model")
    t.tokenizer.save_pretrained(out_dir / "model")
    if adapter_dir is not None:     # an adapter version serves with the tokenizer it trained with
        t.tokenizer.save_pretrained(adapter_dir)
    return adapter_dir


def _progress_bar(total: int, done: int):
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        TextColumn,
        TimeRemainingColumn,
    )
    from rich.progress import Progress as Bar

    bar = Bar(TextColumn("train"), BarColumn(), MofNCompleteColumn(),
              TextColumn("loss {task.fields[loss]}  {task.fields[tps]} tok/s  ETA"), TimeRemainingColumn())
    task = bar.add_task("train", total=total, completed=done, loss="—", tps="—")
    bar.start()
    return bar, task


def _is_terminal() -> bool:
    import sys

    return sys.stdout.isatty()
