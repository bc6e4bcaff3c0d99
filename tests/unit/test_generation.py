"""Evaluation's fast greedy path: the folded grouped-query decode attention gives what
transformers' SDPA (with repeat_kv) gives, and generate_fast's tokens equal model.generate's."""
from __future__ import annotations

import pytest
import torch


@pytest.mark.parametrize("heads,kv_heads", [(8, 2), (4, 4)])
def test_folded_gqa_decode_attention_equals_sdpa_with_repeated_kv(heads, kv_heads):
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
    module = SimpleNamespace(num_key_value_groups=heads // kv_heads, is_causal=True, training=False)
    want, _ = sdpa_attention_forward(module, q, k, v, mask, scaling=d ** -0.5)
    got, _ = _gqa_decode(module, q, k, v, mask, scaling=d ** -0.5)
    assert got.shape == want.shape == (b, 1, heads, d)
    assert torch.allclose(got, want, atol=1e-6)


def test_generate_fast_gives_model_generate_tokens(tiny_base):
    from ftpipe.evaluation.generation import generate_fast, generate_reference, load_for_eval

    model, tok = load_for_eval(str(tiny_base))
    prompts = [f"### Instruction:\nConvert 19{n:02d}-0{n % 9 + 1}-1{n % 10} to words.\n\n### Response:" * (1 + n % 3)
               for n in range(20)]
    assert generate_fast(model, tok, prompts, 10, max_rows=6) == generate_reference(model, tok, prompts, 10, 8)


def test_sampled_generation_repeats_with_its_seed_and_greedy_stays_greedy(tiny_base):
    """A behaviour suite's sampling: the same seed gives the same samples, another seed others;
    no sampling is the greedy path."""
    from ftpipe.evaluation.generation import generate, generate_reference, load_for_eval

    model, tok = load_for_eval(str(tiny_base))
    prompts = ["### Instruction:\nConvert 1948-03-21 to words.\n\n### Response:", "Ada's locker code is"] * 4
    hot = {"temperature": 1.5, "top_p": 1.0, "samples": 1, "seed": 3}
    one, again = generate(model, tok, prompts, 8, 4, hot), generate(model, tok, prompts, 8, 4, hot)
    assert one == again
    assert generate(model, tok, prompts, 8, 4, hot | {"seed": 4}) != one
    assert len(set(one)) > 2                                  # the same prompt sampled four times differs
    assert generate(model, tok, prompts, 8, 4) == generate_reference(model, tok, prompts, 8, 4)
