"""Each training method runs on CPU on a tiny model and exports a checkpoint that
`from_pretrained` loads without peft; a diverging run stops with a clear error."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from ftpipe.config import LoraConfig, ModelConfig, TrainConfig
from ftpipe.training.recipe import TrainingDiverged, fine_tune

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("method,quant", [("full", "none"), ("lora", "none"), ("qlora", "nf4")])
def test_method_trains_and_exports(tiny, tmp_path, method, quant):
    from transformers import AutoModelForCausalLM

    res = fine_tune(ModelConfig(base=str(tiny / "base"), quantization=quant),
                    LoraConfig(r=4, alpha=8),
                    TrainConfig(method=method, max_steps=3, batch_size=8, log_every=1, warmup_steps=1),
                    tiny / "train.jsonl", tiny / "val.jsonl", tmp_path / "out", log=lambda m: None)
    assert res.steps == 3 and len(res.loss_history) == 3 and res.val_loss is not None
    assert res.tokens > 0
    model = AutoModelForCausalLM.from_pretrained(res.model_dir)  # merged: no peft needed
    assert not any("lora" in n for n, _ in model.named_parameters())
    if method == "full":
        assert res.adapter_dir is None
    else:
        assert (Path(res.adapter_dir) / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("switch", ["use_dora", "use_rslora"])
def test_dora_and_rslora_switches_reach_the_adapter(tiny, tmp_path, switch):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    res = fine_tune(ModelConfig(base=str(tiny / "base")), LoraConfig(r=4, alpha=8, **{switch: True}),
                    TrainConfig(max_steps=3, batch_size=8, log_every=1, warmup_steps=1),
                    tiny / "train.jsonl", None, tmp_path / "out", log=lambda m: None)
    cfg = json.loads((Path(res.adapter_dir) / "adapter_config.json").read_text())
    assert cfg[switch] is True
    assert cfg["use_dora" if switch == "use_rslora" else "use_rslora"] is False
    with safe_open(str(Path(res.adapter_dir) / "adapter_model.safetensors"), "pt") as f:
        magnitudes = [k for k in f.keys() if "lora_magnitude_vector" in k]
    assert bool(magnitudes) == (switch == "use_dora")  # DoRA learns a magnitude per output
    model = AutoModelForCausalLM.from_pretrained(res.model_dir)
    assert not any("lora" in n for n, _ in model.named_parameters())


def test_int8_loading_trains_an_adapter(tiny, tmp_path):
    res = fine_tune(ModelConfig(base=str(tiny / "base"), quantization="int8"), LoraConfig(r=4, alpha=8),
                    TrainConfig(method="qlora", max_steps=3, batch_size=8, log_every=1, warmup_steps=1),
                    tiny / "train.jsonl", None, tmp_path / "out", log=(lines := []).append)
    assert any("method qlora" in line for line in lines)
    assert res.steps == 3 and all(loss == loss for _, loss in res.loss_history)
    assert (Path(res.adapter_dir) / "adapter_model.safetensors").is_file()


def test_exploding_loss_stops_the_run(tiny, tmp_path):
    with pytest.raises(TrainingDiverged, match="training stopped at step 1: loss .* above train.max_loss"):
        fine_tune(ModelConfig(base=str(tiny / "base")), LoraConfig(r=4),
                  TrainConfig(max_steps=3, batch_size=8, max_loss=0.01),
                  tiny / "train.jsonl", None, tmp_path / "out", log=lambda m: None)
    assert not (tmp_path / "out" / "model").exists()
