"""The training loss from hidden states (ftpipe.training.loss): chunked, gradients computed in the
forward pass, equal to plain cross-entropy over the full logits."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from ftpipe.training.loss import chunked_loss_sum, fused_linear_cross_entropy, loss_positions  # noqa: E402
from ftpipe.training.recipe import step_inputs  # noqa: E402


@pytest.mark.parametrize("chunk", [7, 64, 0])
@pytest.mark.parametrize("with_bias", [False, True])
def test_fused_loss_and_gradients_equal_full_logits(chunk, with_bias):
    g = torch.Generator().manual_seed(chunk + with_bias)
    n, d, vocab = 150, 24, 301
    h = torch.randn(n, d, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(vocab, d, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(vocab, dtype=torch.float64, generator=g, requires_grad=True) if with_bias else None
    y = torch.randint(0, vocab, (n,), generator=g)
    leaves = [t for t in (h, w, b) if t is not None]

    logits = h @ w.t() + (b if b is not None else 0)
    ref = torch.nn.functional.cross_entropy(logits, y, reduction="sum")
    (ref * 0.37).backward()
    want = [t.grad.clone() for t in leaves]
    for t in leaves:
        t.grad = None

    got = fused_linear_cross_entropy(h, w, y, b, chunk_rows=chunk)
    (got * 0.37).backward()   # the upstream gradient scales every input's gradient
    assert float(got.detach()) == pytest.approx(float(ref.detach()), rel=1e-12)
    for t, expect in zip(leaves, want):
        assert torch.allclose(t.grad, expect, rtol=1e-10, atol=1e-12)


def test_frozen_output_layer_gets_no_gradient_and_bf16_stays_close():
    g = torch.Generator().manual_seed(1)
    h = torch.randn(40, 16, generator=g).bfloat16().requires_grad_()
    w = torch.randn(97, 16, generator=g).bfloat16()          # frozen (LoRA): no weight gradient
    y = torch.randint(0, 97, (40,), generator=g)
    got = fused_linear_cross_entropy(h, w, y, chunk_rows=16)
    got.backward()
    assert w.grad is None and h.grad.dtype == torch.bfloat16
    ref = torch.nn.functional.cross_entropy(h.detach().double() @ w.double().t(), y, reduction="sum")
    assert float(got.detach()) == pytest.approx(float(ref), rel=1e-2)


def test_loss_positions_computed_ahead_give_the_same_loss():
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(2, 30, 8, dtype=torch.float64, generator=g)
    w = torch.randn(50, 8, dtype=torch.float64, generator=g)
    labels = torch.randint(0, 50, (2, 30), generator=g)
    labels[0, :12] = -100
    labels[1, 20:] = -100
    pos = loss_positions(labels)
    assert pos.numel() == int((labels[:, 1:] != -100).sum())
    a = chunked_loss_sum(hidden, w, labels, chunk_tokens=5)
    b = chunked_loss_sum(hidden, w, labels, chunk_tokens=5, positions=pos)
    flat_h = hidden[:, :-1].reshape(-1, 8)
    flat_y = labels[:, 1:].reshape(-1)
    ref = torch.nn.functional.cross_entropy(flat_h @ w.t(), flat_y, ignore_index=-100, reduction="sum")
    assert float(a) == pytest.approx(float(ref), rel=1e-12) and float(b) == float(a)


def test_step_inputs_count_tokens_on_the_cpu():
    from ftpipe.training.batches import pack_flat

    examples = [([1, 2, 3, 4, 5], [-100, -100, 3, 4, 5]), ([6, 7, 8], [-100, 7, 8])]
    batches, n_label, n_real = step_inputs([pack_flat(examples, 16)], torch.device("cpu"))
    # each example's first label is masked by pack_flat; 3 + 2 labelled next-token targets
    assert (n_label, n_real) == (5, 8)
    assert batches[0]["loss_positions"].tolist() == [1, 2, 3, 5, 6]
    assert "real" not in batches[0]
