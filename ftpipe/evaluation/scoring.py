"""Score a model on a test set: loss, perplexity and generation metrics, overall and per
slice, plus the generation checks the promotion gate requires.

Base, candidate and champion go through this same function on the same rows, so their
numbers are comparable. Generation is greedy, batched, left-padded and KV-cached.

Metrics (higher is better unless named a loss):
    eval_loss, perplexity     mean token loss on the completion, and its exp
    exact_match               answer == expected, whitespace-normalised
    token_f1                  SQuAD-style token overlap F1 (lower-cased, punctuation-free)
    rouge_l                   ROUGE-L F-measure (Google's rouge-score package)
    non_empty                 share of non-empty generations            (a gate check)
    pii_outputs               generations containing PII the prompt did not (a gate check)
Per slice (rows with a `slice`): "slice.<name>.<metric>" for the quality metrics.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ftpipe.config import EvalConfig
from ftpipe.data.formatting import answer_of, encode, normalize_answer, prompt_of

QUALITY = ("eval_loss", "perplexity", "exact_match", "token_f1", "rouge_l")
LOWER_IS_BETTER = frozenset({"eval_loss", "perplexity", "pii_outputs"})
_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")


def lower_is_better(metric: str) -> bool:
    return metric.rsplit(".", 1)[-1] in LOWER_IS_BETTER


@dataclass(frozen=True)
class ModelScores:
    model: str
    eval_loss: float
    perplexity: float
    exact_match: float
    n_examples: int
    token_f1: float = 0.0
    rouge_l: float = 0.0
    non_empty: float = 1.0
    pii_outputs: int = 0
    slices: dict[str, dict[str, float]] = field(default_factory=dict)
    predictions: list[dict] = field(default_factory=list, repr=False)

    def metrics(self) -> dict[str, float]:
        out = {"eval_loss": self.eval_loss, "perplexity": self.perplexity,
               "exact_match": self.exact_match, "token_f1": self.token_f1, "rouge_l": self.rouge_l,
               "non_empty": self.non_empty, "pii_outputs": float(self.pii_outputs)}
        for name, values in sorted(self.slices.items()):
            out |= {f"slice.{name}.{k}": v for k, v in values.items()}
        return out


# ------------------------------------------------------------------ text metrics

def _tokens(text: str) -> list[str]:
    return _PUNCT.sub(" ", (text or "").lower()).split()


def token_f1(prediction: str, expected: str) -> float:
    pred, gold = _tokens(prediction), _tokens(expected)
    if not pred or not gold:
        return float(pred == gold)
    common = sum((Counter(pred) & Counter(gold)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(gold)
    return 2 * precision * recall / (precision + recall)


_ROUGE = None


def rouge_l(prediction: str, expected: str) -> float:
    global _ROUGE
    if _ROUGE is None:
        from rouge_score import rouge_scorer

        _ROUGE = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    if not (expected or "").strip():
        return float(not (prediction or "").strip())
    return _ROUGE.score(expected, prediction or "")["rougeL"].fmeasure


def leaked_pii(prediction: str, prompt: str) -> list[str]:
    """PII kinds in the generation that the prompt did not itself contain."""
    from ftpipe.data.pii import find

    given = set(find(prompt))
    return sorted(set(find(prediction)) - given)


# ------------------------------------------------------------------ model side

def generate(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 64) -> list[str]:
    """Greedy completions of raw prompt strings, in order (batched, KV-cached)."""
    import torch

    device = next(model.parameters()).device
    tokenizer.padding_side = "left"
    model.eval()
    # Longest prompts first: batches of similar length waste less padding.
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    done: dict[int, str] = {}
    with torch.no_grad():
        for i in range(0, len(order), batch_size):
            idx = order[i: i + batch_size]
            enc = tokenizer([prompts[j] for j in idx], return_tensors="pt", padding=True,
                            add_special_tokens=True).to(device)
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                                 pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=tokenizer.eos_token_id)
            new = gen[:, enc["input_ids"].shape[1]:]
            for j, text in zip(idx, tokenizer.batch_decode(new, skip_special_tokens=True)):
                done[j] = text.strip()
    return [done[j] for j in range(len(prompts))]


def load_for_eval(model_dir: str, revision: str | None = None, trust_remote_code: bool = False,
                  allow_pickle_weights: bool = False):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    tok = AutoTokenizer.from_pretrained(model_dir, revision=revision, trust_remote_code=trust_remote_code)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, revision=revision, dtype=dtype, use_safetensors=None if allow_pickle_weights else True,
        trust_remote_code=trust_remote_code,
        device_map={"": 0} if torch.cuda.is_available() else None)
    return model, tok


def example_losses(model, encoded: list, batch_size: int, pad_id: int) -> list[tuple[float, int]]:
    """(sum of token losses, labelled tokens) per example, in order."""
    import torch

    from ftpipe.data.formatting import IGNORE_INDEX, collate

    device = next(model.parameters()).device
    model.eval()
    out: list[tuple[float, int]] = []
    with torch.no_grad():
        for i in range(0, len(encoded), batch_size):
            batch = {k: v.to(device) for k, v in collate(encoded[i: i + batch_size], pad_id).items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            labels = batch["labels"][:, 1:]
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].float().transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none")
            mask = labels != IGNORE_INDEX
            out.extend(zip(loss.sum(dim=1).tolist(), mask.sum(dim=1).tolist()))
    return out


def _aggregate(preds: list[dict], losses: list[tuple[float, int]]) -> dict[str, float]:
    tokens = sum(c for _, c in losses)
    loss = sum(s for s, _ in losses) / max(tokens, 1)
    n = max(len(preds), 1)
    return {"eval_loss": loss, "perplexity": math.exp(min(loss, 50.0)),
            "exact_match": sum(p["correct"] for p in preds) / n,
            "token_f1": sum(p["token_f1"] for p in preds) / n,
            "rouge_l": sum(p["rouge_l"] for p in preds) / n}


def score_predictions(rows: list[dict], prompts: list[str], answers: list[str],
                      losses: list[tuple[float, int]], name: str) -> ModelScores:
    """The metrics of given generations and per-example losses (pure: no model)."""
    from ftpipe.data.pii import scrub

    preds = []
    for r, p, a, (ls, lc) in zip(rows, prompts, answers, losses):
        expected = answer_of(r)
        leaks = leaked_pii(a, p)
        # scored as generated; kept (tables, reports) without PII its prompt did not hold
        preds.append({"prompt": p, "expected": expected, "prediction": scrub(a)[0] if leaks else a,
                      "correct": normalize_answer(a) == normalize_answer(expected),
                      "token_f1": round(token_f1(a, expected), 6), "rouge_l": round(rouge_l(a, expected), 6),
                      "loss": round(ls / max(lc, 1), 6), "slice": r.get("slice") or "",
                      "pii": ",".join(leaks)})
    overall = _aggregate(preds, losses)
    slices: dict[str, dict[str, float]] = {}
    for name_ in sorted({p["slice"] for p in preds if p["slice"]}):
        idx = [i for i, p in enumerate(preds) if p["slice"] == name_]
        slices[name_] = _aggregate([preds[i] for i in idx], [losses[i] for i in idx]) | {"n": float(len(idx))}
    return ModelScores(model=name, eval_loss=overall["eval_loss"], perplexity=overall["perplexity"],
                       exact_match=overall["exact_match"], token_f1=overall["token_f1"],
                       rouge_l=overall["rouge_l"], n_examples=len(rows),
                       non_empty=sum(bool(p["prediction"]) for p in preds) / max(len(preds), 1),
                       pii_outputs=sum(bool(p["pii"]) for p in preds), slices=slices, predictions=preds)


def evaluate_loaded(model, tok, rows: list[dict], cfg: EvalConfig, max_seq_len: int, name: str) -> ModelScores:
    if not rows:
        raise ValueError("no test examples to evaluate on")
    rows = rows[: cfg.max_examples] if cfg.max_examples else rows
    encoded = [encode(tok, r, max_seq_len, completion_only=True) for r in rows]
    losses = example_losses(model, encoded, cfg.batch_size, tok.pad_token_id)
    prompts = [prompt_of(r, tok) for r in rows]
    answers = generate(model, tok, prompts, cfg.max_new_tokens, cfg.batch_size)
    return score_predictions(rows, prompts, answers, losses, name)


def evaluate_model(model_dir: str, rows: list[dict], cfg: EvalConfig, max_seq_len: int = 256,
                   revision: str | None = None, trust_remote_code: bool = False,
                   name: str | None = None, regression: dict[str, list[dict]] | None = None,
                   allow_pickle_weights: bool = False
                   ) -> ModelScores | tuple[ModelScores, dict[str, ModelScores]]:
    """Score one checkpoint on `rows`; with `regression` ({set id: rows}) also on each of
    those sets (loading the model once) and return (scores, {set id: scores})."""
    model, tok = load_for_eval(model_dir, revision, trust_remote_code, allow_pickle_weights)
    label = name or str(Path(model_dir))
    scores = evaluate_loaded(model, tok, rows, cfg, max_seq_len, label)
    if regression is None:
        return scores
    reg_cfg = cfg.model_copy(update={"max_examples": cfg.regression_max_examples})
    return scores, {sid: evaluate_loaded(model, tok, r, reg_cfg, max_seq_len, f"{label} on {sid}")
                    for sid, r in regression.items() if r}
