"""The fine-tuning recipe: setup, loop, save — one file, top to bottom.

Importable without prefect, mlflow, dvc or great_expectations, so it runs alone on a GPU
machine:

    python -c "from ftpipe.training import fine_tune; ..."

Defaults for the embedded task (params.yaml):
    32 examples a step x ~44 tokens = ~1,400 tokens/step; 1,200 steps ~ 16 epochs of 2,400
    training rows; LoRA r=16 on all linear layers, lr 2e-3 with 40 warm-up steps, cosine
    decay to 10%. On 2 CPU cores: ~9,000 tokens/s, ~3 minutes.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ftpipe.config import LoraConfig, ModelConfig, TrainConfig
from ftpipe.formatting import IGNORE_INDEX, collate, encode


class TrainingDiverged(RuntimeError):
    """The loss became NaN/inf or exploded: nothing from this run may be registered."""


@dataclass(frozen=True)
class TrainResult:
    model_dir: str            # a full HF checkpoint, loadable with from_pretrained, no peft
    adapter_dir: str | None   # the LoRA adapter (safetensors), for lora/qlora
    method: str
    steps: int
    train_loss: float         # mean loss over the last logging window
    val_loss: float | None
    tokens: int               # real (non-pad) tokens seen
    seconds: float
    loss_history: list[tuple[int, float]] = field(default_factory=list)


def read_jsonl(path: str | Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def pick_dtype(precision: str):
    """bf16 where the GPU supports it, fp16 on older GPUs, fp32 on CPU — unless set."""
    import torch

    if precision == "fp32":
        return torch.float32
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def load_base(model_cfg: ModelConfig, dtype, for_training: bool = True):
    """The base model and tokenizer through the one `from_pretrained` path (hub id or dir)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    kwargs = dict(revision=model_cfg.revision, trust_remote_code=model_cfg.trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(model_cfg.base, **kwargs)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    quant = None
    if for_training and model_cfg.quantization == "nf4":
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                   bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=dtype)
    elif for_training and model_cfg.quantization == "int8":
        quant = BitsAndBytesConfig(load_in_8bit=True)
    device_map = {"": 0} if torch.cuda.is_available() else None
    model = AutoModelForCausalLM.from_pretrained(
        model_cfg.base, dtype=dtype, quantization_config=quant, device_map=device_map,
        use_safetensors=True, **kwargs)
    return model, tokenizer


def _batches(encoded: list, batch_size: int, seed: int):
    """Endless shuffled batches, a new order each epoch, reproducible from the seed."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(encoded), generator=gen).tolist()
        for i in range(0, len(order) - batch_size + 1, batch_size):
            yield [encoded[j] for j in order[i: i + batch_size]]


def _neftune_hook(alpha: float):
    """NEFTune noise with the scale alpha / sqrt(L * d) computed per sequence.

    L is each example's own length (from the attention mask set before each forward),
    not the padded width of the batch, so padding never shrinks an example's noise.
    """
    import torch

    def hook(module, inputs, output):
        if not module.training:
            return output
        lengths = getattr(module, "_ftpipe_lengths", None)
        dims = output.shape[-1]
        if lengths is None:
            lengths = torch.full((output.shape[0],), output.shape[1], device=output.device)
        scale = alpha / torch.sqrt(lengths.to(output.dtype) * dims)
        noise = torch.zeros_like(output).uniform_(-1, 1)
        return output + noise * scale.view(-1, 1, 1)

    return hook


def mean_loss(model, encoded: list, batch_size: int, pad_id: int) -> float:
    """Token-weighted mean loss over labelled tokens (the completion, by default)."""
    import torch

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(encoded), batch_size):
            batch = {k: v.to(device) for k, v in collate(encoded[i: i + batch_size], pad_id).items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            shift_logits = logits[:, :-1].float()
            shift_labels = batch["labels"][:, 1:]
            loss = torch.nn.functional.cross_entropy(
                shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1),
                ignore_index=IGNORE_INDEX, reduction="sum")
            total += float(loss)
            count += int((shift_labels != IGNORE_INDEX).sum())
    model.train(was_training)
    return total / max(count, 1)


def fine_tune(model_cfg: ModelConfig, lora_cfg: LoraConfig, train_cfg: TrainConfig,
              train_path: str | Path, val_path: str | Path | None, out_dir: str | Path,
              log: Callable[[str], None] = print,
              on_metrics: Callable[[int, dict], None] | None = None) -> TrainResult:
    import torch

    start = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(train_cfg.seed)

    # ---- setup: model, adapters, data -------------------------------------------------
    dtype = pick_dtype(train_cfg.precision)
    # Full fine-tuning keeps fp32 master weights and runs the forward under autocast.
    load_dtype = torch.float32 if train_cfg.method == "full" else dtype
    model, tokenizer = load_base(model_cfg, load_dtype)
    device = next(model.parameters()).device
    adapter = train_cfg.method in ("lora", "qlora")
    if train_cfg.method == "qlora":
        from peft import prepare_model_for_kbit_training
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if adapter:
        from peft import LoraConfig as PeftLoraConfig, get_peft_model
        import warnings
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")  # peft 0.21 on transformers 5
        model = get_peft_model(model, PeftLoraConfig(
            r=lora_cfg.r, lora_alpha=lora_cfg.alpha, lora_dropout=lora_cfg.dropout,
            target_modules=lora_cfg.target_modules, use_dora=lora_cfg.use_dora,
            use_rslora=lora_cfg.use_rslora, task_type="CAUSAL_LM"))
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in trainable)
    n_total = sum(p.numel() for p in model.parameters())
    log(f"method {train_cfg.method}: {n_trainable:,} of {n_total:,} parameters train "
        f"({100 * n_trainable / n_total:.1f}%), dtype {str(dtype).split('.')[-1]}, device {device}")

    train_rows = read_jsonl(train_path)
    if not train_rows:
        raise ValueError(f"{train_path}: no training examples")
    encode_row = lambda r: encode(tokenizer, r, train_cfg.max_seq_len,  # noqa: E731
                                  train_cfg.completion_only_loss)
    train_enc = [encode_row(r) for r in train_rows]
    val_enc = [encode(tokenizer, r, train_cfg.max_seq_len, True) for r in read_jsonl(val_path)] \
        if val_path and Path(val_path).is_file() else []
    batch_size = min(train_cfg.batch_size, len(train_enc))

    embed = model.get_input_embeddings()
    if train_cfg.neftune_alpha:
        embed.register_forward_hook(_neftune_hook(train_cfg.neftune_alpha))

    opt = torch.optim.AdamW(trainable, lr=train_cfg.lr, weight_decay=train_cfg.weight_decay,
                            fused=device.type == "cuda")

    def lr_at(step: int) -> float:  # linear warm-up, then cosine decay to 10%
        if step < train_cfg.warmup_steps:
            return (step + 1) / train_cfg.warmup_steps
        progress = (step - train_cfg.warmup_steps) / max(1, train_cfg.max_steps - train_cfg.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    autocast = torch.autocast(device.type, dtype=dtype,
                              enabled=device.type == "cuda" and dtype != torch.float32)

    # ---- loop --------------------------------------------------------------------------
    model.train()
    batches = _batches(train_enc, batch_size, train_cfg.seed)
    history: list[tuple[int, float]] = []
    window: list[float] = []
    tokens = 0
    loop_start = time.perf_counter()
    for step in range(1, train_cfg.max_steps + 1):
        step_loss = 0.0
        for _ in range(train_cfg.grad_accum):
            batch = {k: v.to(device) for k, v in collate(next(batches), tokenizer.pad_token_id).items()}
            embed._ftpipe_lengths = batch["attention_mask"].sum(dim=1)
            with autocast:
                loss = model(**batch).loss / train_cfg.grad_accum
            loss.backward()
            step_loss += loss.item()
            tokens += int(batch["attention_mask"].sum())
        if not math.isfinite(step_loss) or step_loss > train_cfg.max_loss:
            raise TrainingDiverged(
                f"training stopped at step {step}: loss {step_loss} is "
                f"{'not finite' if not math.isfinite(step_loss) else f'above train.max_loss={train_cfg.max_loss}'}"
                "; nothing is registered. Lower train.lr or check the data.")
        torch.nn.utils.clip_grad_norm_(trainable, train_cfg.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        window.append(step_loss)
        if step % train_cfg.log_every == 0 or step == train_cfg.max_steps:
            avg = sum(window) / len(window)
            window = []
            history.append((step, avg))
            elapsed = time.perf_counter() - loop_start
            eta = elapsed / step * (train_cfg.max_steps - step)
            log(f"step {step}/{train_cfg.max_steps}  loss {avg:.4f}  "
                f"lr {sched.get_last_lr()[0]:.2e}  {tokens / elapsed:,.0f} tok/s  ETA {eta:.0f}s")
            if on_metrics:
                on_metrics(step, {"train_loss": avg, "learning_rate": sched.get_last_lr()[0],
                                  "tokens_per_second": tokens / elapsed})

    val_loss = mean_loss(model, val_enc, 64, tokenizer.pad_token_id) if val_enc else None
    if val_loss is not None:
        log(f"validation loss {val_loss:.4f} on {len(val_enc)} examples")

    # ---- save --------------------------------------------------------------------------
    model_dir = out_dir / "model"
    adapter_dir = None
    if adapter:
        adapter_dir = out_dir / "adapter"
        model.save_pretrained(adapter_dir)  # adapter_model.safetensors + adapter_config.json
        if train_cfg.method == "qlora":
            # Merge into a base reloaded unquantized, never into the 4-bit weights.
            from peft import PeftModel
            base, _ = load_base(model_cfg, torch.float32, for_training=False)
            merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
        else:
            merged = model.merge_and_unload()
        merged.save_pretrained(model_dir)
    else:
        model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    seconds = time.perf_counter() - start
    result = TrainResult(
        model_dir=str(model_dir), adapter_dir=str(adapter_dir) if adapter_dir else None,
        method=train_cfg.method, steps=train_cfg.max_steps,
        train_loss=history[-1][1] if history else float("nan"), val_loss=val_loss,
        tokens=tokens, seconds=seconds, loss_history=history)
    (out_dir / "train_result.json").write_text(json.dumps(result.__dict__, indent=2))
    return result
