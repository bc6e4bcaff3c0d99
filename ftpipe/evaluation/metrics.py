"""Metrics of generations and losses, pure: no model here.

    eval_loss, perplexity     mean token loss on the completion, and its exp
    exact_match               answer == expected, whitespace-normalised
    token_f1                  SQuAD-style token overlap F1 (lower-cased, punctuation-free)
    rouge_l                   ROUGE-L F-measure (Google's rouge-score package)
    non_empty                 share of non-empty generations            (a gate check)
    pii_outputs               generations containing PII the prompt did not (a gate check)
Preference pairs in the test set (their chosen answer is what the metrics above compare with):
    pref_accuracy             share of pairs whose chosen answer the model gives the higher log-prob
    reward_accuracy           share of pairs where the model's chosen-over-rejected log-ratio beats the
                              base model's (DPO's implicit reward, the base model as reference)
    reward_margin             the mean of that log-ratio gain over the base model (nats)
    win_rate                  candidate vs champion: share of pairs where the candidate's log-ratio beats
                              the champion's (ties count half)
Per slice (rows with a `slice`): "slice.<name>.<metric>" for the quality metrics.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from dataclasses import dataclass, field

from ftpipe.data.formatting import answer_of, normalize_answer

_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")



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
    pair_logratios: list[float] = field(default_factory=list, repr=False)  # log p(chosen) - log p(rejected)
    relative: dict[str, float] = field(default_factory=dict)   # reward_accuracy, reward_margin, win_rate
    behaviour: list = field(default_factory=list, repr=False)   # behaviour.CaseResult per suite case

    @property
    def pref_accuracy(self) -> float | None:
        r = self.pair_logratios
        return sum(x > 0 for x in r) / len(r) if r else None

    def metrics(self) -> dict[str, float]:
        out = {"eval_loss": self.eval_loss, "perplexity": self.perplexity,
               "exact_match": self.exact_match, "token_f1": self.token_f1, "rouge_l": self.rouge_l,
               "non_empty": self.non_empty, "pii_outputs": float(self.pii_outputs)}
        if self.pair_logratios:
            out["pref_accuracy"] = self.pref_accuracy
        out |= self.relative
        for name, values in sorted(self.slices.items()):
            out |= {f"slice.{name}.{k}": v for k, v in values.items()}
        return out


def preference_metrics(model: list[float], base: list[float], champion: list[float] | None = None
                       ) -> dict[str, float]:
    """A model's preference metrics relative to the base model's (and the champion's) log-ratios
    on the same pairs, in the same order."""
    if not model or len(model) != len(base):
        return {}
    gain = [m - b for m, b in zip(model, base)]
    out = {"reward_accuracy": sum(g > 0 for g in gain) / len(gain), "reward_margin": sum(gain) / len(gain)}
    if champion is not None and len(champion) == len(model):
        out["win_rate"] = sum(1.0 if m > c else 0.5 if m == c else 0.0 for m, c in zip(model, champion)) / len(model)
    return out


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


def _aggregate(preds: list[dict], losses: list[tuple[float, int]]) -> dict[str, float]:
    tokens = sum(c for _, c in losses)
    loss = sum(s for s, _ in losses) / max(tokens, 1)
    n = max(len(preds), 1)
    return {"eval_loss": loss, "perplexity": math.exp(min(loss, 50.0)),
            "exact_match": sum(p["correct"] for p in preds) / n,
            "token_f1": sum(p["token_f1"] for p in preds) / n,
            "rouge_l": sum(p["rouge_l"] for p in preds) / n}


def score_predictions(rows: list[dict], prompts: list[str], answers: list[str],
                      losses: list[tuple[float, int]], name: str,
                      pair_logratios: list[float] | None = None) -> ModelScores:
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
                       pii_outputs=sum(bool(p["pii"]) for p in preds), slices=slices, predictions=preds,
                       pair_logratios=list(pair_logratios or []))
