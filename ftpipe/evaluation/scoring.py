"""Score a model on a test set: loss, perplexity and generation metrics (ftpipe.evaluation.
metrics), overall and per slice, plus the generation checks the promotion gate requires.
Base, candidate and champion go through this same function on the same rows, so their
numbers are comparable.
"""

from __future__ import annotations

from pathlib import Path

from ftpipe.config import EvalConfig
from ftpipe.data.formatting import prompt_of
from ftpipe.data.records import is_pair, rejected_view
from ftpipe.evaluation.generation import generate, load_for_eval
from ftpipe.evaluation.metrics import ModelScores, score_predictions
from ftpipe.training.batches import encode

# ------------------------------------------------------------------ text metrics


# ------------------------------------------------------------------ model side


def example_losses(model, encoded: list, batch_size: int, pad_id: int) -> list[tuple[float, int]]:
    """(sum of token losses, labelled tokens) per example, in order."""
    import torch

    from ftpipe.training.batches import IGNORE_INDEX, collate

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


def evaluate_loaded(model, tok, rows: list[dict], cfg: EvalConfig, max_seq_len: int, name: str,
                    suites: list | None = None) -> ModelScores:
    """Scores on rows; with suites (behaviour.Suite), each case's result in .behaviour."""
    if not rows:
        raise ValueError("no test examples to evaluate on")
    if cfg.max_examples:      # the first N rows of each kind: SFT rows and preference pairs
        sft = [r for r in rows if not is_pair(r)][: cfg.max_examples]
        rows = sft + [r for r in rows if is_pair(r)][: cfg.max_examples]
    encoded = [encode(tok, r, max_seq_len, completion_only=True) for r in rows]
    losses = example_losses(model, encoded, cfg.batch_size, tok.pad_token_id)
    # preference pairs: log p(chosen) - log p(rejected), the chosen answers' losses already above
    at = [i for i, r in enumerate(rows) if is_pair(r)]
    rejected = example_losses(model, [encode(tok, rejected_view(rows[i]), max_seq_len, completion_only=True)
                                      for i in at], cfg.batch_size, tok.pad_token_id) if at else []
    logratios = [rl - losses[i][0] for i, (rl, _) in zip(at, rejected)]
    prompts = [prompt_of(r, tok) for r in rows]
    answers = generate(model, tok, prompts, cfg.max_new_tokens, cfg.batch_size)
    scores = score_predictions(rows, prompts, answers, losses, name, logratios)
    if suites:
        from dataclasses import replace

        from ftpipe.evaluation.behaviour import answerer, run_suites

        scores = replace(scores, behaviour=run_suites(suites, answerer(model, tok, cfg.batch_size)))
    return scores


def evaluate_model(model_dir: str, rows: list[dict], cfg: EvalConfig, max_seq_len: int = 256,
                   revision: str | None = None, trust_remote_code: bool = False,
                   name: str | None = None, regression: dict[str, list[dict]] | None = None,
                   allow_pickle_weights: bool = False, adapter: str | None = None, suites: list | None = None
                   ) -> ModelScores | tuple[ModelScores, dict[str, ModelScores]]:
    """Score one checkpoint on `rows`; with `regression` ({set id: rows}) also on each of
    those sets (loading the model once) and return (scores, {set id: scores}). adapter: a
    PEFT folder put on model_dir (an adapter version's base). suites: behaviour suites run
    on the model too (scores.behaviour)."""
    model, tok = load_for_eval(model_dir, revision, trust_remote_code, allow_pickle_weights, adapter)
    label = name or str(Path(model_dir))
    scores = evaluate_loaded(model, tok, rows, cfg, max_seq_len, label, suites)
    if regression is None:
        return scores
    reg_cfg = cfg.model_copy(update={"max_examples": cfg.regression_max_examples})
    return scores, {sid: evaluate_loaded(model, tok, r, reg_cfg, max_seq_len, f"{label} on {sid}")
                    for sid, r in regression.items() if r}
