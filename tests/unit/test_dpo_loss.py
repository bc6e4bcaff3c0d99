"""DPO's pieces on a tiny real model: chunked log-probs equal the model's own logits (values
and gradients), and the losses are the papers' formulas."""
import math

import pytest
import torch

from ftpipe.training.preference import dpo_losses, pair_batch, sequence_logps


@pytest.fixture(scope="module")
def model(tiny_base):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)


def test_chunked_log_probs_match_the_models_logits_and_gradients(model):
    pairs = [(([5, 6, 7, 8, 9], [-100, -100, 7, 8, 9]), ([5, 6, 10], [-100, -100, 10])),
             (([11, 12, 13, 14], [-100, 12, 13, 14]), ([11, 12, 15, 16, 17, 18], [-100, 12, 15, 16, 17, 18]))]
    b = pair_batch(pairs, 0)
    b.pop("real")
    model.zero_grad()
    got, counts = sequence_logps(model, b, chunk_rows=3)
    got.sum().backward()
    grad_got = model.get_output_embeddings().weight.grad.clone()
    model.zero_grad()
    logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1]
    labels = b["labels"][:, 1:]
    mask = labels != -100
    logp = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    want = (logp * mask).sum(1)
    want.sum().backward()
    assert counts.tolist() == [3, 3, 1, 5]   # chosen rows first, then rejected
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_got, model.get_output_embeddings().weight.grad, rtol=1e-4, atol=1e-6)


def test_losses_are_the_papers():
    ref = torch.tensor([[-5.0, -6.0], [-3.0, -3.0]])
    pc, pr = torch.tensor([-4.0, -3.0]), torch.tensor([-7.0, -3.0])
    losses, cr, rr, d = dpo_losses(pc, pr, ref, 0.5, "sigmoid")
    assert d.tolist() == [2.0, 0.0]
    assert losses[1].item() == pytest.approx(math.log(2))                       # no preference yet: log 2
    assert losses[0].item() == pytest.approx(-math.log(1 / (1 + math.exp(-1.0))))
    assert (cr - rr).tolist() == [1.0, 0.0]
    ipo, *_ = dpo_losses(pc, pr, ref, 0.5, "ipo")
    assert ipo.tolist() == pytest.approx([(2.0 - 1.0) ** 2, 1.0])
