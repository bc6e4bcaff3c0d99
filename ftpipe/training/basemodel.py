"""Build the tiny default base model: tokenizer, Llama architecture, brief pretraining.

Run by the DVC stage `base_model` (`python -m ftpipe.data.stages base-model`). The result is a
normal Hugging Face checkpoint (safetensors + tokenizer files) that the rest of ftpipe
loads with `from_pretrained`, exactly like a hub id or a local Qwen/Llama directory.

Two details make the 2M-parameter model able to learn the date task at all:
- digits are split one by one before byte-level BPE, so "1991" is four tokens the model
  can copy (with merged digit tokens exact match stayed near 0);
- prompts end without a trailing space and completions start with one, so the boundary
  tokenizes identically in training and generation.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from ftpipe.config import BuildConfig

SPECIAL = {"pad": "<|pad|>", "bos": "<|bos|>", "eos": "<|eos|>",
           "im_start": "<|im_start|>", "im_end": "<|im_end|>"}

# ChatML-style template, used for chat-format data (messages with system/user/assistant).
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass(frozen=True)
class BuildResult:
    path: str
    parameters: int
    pretrain_loss: float | None
    seconds: float


def build_tokenizer(corpus: list[str], vocab_size: int):
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    bos_id = tok.token_to_id(SPECIAL["bos"])
    # Like Llama: the tokenizer puts BOS in front of every encoded text by itself.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{SPECIAL['bos']} $A", pair=f"{SPECIAL['bos']} $A $B",
        special_tokens=[(SPECIAL["bos"], bos_id)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=SPECIAL["bos"], eos_token=SPECIAL["eos"], pad_token=SPECIAL["pad"],
        additional_special_tokens=[SPECIAL["im_start"], SPECIAL["im_end"]],
        chat_template=CHAT_TEMPLATE,
        model_max_length=1024,
    )


def build_base_model(corpus_path: Path, out_dir: Path, cfg: BuildConfig,
                     log=print) -> BuildResult:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    # The corpus is JSONL, one {"text": ...} document a line (documents may span lines).
    lines = [json.loads(ln)["text"] for ln in corpus_path.read_text(encoding="utf-8").splitlines()
             if ln.strip()]
    tokenizer = build_tokenizer(lines, cfg.vocab_size)

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.heads,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"base model: Llama {cfg.layers} layers x {cfg.hidden_size} hidden, "
        f"{n_params / 1e6:.2f}M parameters, vocab {len(tokenizer)}")

    # Pretraining: the corpus as one token stream (EOS between documents), cut into blocks.
    # 32 blocks x 128 tokens = 4,096 tokens a step; 60 steps see ~0.25M tokens (~25 s here).
    ids: list[int] = []
    for line in lines:
        # BOS + text + EOS per document: fine-tuning and generation prompts start with BOS too.
        ids.extend(tokenizer(line)["input_ids"])
        ids.append(tokenizer.eos_token_id)
    data = torch.tensor(ids, dtype=torch.long)
    n_blocks = len(data) // cfg.block_size
    blocks = data[: n_blocks * cfg.block_size].view(n_blocks, cfg.block_size)
    gen = torch.Generator().manual_seed(cfg.seed)
    loss_value = None
    if cfg.pretrain_steps:
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.pretrain_lr, weight_decay=0.01)
        # warm-up over 10% of the steps, at least 2 (OneCycleLR divides by zero below that);
        # under 4 steps: a constant rate
        sched = torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=cfg.pretrain_lr, total_steps=cfg.pretrain_steps,
            pct_start=max(0.1, 2 / cfg.pretrain_steps)) if cfg.pretrain_steps >= 4 else \
            torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
        model.train()
        for step in range(1, cfg.pretrain_steps + 1):
            batch = blocks[torch.randint(0, n_blocks, (cfg.pretrain_batch_size,), generator=gen)]
            loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            loss_value = loss.item()
            if step % 50 == 0 or step == cfg.pretrain_steps:
                log(f"pretrain step {step}/{cfg.pretrain_steps} loss {loss_value:.3f}")

    out_dir.mkdir(parents=True, exist_ok=True)
    model.eval()
    model.save_pretrained(out_dir)  # safetensors
    tokenizer.save_pretrained(out_dir)
    seconds = time.perf_counter() - start
    (out_dir / "build_info.json").write_text(json.dumps({
        "builder": "ftpipe.training.basemodel", "config": cfg.model_dump(), "parameters": n_params,
        "corpus_tokens": len(ids), "pretrain_loss": loss_value,
    }, indent=2, sort_keys=True))
    return BuildResult(str(out_dir), n_params, loss_value, seconds)
