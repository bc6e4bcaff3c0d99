"""Evaluation's fast greedy path: the folded grouped-query decode attention gives what
transformers' SDPA (with repeat_kv) gives, and generate_fast's tokens equal model.generate's."""
from __future__ import annotations

import pytest
import torch


@pytest.mark.parametrize("heads,kv_heads", [(8, 2), (4, 4)])
@pytest.mark.parametrize("additive", [False, True], ids=["bool-mask", "additive-mask"])
def test_folded_gqa_decode_attention_equals_sdpa_with_repeated_kv(heads, kv_heads, additive):
    from types import SimpleNamespace

    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from ftpipe.evaluation.generation import _gqa_decode

    torch.manual_seed(0)
    b, length, d = 3, 37, 16
    q = torch.randn(b, heads, 1, d)
    k, v = torch.randn(b, kv_heads, length, d), torch.randn(b, kv_heads, length, d)
    mask = torch.ones(b, 1, 1, length, dtype=torch.bool)
    mask[0, ..., :5] = False                          # left padding of two rows
    mask[2, ..., :11] = False
    if additive:   # the static decode's mask: 0 where open, the dtype's minimum where not
        mask = torch.zeros(mask.shape).masked_fill_(~mask, torch.finfo(torch.float32).min)
    module = SimpleNamespace(num_key_value_groups=heads // kv_heads, is_causal=True, training=False)
    want, _ = sdpa_attention_forward(module, q, k, v, mask, scaling=d ** -0.5)
    got, _ = _gqa_decode(module, q, k, v, mask, scaling=d ** -0.5)
    assert got.shape == want.shape == (b, 1, heads, d)
    assert torch.allclose(got, want, atol=1e-6)


PROMPTS = [f"### Instruction:\nConvert 19{n:02d}-0{n % 9 + 1}-1{n % 10} to words.\n\n### Response:" * (1 + n % 3)
           for n in range(20)]


@pytest.mark.parametrize("static", [False, True], ids=["shrinking-batch", "static-cache"])
def test_generate_fast_gives_model_generate_tokens(tiny_base, static):
    """Both decode loops (rows leave the batch; a fixed cache replayed as one CUDA graph on a GPU,
    run eagerly here) give model.generate's greedy tokens, on the trained tiny base."""
    from ftpipe.evaluation.generation import generate_fast, generate_reference, load_for_eval

    model, tok = load_for_eval(str(tiny_base))
    assert generate_fast(model, tok, PROMPTS, 10, max_rows=6, static=static) == \
        generate_reference(model, tok, PROMPTS, 10, 8)


def test_static_decode_on_a_grouped_query_model_with_early_stops(tmp_path):
    """A random Qwen2-shaped model (grouped-query attention, tied embeddings) whose
    end-of-sequence token is one it emits mid-answer in some rows, so rows finish at different
    steps: the static decode cuts each row at its own end and matches model.generate."""
    from collections import Counter

    from ftpipe.evaluation.generation import generate_fast, generate_reference, load_for_eval
    from ftpipe.training.families import random_model

    random_model("qwen2", tmp_path / "m", shape="qwen2-tiny")
    model, tok = load_for_eval(str(tmp_path / "m"))
    model = model.float()   # exact on any device (on a GPU it loads in bf16, where these logits tie)
    with torch.no_grad():   # at init scale every row repeats one token: make the answers differ
        for w in model.parameters():
            if w.dim() == 2:
                w.mul_(10)
    free = generate_fast(model, tok, PROMPTS, 12, max_rows=7, return_ids=True)
    # the token that ends the most rows early without ending all of them at the same step
    counts = Counter(t for row in free for t in set(row[1:-1]))
    stop = next(t for t, n in counts.most_common() if n < len(free))
    tok.eos_token = tok.convert_ids_to_tokens(stop)
    want = generate_reference(model, tok, PROMPTS, 12, 8)
    ids = generate_fast(model, tok, PROMPTS, 12, max_rows=7, static=True, return_ids=True)
    assert generate_fast(model, tok, PROMPTS, 12, max_rows=7, static=True) == want
    assert len({len(row) for row in ids}) > 2 and all(row[-1] == stop for row in ids if len(row) < 12)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the GPU's bf16 kernels")
def test_folded_decode_attention_in_bf16_on_a_gpu():
    """On a GPU in bf16 the folded decode attention is as close to the fp32 attention as
    transformers' SDPA over repeated keys and values is."""
    from types import SimpleNamespace

    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from ftpipe.evaluation.generation import _gqa_decode

    torch.manual_seed(0)
    b, heads, kv_heads, length, d = 16, 32, 8, 300, 64
    q = torch.randn(b, heads, 1, d, device="cuda")
    k, v = torch.randn(b, kv_heads, length, d, device="cuda"), torch.randn(b, kv_heads, length, d, device="cuda")
    mask = torch.zeros(b, 1, 1, length, device="cuda")
    mask[::2, ..., :40] = torch.finfo(torch.float32).min
    module = SimpleNamespace(num_key_value_groups=heads // kv_heads, is_causal=True, training=False)
    exact, _ = sdpa_attention_forward(module, q, k, v, mask, scaling=d ** -0.5)
    half = [t.bfloat16() for t in (q, k, v, mask)]
    fused, _ = sdpa_attention_forward(module, *half, scaling=d ** -0.5)
    got, _ = _gqa_decode(module, *half, scaling=d ** -0.5)
    assert got.dtype == torch.bfloat16 and got.shape == (b, 1, heads, d)
    assert (got.float() - exact).abs().max() <= 2 * (fused.float() - exact).abs().max() + 1e-3
