"""The training engine on CPU with a tiny model: completion-only masking token by token,
packing without cross-example leakage, NEFTune scaled per example, gradient
checkpointing, early stopping with the best checkpoint exported, resume after SIGKILL with
the same loss curve, and two processes under torchrun matching one."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch

from ftpipe.config import TrainConfig
from ftpipe.training.batches import IGNORE_INDEX, collate, encode, pack
from ftpipe.data.formatting import completion_of, prompt_of
from ftpipe.training.launch import train, write_spec
from ftpipe.training.step import neftune_hook
from ftpipe.training.recipe import fine_tune
from ftpipe.training.loss import token_loss_sum
from tests.helpers import QUIET, REPO, engine_cfg, killed_after_step, losses, run_spec



def test_completion_only_labels_token_by_token(tiny):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny / "base")
    for row in ({"instruction": "Convert 1991-03-13 to words.", "input": "", "output": "March 13, 1991"},
                {"_format": "prompt_completion", "prompt": "2+2=", "completion": " 4"},
                {"_format": "chat", "messages": [{"role": "user", "content": "Hi"},
                                                 {"role": "assistant", "content": "Hello"}]}):
        ids, labels = encode(tok, row, 256, completion_only=True)
        n_prompt = len(tok(prompt_of(row, tok))["input_ids"])
        assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt          # every prompt token masked
        assert labels[n_prompt:] == ids[n_prompt:]                     # every completion token kept
        assert ids[-1] == tok.eos_token_id
        assert tok.decode(ids[n_prompt:-1]) == completion_of(row, tok)  # exactly the completion
        _, all_labels = encode(tok, row, 256, completion_only=False)
        assert all_labels == ids                                       # switchable


def test_packing_matches_the_padded_batch_and_never_leaks(tiny):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny / "base")
    model = AutoModelForCausalLM.from_pretrained(tiny / "base").eval()
    rows = [json.loads(line) for line in (tiny / "train.jsonl").read_text().splitlines()[:12]]
    enc = [encode(tok, r, 128, True) for r in rows]
    packed = pack(enc, 128, tok.pad_token_id)
    assert packed["input_ids"].shape[0] < len(enc)                     # fewer rows than examples
    assert int(packed["real"]) == sum(len(i) for i, _ in enc)
    # position ids restart at every example; each example's first label is masked
    starts = (packed["position_ids"] == 0).nonzero().tolist()
    assert all(packed["labels"][r, c] == IGNORE_INDEX for r, c in starts)
    with torch.no_grad():
        p_sum, p_n = token_loss_sum(model, packed)
        b = collate(enc, tok.pad_token_id)
        d_sum, d_n = token_loss_sum(model, b)
    assert int(p_n) == int(d_n)
    assert float(p_sum) / int(p_n) == pytest.approx(float(d_sum) / int(d_n), rel=1e-5)
    # changing one example's tokens changes no other example's loss: no attention across
    first = enc[0]
    altered = [([first[0][0]] + [5] * (len(first[0]) - 1), first[1])] + enc[1:]
    with torch.no_grad():
        logits_a = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False).logits
        pb = pack(altered, 128, tok.pad_token_id)
        logits_b = model(input_ids=pb["input_ids"], position_ids=pb["position_ids"], use_cache=False).logits
    n0 = len(first[0])
    assert torch.allclose(logits_a[0, n0:], logits_b[0, n0:], atol=1e-5)
    assert not torch.allclose(logits_a[0, 1:n0], logits_b[0, 1:n0], atol=1e-3)


def test_varlen_row_and_chunked_loss_match_the_padded_batch(tiny):
    """One unpadded row with cu_seq_lens through the ftpipe_varlen attention, and the loss
    from hidden states in chunks: the padded batch's loss and gradients, no leakage."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ftpipe.training.attention import register
    from ftpipe.training.batches import pack_flat
    from ftpipe.training.loss import LossModel

    tok = AutoTokenizer.from_pretrained(tiny / "base")
    rows = [json.loads(line) for line in (tiny / "train.jsonl").read_text().splitlines()[:12]]
    enc = [encode(tok, r, 128, True) for r in rows]
    flat = pack_flat(enc, 128)
    assert flat["input_ids"].shape == (1, sum(len(i) for i, _ in enc))        # no padding at all
    assert flat["cu_seq_lens_q"].tolist()[-1] == flat["input_ids"].shape[1]
    ref_model = AutoModelForCausalLM.from_pretrained(tiny / "base").eval()
    d_sum, d_n = token_loss_sum(ref_model, collate(enc, tok.pad_token_id))
    d_sum.backward()
    model = AutoModelForCausalLM.from_pretrained(tiny / "base", attn_implementation=register()).eval()
    batch = {k: v for k, v in flat.items() if k not in ("lengths", "real")}
    v_sum = LossModel.build(model, chunk_tokens=64)(**batch)                  # several chunks
    v_sum.backward()
    assert float(v_sum.detach()) == pytest.approx(float(d_sum.detach()), rel=1e-5)
    for (name, a), (_, b) in zip(ref_model.named_parameters(), model.named_parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-5, rtol=1e-4), name
    # an example's tokens change no other example's logits
    first = enc[0]
    altered = pack_flat([([first[0][0]] + [5] * (len(first[0]) - 1), first[1])] + enc[1:], 128)
    with torch.no_grad():
        kw = lambda f: {k: f[k] for k in ("position_ids", "cu_seq_lens_q", "max_length_q")}  # noqa: E731
        la = model(input_ids=flat["input_ids"], **kw(flat)).logits
        lb = model(input_ids=altered["input_ids"], **kw(altered)).logits
    n0 = len(first[0])
    assert torch.allclose(la[0, n0:], lb[0, n0:], atol=1e-5)
    # padded evaluation batches still work on a model set to the varlen attention
    with torch.no_grad():
        e_sum, _ = token_loss_sum(model, collate(enc, tok.pad_token_id))
    assert float(e_sum) == pytest.approx(float(d_sum.detach()), rel=1e-5)


@pytest.mark.parametrize("packing,chunk", [(False, 4096), (True, 4096), (True, 0)])
def test_packed_training_follows_the_padded_loss_curve(tiny, tmp_path, packing, chunk):
    m, lo, t = engine_cfg(tiny)
    padded = fine_tune(m, lo, t.model_copy(update={"loss_chunk_tokens": 0}), tiny / "train.jsonl", None,
                       tmp_path / "a", **QUIET)
    other = fine_tune(m, lo, t.model_copy(update={"packing": packing, "loss_chunk_tokens": chunk}),
                      tiny / "train.jsonl", None, tmp_path / "b", **QUIET)
    assert losses(other) == pytest.approx(losses(padded), rel=1e-4)
    assert other.tokens == padded.tokens


def test_neftune_noise_is_scaled_per_example_in_packed_rows():
    alpha, dims = 5.0, 64
    emb = torch.nn.Embedding(10, dims)
    emb.register_forward_hook(neftune_hook(alpha))
    emb.train()
    ids = torch.zeros((1, 40), dtype=torch.long)
    lengths = torch.tensor([[4] * 4 + [36] * 36])         # a 4-token and a 36-token example
    emb._ftpipe_lengths = lengths
    torch.manual_seed(0)
    noise = emb(ids) - emb.weight[0]
    for seg, n in ((slice(0, 4), 4), (slice(4, 40), 36)):
        bound = alpha / (n * dims) ** 0.5
        assert noise[0, seg].abs().max() <= bound + 1e-6
        assert noise[0, seg].abs().max() > 0.9 * bound    # uniform(-1,1): close to the bound
    emb.eval()
    assert torch.equal(emb(ids), emb.weight[ids])         # no noise at evaluation


def test_neftune_and_gradient_checkpointing_train(tiny, tmp_path):
    m, lo, t = engine_cfg(tiny, max_steps=4)
    plain = fine_tune(m, lo, t, tiny / "train.jsonl", None, tmp_path / "a", **QUIET)
    ckpt = fine_tune(m, lo, t.model_copy(update={"gradient_checkpointing": True}), tiny / "train.jsonl",
                     None, tmp_path / "b", **QUIET)
    assert losses(ckpt) == pytest.approx(losses(plain), rel=1e-5)  # recompute, same math
    noisy = fine_tune(m, lo, t.model_copy(update={"neftune_alpha": 5.0}), tiny / "train.jsonl",
                      None, tmp_path / "c", **QUIET)
    assert losses(noisy)[0] != losses(plain)[0] and all(l < 10 for l in losses(noisy))


def test_early_stopping_exports_the_best_checkpoint(tiny, tmp_path):
    m, lo, t = engine_cfg(tiny, max_steps=20, eval_every=2, early_stopping_patience=2,
                    early_stopping_min_delta=100.0)        # nothing after the first eval counts
    res = fine_tune(m, lo, t, tiny / "train.jsonl", tiny / "val.jsonl", tmp_path / "o", **QUIET)
    assert res.stopped_early and res.steps == 6 and res.best_step == 2
    assert [s for s, _ in res.val_history] == [2, 4, 6]
    # the exported model is the step-2 one: its validation loss is the best one recorded
    from ftpipe.config import EvalConfig
    from ftpipe.evaluation.scoring import evaluate_model
    rows = [json.loads(line) for line in (tiny / "val.jsonl").read_text().splitlines()]
    scores = evaluate_model(res.model_dir, rows, EvalConfig(max_new_tokens=2))
    assert scores.eval_loss == pytest.approx(res.val_history[0][1], rel=1e-4)


def test_resume_after_sigkill_gives_the_same_loss_curve(tiny, tmp_path):
    m, lo, t = engine_cfg(tiny, max_steps=40, checkpoint_every=5, log_every=5)
    reference = fine_tune(m, lo, t, tiny / "train.jsonl", tiny / "val.jsonl", tmp_path / "ref", **QUIET)
    out, spec = killed_after_step(tiny, tmp_path / "killed", m, lo, t)
    assert not (out / "train_result.json").exists()            # it really died mid-run
    again = run_spec(spec)
    text = again.communicate(timeout=300)[0]
    assert again.returncode == 0, text
    assert "resuming from" in text
    res = json.loads((out / "train_result.json").read_text())
    assert res["resumed_from"] >= 15
    assert [s for s, _ in res["loss_history"]] == [s for s, _ in reference.loss_history]
    assert [l for _, l in res["loss_history"]] == pytest.approx(losses(reference), rel=1e-5)
    assert res["val_loss"] == pytest.approx(reference.val_loss, rel=1e-5)
    assert not (out / "checkpoints").exists()                  # cleaned up once finished


def test_two_processes_under_torchrun_match_one(tiny, tmp_path):
    m, lo, t = engine_cfg(tiny, max_steps=6)
    one = fine_tune(m, lo, t, tiny / "train.jsonl", None, tmp_path / "one", **QUIET)
    lines, metrics = [], []
    two = train(m, lo, t.model_copy(update={"devices": 2}), str(tiny / "train.jsonl"), None,
                tmp_path / "two", log=lines.append, on_metrics=lambda s, mm: metrics.append((s, mm)))
    assert any("launching 2 processes" in line for line in lines)
    assert "2 processes" in "\n".join(lines)
    assert losses(two) == pytest.approx(losses(one), rel=1e-4)  # the same global batch per step
    assert two.tokens == one.tokens
    assert [s for s, _ in metrics] == list(range(1, 7))           # metrics streamed from rank 0


@pytest.mark.parametrize("method", ["full", "lora"])
def test_fsdp_under_torchrun_matches_one_process_and_checkpoints(tiny, tmp_path, method):
    from transformers import AutoModelForCausalLM

    m, lo, t = engine_cfg(tiny, max_steps=6, method=method, lr=1e-3)
    one = fine_tune(m, lo, t, tiny / "train.jsonl", tiny / "val.jsonl", tmp_path / "one", **QUIET)
    fsdp = t.model_copy(update={"devices": 2, "strategy": "fsdp", "checkpoint_every": 3})
    two = train(m, lo, fsdp, str(tiny / "train.jsonl"), str(tiny / "val.jsonl"), tmp_path / "two",
                log=lambda m: None)
    assert losses(two) == pytest.approx(losses(one), rel=1e-4)
    assert two.val_loss == pytest.approx(one.val_loss, rel=1e-4)
    # the gathered export is the whole model, loadable without peft or FSDP
    a = AutoModelForCausalLM.from_pretrained(one.model_dir).state_dict()
    b = AutoModelForCausalLM.from_pretrained(two.model_dir).state_dict()
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k], b[k], atol=1e-4) for k in a)


def test_fsdp_run_whose_launcher_is_killed_resumes_with_the_same_curve(tiny, tmp_path):
    """SIGKILL to torchrun takes its workers with it (they would otherwise train on and
    delete the checkpoints); the next launch resumes the sharded state where it stopped."""
    m, lo, t = engine_cfg(tiny, max_steps=12, lr=1e-3)
    reference = fine_tune(m, lo, t, tiny / "train.jsonl", tiny / "val.jsonl", tmp_path / "ref", **QUIET)
    fsdp = t.model_copy(update={"devices": 2, "strategy": "fsdp", "checkpoint_every": 3})
    out = tmp_path / "killed"
    out.mkdir()
    spec = write_spec(out / "spec.json", m, lo, fsdp, str(tiny / "train.jsonl"), str(tiny / "val.jsonl"), str(out))
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "-m", "ftpipe.training.launch", str(spec)], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=os.environ | {"OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while not (out / "checkpoints" / "step-0000006").is_dir():
        assert proc.poll() is None and time.time() < deadline, "no checkpoint before the run ended"
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    time.sleep(2)                                              # orphans, if any, would finish now
    assert not (out / "train_result.json").exists()
    assert (out / "checkpoints" / "step-0000006").is_dir()
    lines = []
    res = train(m, lo, fsdp, str(tiny / "train.jsonl"), str(tiny / "val.jsonl"), out, log=lines.append)
    assert any("resuming from" in line for line in lines)
    assert res.resumed_from in (6, 9)
    assert losses(res) == pytest.approx(losses(reference), rel=1e-4)
    assert res.val_loss == pytest.approx(reference.val_loss, rel=1e-4)


def test_bf16_adapter_inputs_give_peft_s_loss_and_fp32_adapter_gradients(tiny):
    """adapter_autocast: under bf16 autocast the LoRA layers skip peft's fp32 copy of their
    input; the loss and the adapters' gradients stay those of peft's own path (the adapter
    matmuls run in bf16 under autocast either way), and peft's setting is back afterwards."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ftpipe.training.kernels import adapter_autocast
    from ftpipe.training.recipe import prepare_model

    m, lo, t = engine_cfg(tiny)
    torch.manual_seed(0)
    model = prepare_model(AutoModelForCausalLM.from_pretrained(tiny / "base"), lo, t.model_copy(update={"kernels": "none"}))
    for n, p in model.named_parameters():          # non-zero B: the adapters take part in the loss
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.02)
    tok = AutoTokenizer.from_pretrained(tiny / "base")
    rows = [json.loads(x) for x in (tiny / "train.jsonl").read_text().splitlines()[:4]]
    batch = collate([encode(tok, r, 64, True) for r in rows], tok.pad_token_id)

    def run(active):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16), adapter_autocast(model, active) as ctx:
            if active:
                assert ctx.layers and all(not x.cast_input_dtype_enabled for x in ctx.layers)
            loss, n = token_loss_sum(model, batch)
        loss.backward()
        grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}
        return float(loss.detach() / n), grads

    base_loss, base_grads = run(False)
    loss, grads = run(True)
    assert all(x.cast_input_dtype_enabled for x in adapter_autocast(model, True).layers)   # restored
    assert loss == pytest.approx(base_loss, rel=2e-2)
    assert all(g.dtype == torch.float32 for g in grads.values())
    for k, g in grads.items():
        assert torch.allclose(g, base_grads[k], rtol=0.1, atol=1e-3 * float(base_grads[k].abs().max()) + 1e-6), k


def test_gpu_speed_settings_resolve_by_device():
    t = TrainConfig()
    assert (t.packing, t.compile) == ("auto", "auto")             # params.yaml's default
    assert (t.resolved(cuda=False).packing, t.resolved(cuda=False).compile) == (False, False)
    assert (t.resolved(cuda=True).packing, t.resolved(cuda=True).compile) == (True, True)
    assert t.resolved(cuda=True, world=2).compile is False        # torchrun runs stay eager
    pinned = TrainConfig(packing=False, compile=True)
    assert (pinned.resolved(cuda=True).packing, pinned.resolved(cuda=False).compile) == (False, True)
