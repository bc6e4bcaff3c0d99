"""Varlen flash attention for packed rows: PyTorch's `torch.nn.attention.varlen.varlen_attn`,
registered as the transformers attention implementation "ftpipe_varlen". A packed row carries
`cu_seq_lens` boundaries; attention never crosses them, no padding is computed and no
(tokens x tokens) mask is built. Off CUDA the same interface runs PyTorch SDPA per segment
(exact, for tests and CPU runs).
"""

from __future__ import annotations

import inspect

_KERNEL: list = []
_SIGNATURES: dict = {}


NAME = "ftpipe_varlen"


_REGISTERED = False


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
        import torch
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface

        # Never traced by torch.compile (train.compile): the varlen kernel takes the longest
        # segment as a plain int that changes with every micro-batch; traced, each new value
        # would be a recompile. The layer compiles around it (one graph before, one after).
        AttentionInterface.register(NAME, torch.compiler.disable(_attention))
        AttentionMaskInterface.register(NAME, _mask)
        _REGISTERED = True
    return NAME
