"""The training loss from hidden states: fused chunked cross-entropy. Each chunk's logits
become their gradient in the forward pass (three matrix products a chunk, no recomputation),
so a 152k vocabulary's fp32 logits are never whole in memory; Liger's fused loss for
comparison. LossModel wraps a causal LM so its forward returns a micro-batch's summed token
loss. Importable without prefect, mlflow, dvc or GX.
"""

from __future__ import annotations

import functools

from ftpipe.training.batches import IGNORE_INDEX, collate


def loss_positions(labels, ignore_index: int = -100):
    """Indices of the labelled next-token positions of a (batch, tokens) label tensor, in the
    flattened (batch x (tokens - 1)) order chunked_loss_sum uses. Computed on the CPU before a
    micro-batch moves to the GPU: selecting rows by a boolean mask on the GPU would make the
    host wait for the forward pass to finish (a sync in the middle of every step)."""
    return (labels[:, 1:].reshape(-1) != ignore_index).nonzero().squeeze(1)


def chunked_loss_sum(hidden, lm_head_weight, labels, ignore_index: int = -100, chunk_tokens: int = 4096,
                     lm_head_bias=None, liger: bool = False, positions=None, compiled: bool = False):
    """Sum of next-token cross-entropy over labelled positions, from hidden states
    (batch, tokens, dim) and the output projection, `chunk_tokens` rows at a time: the full
    vocabulary's logits are never whole in memory (fused_linear_cross_entropy).

    positions: loss_positions(labels) computed ahead (on the CPU); None computes them here.
    compiled: the softmax/gradient pass of each chunk through torch.compile (train.compile, CUDA).
    liger: Liger's fused linear cross-entropy instead, where installed on a GPU (for
    comparison: ftpipe's was faster on both benchmark shapes, 2026-11-29 H200. Liger sizes its
    chunks as tokens / (vocab / hidden): ~130 tiny chunks a micro-batch on Qwen2.5-0.5B)."""
    h = hidden[:, :-1].reshape(-1, hidden.size(-1))
    y = labels[:, 1:].reshape(-1)
    if positions is None:
        positions = loss_positions(labels, ignore_index)
    positions = positions.to(h.device, non_blocking=True)
    h, y = h.index_select(0, positions), y.index_select(0, positions)   # only labelled rows cost a projection

    flce = _liger_flce() if h.is_cuda and liger else None
    if flce is not None:  # fused: gradients computed chunk by chunk in the forward pass
        w = lm_head_weight.to(h.dtype)
        b = lm_head_bias.to(h.dtype) if lm_head_bias is not None else None
        return flce(w, h, y, b).float()
    return fused_linear_cross_entropy(h, lm_head_weight, y, lm_head_bias, chunk_tokens, compiled)


# A chunk's logits are at most this many elements (1 GiB in fp32): the chunk's row count is
# capped by it for large vocabularies (Qwen2.5: 152k -> 1,765 rows).
CHUNK_LOGITS = 1 << 28


def fused_linear_cross_entropy(h, weight, y, bias=None, chunk_rows: int = 4096, compiled: bool = False):
    """sum_i CE(h_i @ weight.T + bias, y_i) for rows h (n, dim), targets y (n,), with the
    gradients of h, weight and bias computed chunk by chunk in the forward pass: each chunk's
    logits exist once, are turned into their gradient in place and are gone before the next
    chunk. Three matrix products per chunk (a checkpointed loss needs four) and no logits kept
    for the backward pass. Under autocast the products run in the autocast dtype; the softmax
    and the loss in fp32. compiled: each chunk's softmax/gradient pass is one torch.compile'd
    kernel (on CUDA; eager and in place otherwise)."""
    return _fused_ce().apply(h, weight, bias, y, chunk_rows, compiled)


def _ce_parts(logits, y):
    """(logits in fp32 or wider, their logsumexp per row, the chunk's summed CE)."""
    import torch

    x = logits.to(torch.promote_types(logits.dtype, torch.float32))
    lse = torch.logsumexp(x, dim=1, keepdim=True)
    return x, lse, (lse.squeeze(1) - x.gather(1, y[:, None]).squeeze(1)).sum()


def _ce_grad(logits, y):
    """(sum of CE over the rows, d CE / d logits in the logits' dtype) for one chunk; the
    version torch.compile fuses into one pass over the chunk's logits."""
    import torch

    x, lse, loss = _ce_parts(logits, y)
    onehot = torch.arange(x.size(1), device=x.device)[None, :] == y[:, None]
    return loss, (torch.exp(x - lse) - onehot.to(x.dtype)).to(logits.dtype)


def _ce_grad_inplace(logits, y):
    """_ce_grad in eager mode, reusing the fp32 buffer (one c x V fp32 buffer, not three)."""
    import torch

    x, lse, loss = _ce_parts(logits, y)
    x.sub_(lse).exp_()
    x.scatter_add_(1, y[:, None], torch.full((y.numel(), 1), -1.0, dtype=x.dtype, device=x.device))
    return loss, x.to(logits.dtype)


@functools.cache
def _compiled_ce_grad():
    import torch

    try:
        return torch.compile(_ce_grad, dynamic=True)
    except Exception:  # noqa: BLE001 - no inductor here: eager
        return _ce_grad_inplace


@functools.cache
def _fused_ce():
    """The autograd Function behind fused_linear_cross_entropy (built on first use: this
    module is imported where torch may not be)."""
    import torch

    class FusedLinearCE(torch.autograd.Function):
        @staticmethod
        def forward(ctx, h, weight, bias, y, chunk_rows, compiled):
            cdt = torch.get_autocast_dtype("cuda") if h.is_cuda and torch.is_autocast_enabled("cuda") else h.dtype
            need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
            need_b = bias is not None and ctx.needs_input_grad[2]
            with torch.autocast(h.device.type, enabled=False):
                hc, wc = h.to(cdt), weight.to(cdt)
                bc = bias.to(cdt) if bias is not None else None
                n, vocab = hc.size(0), wc.size(0)
                rows = max(64, min(chunk_rows or n, CHUNK_LOGITS // vocab))
                grad_fn = _compiled_ce_grad() if compiled and hc.is_cuda else _ce_grad_inplace
                loss = torch.zeros((), dtype=torch.promote_types(cdt, torch.float32), device=h.device)
                gh = torch.empty_like(hc) if need_h else None
                gw = torch.zeros_like(wc) if need_w else None
                gb = torch.zeros(vocab, dtype=loss.dtype, device=h.device) if need_b else None
                for i in range(0, n, rows):
                    hi, yi = hc[i:i + rows], y[i:i + rows]
                    logits = hi @ wc.t() if bc is None else torch.addmm(bc, hi, wc.t())
                    part, g = grad_fn(logits, yi)
                    del logits
                    loss += part
                    if need_h:
                        torch.mm(g, wc, out=gh[i:i + rows])
                    if need_w:
                        gw.addmm_(g.t(), hi)
                    if need_b:
                        gb += g.to(gb.dtype).sum(0)
            ctx.save_for_backward(gh, gw, gb)
            ctx.dtypes = (h.dtype, weight.dtype, bias.dtype if bias is not None else None)
            return loss

        @staticmethod
        def backward(ctx, grad_out):
            gh, gw, gb = ctx.saved_tensors
            hd, wd, bd = ctx.dtypes
            scale = lambda g, dt: None if g is None else (g * grad_out).to(dt)  # noqa: E731
            return scale(gh, hd), scale(gw, wd), scale(gb, bd), None, None, None

    return FusedLinearCE


_FLCE = None


def _liger_flce():
    global _FLCE
    if _FLCE is None:
        try:
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

            _FLCE = LigerFusedLinearCrossEntropyLoss(reduction="sum", ignore_index=-100)
        except Exception:  # noqa: BLE001 - not installed, or no triton/GPU: the chunked path
            _FLCE = False
    return _FLCE or None


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


class LossModel:
    """Wraps the (peft) causal LM so that its forward returns the summed token loss of a
    micro-batch, computed in chunks from the final hidden states (chunked_loss_sum).
    Built as an nn.Module on first use; DDP wraps this module, so gradient sync is intact."""

    @staticmethod
    def supported(core) -> bool:
        base = core.get_base_model() if hasattr(core, "get_base_model") else core
        cfg = base.config
        return (hasattr(base, "get_decoder") and base.get_output_embeddings() is not None
                and getattr(cfg, "final_logit_softcapping", None) is None
                and getattr(cfg, "logit_scale", None) is None
                and not getattr(base, "_ftpipe_no_chunked_loss", False))

    @staticmethod
    def build(core, chunk_tokens: int, liger: bool = False, compiled: bool = False):
        import torch

        from ftpipe.training.loss import chunked_loss_sum

        class _LossModel(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.core = core
                base = core.get_base_model() if hasattr(core, "get_base_model") else core
                object.__setattr__(self, "_body", base.get_decoder())
                object.__setattr__(self, "_head", base.get_output_embeddings())

            def forward(self, input_ids, labels, loss_positions=None, **kwargs):
                hidden = self._body(input_ids=input_ids, use_cache=False, **kwargs).last_hidden_state
                return chunked_loss_sum(hidden, self._head.weight, labels, IGNORE_INDEX, chunk_tokens,
                                        getattr(self._head, "bias", None), liger, loss_positions, compiled)

        return _LossModel()


def token_loss_sum(model, batch: dict) -> tuple:
    """(sum of token losses over labelled tokens, their count) for one micro-batch."""
    import torch

    kwargs = {"input_ids": batch["input_ids"], "use_cache": False}
    if "position_ids" in batch:
        kwargs["position_ids"] = batch["position_ids"]   # packed: no mask, positions restart
        kwargs |= {k: batch[k] for k in ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")
                   if k in batch}
    else:
        kwargs["attention_mask"] = batch["attention_mask"]
    logits = model(**kwargs).logits
    labels = batch["labels"][:, 1:]
    loss = torch.nn.functional.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.size(-1)), labels.reshape(-1),
        ignore_index=IGNORE_INDEX, reduction="sum")
    return loss, (labels != IGNORE_INDEX).sum()
