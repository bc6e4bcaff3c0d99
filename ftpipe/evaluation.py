"""Score a model on a test split: eval loss, perplexity and exact match.

Base, candidate and champion go through this same function on the same test rows, so
their numbers are comparable. Generation is greedy, batched, left-padded, KV-cached.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from ftpipe.config import EvalConfig
from ftpipe.formatting import answer_of, encode, normalize_answer, prompt_of


@dataclass(frozen=True)
class ModelScores:
    model: str
    eval_loss: float
    perplexity: float
    exact_match: float
    n_examples: int
    predictions: list[dict] = field(default_factory=list, repr=False)

    def metrics(self) -> dict[str, float]:
        return {"eval_loss": self.eval_loss, "perplexity": self.perplexity,
                "exact_match": self.exact_match}


def generate(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 64) -> list[str]:
    """Greedy completions of raw prompt strings, in order."""
    import torch

    device = next(model.parameters()).device
    tokenizer.padding_side = "left"
    outputs: list[str] = []
    model.eval()
    with torch.no_grad():
        for i in range(0, len(prompts), batch_size):
            enc = tokenizer(prompts[i: i + batch_size], return_tensors="pt", padding=True).to(device)
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=tokenizer.eos_token_id)
            new = gen[:, enc["input_ids"].shape[1]:]
            outputs.extend(tokenizer.batch_decode(new, skip_special_tokens=True))
    return [o.strip() for o in outputs]


def load_for_eval(model_dir: str, revision: str | None = None, trust_remote_code: bool = False):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    tok = AutoTokenizer.from_pretrained(model_dir, revision=revision, trust_remote_code=trust_remote_code)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, revision=revision, dtype=dtype, use_safetensors=True,
        trust_remote_code=trust_remote_code,
        device_map={"": 0} if torch.cuda.is_available() else None)
    return model, tok


def evaluate_model(model_dir: str, rows: list[dict], cfg: EvalConfig, max_seq_len: int = 256,
                   revision: str | None = None, trust_remote_code: bool = False,
                   name: str | None = None) -> ModelScores:
    from ftpipe.training import mean_loss

    if not rows:
        raise ValueError("no test examples to evaluate on")
    rows = rows[: cfg.max_examples] if cfg.max_examples else rows
    model, tok = load_for_eval(model_dir, revision, trust_remote_code)
    encoded = [encode(tok, r, max_seq_len, completion_only=True) for r in rows]
    loss = mean_loss(model, encoded, cfg.batch_size, tok.pad_token_id)
    prompts = [prompt_of(r, tok) for r in rows]
    answers = generate(model, tok, prompts, cfg.max_new_tokens, cfg.batch_size)
    predictions = [
        {"prompt": p, "expected": answer_of(r), "prediction": a,
         "correct": normalize_answer(a) == normalize_answer(answer_of(r))}
        for r, p, a in zip(rows, prompts, answers)
    ]
    em = sum(p["correct"] for p in predictions) / len(predictions)
    return ModelScores(model=name or str(Path(model_dir)), eval_loss=loss,
                       perplexity=math.exp(min(loss, 50.0)), exact_match=em,
                       n_examples=len(rows), predictions=predictions)
