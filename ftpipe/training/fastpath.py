"""Speed-ups for the training recipe, built from what PyTorch and transformers already give.

- Packed rows with varlen flash attention: `torch.nn.attention.varlen.varlen_attn` (PyTorch's
  own FlashAttention for concatenated sequences), registered as the transformers attention
  implementation "ftpipe_varlen". A packed row carries `cu_seq_lens` boundaries; attention
  never crosses them, no padding is computed and no (tokens x tokens) mask is built. Off CUDA
  the same interface runs PyTorch SDPA per segment (exact, for tests and CPU runs).
- Fused chunked cross-entropy: the loss from the final hidden states in chunks of rows, each
  chunk's logits turned into their gradient in the forward pass (three matrix products a
  chunk, no recomputation), so a 152k vocabulary's fp32 logits are never whole in memory.
  Liger's fused linear cross-entropy where its chunking suits the shape (GPU).
- Liger kernels (RMSNorm, SwiGLU, RoPE) on models Liger supports, when installed (GPU).

Importable without prefect, mlflow, dvc or GX.
"""

from __future__ import annotations

import functools
import inspect

NAME = "ftpipe_varlen"
_REGISTERED = False


_KERNEL: list = []


def varlen_kernel():
    """PyTorch's varlen flash attention, or None where this build/device lacks it."""
    if not _KERNEL:
        try:
            import torch
            from torch.nn.attention.varlen import varlen_attn
            _KERNEL.append(varlen_attn if torch.cuda.is_available() else None)
        except ImportError:
            _KERNEL.append(None)
    return _KERNEL[0]


_SIGNATURES: dict = {}


def _params(fn):
    # cached: inspect.signature on every layer's call is CPU time, and torch.compile cannot trace it
    key = id(fn)
    if key not in _SIGNATURES:
        _SIGNATURES[key] = frozenset(inspect.signature(fn).parameters)
    return _SIGNATURES[key]


def _takes(fn, name: str) -> bool:
    return name in _params(fn)


def _causal_kwargs(fn) -> dict:
    params = _params(fn)
    if "is_causal" in params:
        return {"is_causal": True}
    if "window_size" in params:
        return {"window_size": (-1, 0)}
    raise RuntimeError("torch varlen_attn offers no causal option in this version")


def _attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """(1, heads, tokens, dim) packed q/k/v -> (1, tokens, heads, dim)."""
    import torch

    cu = kwargs.get("cu_seq_lens_q")
    if cu is None:  # a padded or single-sequence batch (evaluation): plain SDPA with its mask
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    max_len = int(kwargs.get("max_length_q") or int((cu[1:] - cu[:-1]).max()))
    q, k, v = (t.transpose(1, 2).squeeze(0) for t in (query, key, value))   # (tokens, heads, dim)
    fn = varlen_kernel()
    in_dtype = q.dtype
    if fn is not None and q.is_cuda and in_dtype == torch.float32 and torch.is_autocast_enabled("cuda"):
        # fp32 master weights under autocast: RoPE ran in fp32; flash attention wants bf16/fp16
        half = torch.get_autocast_dtype("cuda")
        q, k, v = q.to(half), k.to(half), v.to(half)
    gqa = k.shape[1] != q.shape[1]
    kw = _causal_kwargs(fn) if fn is not None else {}
    if gqa and not (fn is not None and _takes(fn, "enable_gqa")):
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    elif gqa:
        kw["enable_gqa"] = True
    if fn is not None and q.is_cuda and q.dtype in (torch.bfloat16, torch.float16):
        out = fn(q, k, v, cu.to(torch.int32), cu.to(torch.int32), max_len, max_len, scale=scaling, **kw)
        return out.to(in_dtype).unsqueeze(0), None
    else:
        out = torch.empty_like(q)
        bounds = cu.tolist()
        for a, b in zip(bounds[:-1], bounds[1:]):
            out[a:b] = torch.nn.functional.scaled_dot_product_attention(
                q[a:b].transpose(0, 1), k[a:b].transpose(0, 1), v[a:b].transpose(0, 1),
                is_causal=True, scale=scaling).transpose(0, 1)
    return out.unsqueeze(0), None


def _mask(*args, **kwargs):
    """Packed rows (no attention_mask) need no mask: the boundaries travel as cu_seq_lens.
    Padded batches get transformers' SDPA mask."""
    from transformers.masking_utils import sdpa_mask

    if kwargs.get("attention_mask") is None:
        return None
    return sdpa_mask(*args, **kwargs)


def register() -> str:
    """Register "ftpipe_varlen" with transformers (attention and its mask); returns the name."""
    global _REGISTERED
    if not _REGISTERED:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface

        import torch

        # Never traced by torch.compile (train.compile): the varlen kernel takes the longest
        # segment as a plain int that changes with every micro-batch; traced, each new value
        # would be a recompile. The layer compiles around it (one graph before, one after).
        AttentionInterface.register(NAME, torch.compiler.disable(_attention))
        AttentionMaskInterface.register(NAME, _mask)
        _REGISTERED = True
    return NAME


def packed_kwargs(lengths: list[int], device) -> dict:
    """The forward kwargs of one packed row holding examples of these lengths."""
    import torch

    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(lengths, dtype=torch.int32), 0)
    cu = cu.to(device)
    m = max(lengths)
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": m, "max_length_k": m}


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


def apply_liger(model, log=lambda msg: None) -> bool:
    """Liger's RMSNorm, SwiGLU and RoPE kernels on the model (before adapters are added),
    where Liger supports its architecture; False if Liger or a GPU is missing."""
    import torch

    if not torch.cuda.is_available():
        return False
    try:
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN, _apply_liger_kernel_to_instance
    except Exception:  # noqa: BLE001
        return False
    if getattr(model.config, "model_type", None) not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        return False
    _apply_liger_kernel_to_instance(model, rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=False)
    log(f"Liger kernels (RMSNorm, SwiGLU, RoPE) on {model.config.model_type}")
    return True


class adapter_autocast:
    """While active, LoRA layers leave their input in the autocast dtype instead of casting it
    to the adapters' fp32 (peft's default): under bf16 autocast the adapter matmuls run in bf16
    either way, and the cast copied every linear layer's input (~20% of a LoRA step's GPU
    time on Llama-3.2-1B, measured). Adapter weights stay fp32 for the optimizer."""

    def __init__(self, model, active: bool):
        self.layers = [m for m in model.modules() if hasattr(m, "cast_input_dtype_enabled")] if active else []

    def __enter__(self):
        for m in self.layers:
            m.cast_input_dtype_enabled = False
        return self

    def __exit__(self, *exc):
        for m in self.layers:
            m.cast_input_dtype_enabled = True
        return False


def compile_layers(model, log=lambda msg: None) -> int:
    """torch.compile every decoder layer in place (regional compilation: the layers share one
    code object, so one compile serves all of them); the token dimension turns dynamic on the
    first new length, so packed micro-batches of any length reuse the graph. Returns how many layers were compiled (0 off CUDA)."""
    import torch

    if not torch.cuda.is_available():
        return 0
    # Every decoder layer shares one code object, so its graphs (training and no-grad
    # validation, static then dynamic shapes, each model a process trains) count against one
    # recompile limit; torch's default of 8 was hit by one test process training 4 models.
    import torch._dynamo

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = base.get_decoder().layers if hasattr(base, "get_decoder") else []
    for layer in layers:
        layer.compile()
    log(f"torch.compile: {len(layers)} decoder layers (dynamic shapes)")
    return len(layers)
