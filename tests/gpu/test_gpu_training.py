"""The training engine on CUDA (skipped without it): every method in bf16 (QLoRA with
bitsandbytes NF4 on the GPU), packing against padding, and two GPUs under torchrun against
one. Run on a lent H100: `python -m pytest -q -rA tests/gpu`."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

from ftpipe.training.basemodel import build_base_model  # noqa: E402
from ftpipe.config import BuildConfig, LoraConfig, ModelConfig, TrainConfig  # noqa: E402
from ftpipe.training.launch import train  # noqa: E402
from ftpipe.training.recipe import fine_tune  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("gpu")
    build_base_model(REPO / "data/corpus/corpus.jsonl", d / "base",
                     BuildConfig(vocab_size=512, hidden_size=256, layers=4, heads=4,
                                 intermediate_size=688, pretrain_steps=0), log=lambda m: None)
    rows = [json.loads(line) for line in (REPO / "data/sources/dates.jsonl").read_text().splitlines()[:1100]]
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:1000]))
    (d / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[1000:]))
    return d


def _train(tiny, out, method="lora", quant="none", **kw):
    cfg = dict(method=method, max_steps=60, batch_size=32, lr=2e-3, log_every=10, warmup_steps=5,
               checkpoint_every=0) | kw
    return fine_tune(ModelConfig(base=str(tiny / "base"), quantization=quant), LoraConfig(r=16, alpha=32),
                     TrainConfig(**cfg), tiny / "train.jsonl", tiny / "val.jsonl", out, log=print)


@pytest.mark.parametrize("method,quant", [("full", "none"), ("lora", "none"), ("qlora", "nf4")])
def test_each_method_learns_in_bf16(tiny, tmp_path, method, quant):
    from transformers import AutoModelForCausalLM

    torch.cuda.reset_peak_memory_stats()
    res = _train(tiny, tmp_path / method, method, quant, lr=1e-3 if method == "full" else 2e-3)
    first, last = res.loss_history[0][1], res.loss_history[-1][1]
    print(f"{method}: loss {first:.3f} -> {last:.3f}, val {res.val_loss:.3f}, {res.tokens / res.seconds:,.0f} tok/s "
          f"(whole run), peak {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB")
    assert last < 0.7 * first and res.val_loss < first
    model = AutoModelForCausalLM.from_pretrained(res.model_dir)  # merged, no peft
    assert not any("lora" in n for n, _ in model.named_parameters())


def test_packing_follows_padding_on_gpu(tiny, tmp_path):
    padded = _train(tiny, tmp_path / "pad", max_steps=20, packing=False)
    packed = _train(tiny, tmp_path / "pack", max_steps=20, packing=True)
    a = [l for _, l in padded.loss_history]
    b = [l for _, l in packed.loss_history]
    print("padded", [round(x, 4) for x in a], "\npacked", [round(x, 4) for x in b])
    assert b == pytest.approx(a, rel=3e-2)  # bf16: same math, different kernels and order
    assert packed.tokens == padded.tokens


def _one_vs_two(tiny, tmp_path, label: str, **cfg):
    """The same recipe on one GPU and on two under torchrun: the same final and validation loss."""
    one = _train(tiny, tmp_path / "one", **cfg)
    two = train(ModelConfig(base=str(tiny / "base")), LoraConfig(r=16, alpha=32),
                TrainConfig(**({"method": "lora", "max_steps": 60, "batch_size": 32, "lr": 2e-3, "log_every": 10,
                                "warmup_steps": 5, "checkpoint_every": 0} | cfg), devices=2),
                str(tiny / "train.jsonl"), str(tiny / "val.jsonl"), tmp_path / "two", log=print)
    a = [l for _, l in one.loss_history]
    b = [l for _, l in two.loss_history]
    print(f"1 GPU {'':{len(label)}}", [round(x, 4) for x in a], f"val {one.val_loss:.4f}",
          f"\n2 GPUs {label}", [round(x, 4) for x in b], f"val {two.val_loss:.4f}")
    assert b[-1] == pytest.approx(a[-1], rel=3e-2) and two.val_loss == pytest.approx(one.val_loss, rel=3e-2)
    assert two.tokens == one.tokens


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_two_gpus_under_torchrun_match_one(tiny, tmp_path):
    _one_vs_two(tiny, tmp_path, "DDP", max_steps=40)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_fsdp_on_two_gpus_matches_one(tiny, tmp_path):
    _one_vs_two(tiny, tmp_path, "FSDP", method="full", max_steps=30, lr=1e-3, checkpoint_every=10,
                strategy="fsdp")

