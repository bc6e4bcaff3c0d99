"""Direct preference optimisation: the pieces the recipe calls when train.objective is dpo.

    pairs = encode_pairs(tokenizer, rows, max_len)           # (chosen, rejected) token ids, prompt masked
    ref = reference_logps(core, pairs, ...)                  # the start weights' log-probs, once
    loss_sum, n = dpo_forward_backward(...)                  # one step's pairs

A pair's log-prob is the sum of its answer tokens' log-probs (the prompt is shared and
masked). The reference is the weights training starts from (the base model, or the
champion in an incremental run), scored once before the first step and kept beside the
checkpoints (a resumed run reads them back): no second copy of the model is ever in memory,
whatever the method (full, LoRA, QLoRA, or a champion's adapter continued).

Losses (beta = train.dpo.beta, d = (pi_c - ref_c) - (pi_r - ref_r)):
    sigmoid   -log sigmoid(beta * d)                           (Rafailov et al. 2023)
    ipo       (d' - 1 / (2 beta))^2, d' on mean token log-probs  (Azar et al. 2023)
Log-probs come from the final hidden states in chunks of rows (each chunk's logits are
recomputed in the backward pass, never all kept), so a 152k vocabulary costs no full logits.
Importable without prefect, mlflow, dvc or GX.
"""

from __future__ import annotations

from ftpipe.data.records import is_pair, rejected_view
from ftpipe.training.batches import IGNORE_INDEX, collate, encode

CHUNK_ROWS = 2048


def encode_pairs(tokenizer, rows: list[dict], max_len: int) -> list[tuple]:
    """(chosen ids/labels, rejected ids/labels) of every preference pair among rows."""
    return [(encode(tokenizer, r, max_len, True), encode(tokenizer, rejected_view(r), max_len, True))
            for r in rows if is_pair(r)]


def pair_batch(pairs: list[tuple], pad_id: int, multiple: int = 1) -> dict:
    """One padded batch: the chosen answers in rows [0, n), the rejected in [n, 2n); the width
    rounded up to `multiple` (on a GPU: few distinct shapes, so compiled layers rarely recompile)."""
    import torch.nn.functional as F

    b = collate([c for c, _ in pairs] + [r for _, r in pairs], pad_id)
    extra = -b["input_ids"].size(1) % multiple
    if extra:
        b = {"input_ids": F.pad(b["input_ids"], (0, extra), value=pad_id),
             "attention_mask": F.pad(b["attention_mask"], (0, extra), value=0),
             "labels": F.pad(b["labels"], (0, extra), value=IGNORE_INDEX)}
    b["real"] = b["attention_mask"].sum()
    return b


def width_multiple(device) -> int:
    return 64 if getattr(device, "type", str(device)) == "cuda" else 1


def _decoder_and_head(core):
    from ftpipe.training.loss import LossModel

    if not LossModel.supported(core):
        return None, None
    base = core.get_base_model() if hasattr(core, "get_base_model") else core
    return base.get_decoder(), base.get_output_embeddings()


def sequence_logps(core, batch: dict, chunk_rows: int = CHUNK_ROWS):
    """(sum of log-probs of each row's labelled tokens, their count), per row of the batch."""
    import torch
    from torch.utils.checkpoint import checkpoint

    labels = batch["labels"][:, 1:]
    mask = labels != IGNORE_INDEX
    body, head = _decoder_and_head(core)
    if body is None:   # a model whose logits need its own forward (softcapping, scaled logits)
        logits = core(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        logp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        return (logp * mask).sum(1), mask.sum(1)
    hidden = body(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                  use_cache=False).last_hidden_state[:, :-1]
    rows_of = mask.nonzero()                       # (labelled positions, 2): row, position
    h = hidden[rows_of[:, 0], rows_of[:, 1]]
    y = labels[rows_of[:, 0], rows_of[:, 1]]
    bias = getattr(head, "bias", None)

    def chunk_logp(hc, yc):
        logits = hc @ head.weight.to(hc.dtype).t()
        if bias is not None:
            logits = logits + bias.to(logits.dtype)
        return torch.log_softmax(logits.float(), -1).gather(-1, yc.unsqueeze(-1)).squeeze(-1)

    parts = []
    for i in range(0, h.size(0), chunk_rows):
        hc, yc = h[i: i + chunk_rows], y[i: i + chunk_rows]
        parts.append(checkpoint(chunk_logp, hc, yc, use_reentrant=False) if torch.is_grad_enabled()
                     else chunk_logp(hc, yc))
    token_logp = torch.cat(parts) if parts else h.new_zeros(0, dtype=torch.float32)
    sums = torch.zeros(labels.size(0), dtype=torch.float32, device=h.device).index_add(0, rows_of[:, 0], token_logp)
    return sums, mask.sum(1)


def pair_logps(core, batch: dict, ipo: bool = False):
    """(chosen, rejected) log-probs of a pair_batch: sums, or per-token means for IPO."""
    sums, counts = sequence_logps(core, batch)
    if ipo:
        sums = sums / counts.clamp(min=1)
    n = sums.size(0) // 2
    return sums[:n], sums[n:]


def reference_logps(core, pairs: list[tuple], batch_size: int, pad_id: int, ipo: bool, device,
                    max_tokens: int = 65536):
    """The reference log-probs (n, 2) of pairs under the weights as they are now (no grad),
    in batches of similar lengths (little padding; at most batch_size pairs or max_tokens)."""
    import torch

    was = core.training
    core.eval()
    out = torch.zeros(len(pairs), 2)
    longest = [max(len(c[0]), len(r[0])) for c, r in pairs]
    order = sorted(range(len(pairs)), key=longest.__getitem__)   # a batch's width is its last pair's
    multiple = width_multiple(device)
    with torch.no_grad():
        at = 0
        while at < len(order):
            take = 1
            while at + take < len(order) and take < batch_size \
                    and 2 * (take + 1) * longest[order[at + take]] <= max_tokens:
                take += 1
            idx = order[at: at + take]
            b = pair_batch([pairs[i] for i in idx], pad_id, multiple)
            c, r = pair_logps(core, {k: v.to(device) for k, v in b.items() if k != "real"}, ipo)
            out[idx] = torch.stack([c, r], 1).float().cpu()
            at += take
    core.train(was)
    return out


def dpo_losses(pc, pr, ref, beta: float, kind: str):
    """Per-pair losses and implicit rewards (beta x log-ratio to the reference)."""
    import torch
    import torch.nn.functional as F

    chosen_reward = beta * (pc - ref[:, 0])
    rejected_reward = beta * (pr - ref[:, 1])
    d = (pc - ref[:, 0]) - (pr - ref[:, 1])
    losses = (d - 1 / (2 * beta)) ** 2 if kind == "ipo" else -F.logsigmoid(beta * d)
    return losses, chosen_reward.detach(), rejected_reward.detach(), torch.as_tensor(d)


def dpo_forward_backward(core, batches: list[dict], ref, cfg, scale: float, autocast, adapter_cast, device):
    """Forward and backward over a step's pair micro-batches (each with its pairs' `index`
    into ref); each pair's loss weighted by `scale`. Returns (summed loss, summed reward
    accuracy, summed margin) as device tensors."""
    import torch

    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    acc = torch.zeros((), dtype=torch.float64, device=device)
    margin = torch.zeros((), dtype=torch.float64, device=device)
    for b in batches:
        index = b.pop("index")
        b.pop("real", None)
        with autocast, adapter_cast:
            pc, pr = pair_logps(core, b, cfg.dpo.loss == "ipo")
        losses, cr, rr, _ = dpo_losses(pc, pr, ref[index].to(device), cfg.dpo.beta, cfg.dpo.loss)
        (losses.sum() * scale).backward()
        loss_sum += losses.detach().sum().double()
        acc += (cr > rr).sum().double()
        margin += (cr - rr).sum().double()
    return loss_sum, acc, margin


def dpo_val_loss(core, pairs: list[tuple], ref, cfg, batch_size: int, pad_id: int, device) -> float:
    """Mean DPO loss over validation pairs (no grad)."""
    import torch

    if not pairs:
        return float("nan")
    was = core.training
    core.eval()
    total = 0.0
    with torch.no_grad():
        for i in range(0, len(pairs), batch_size):
            b = pair_batch(pairs[i: i + batch_size], pad_id)
            pc, pr = pair_logps(core, {k: v.to(device) for k, v in b.items() if k != "real"}, cfg.dpo.loss == "ipo")
            losses, *_ = dpo_losses(pc, pr, ref[i: i + batch_size].to(device), cfg.dpo.beta, cfg.dpo.loss)
            total += float(losses.sum())
    core.train(was)
    return total / len(pairs)
