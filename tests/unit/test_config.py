from pathlib import Path

import pytest

from ftpipe.config import ConfigError, apply_overrides, load_config, parse_config

ROOT = Path(__file__).resolve().parents[2]
MIN = {"data": {"sources": [{"path": "data/sources/dates.jsonl"}]}}


def test_project_params_load_with_defaults():
    cfg = load_config(ROOT / "params.yaml")
    assert cfg.train.method == "lora"
    assert cfg.model.base == "models/base"
    assert cfg.registry.promotion.primary_metric == "exact_match"


def test_dotted_overrides_are_typed():
    cfg = load_config(ROOT / "params.yaml", ["train.max_steps=12", "lora.r=4",
                                             "train.neftune_alpha=5", "lora.target_modules=[q_proj, v_proj]"])
    assert cfg.train.max_steps == 12 and cfg.lora.r == 4
    assert cfg.train.neftune_alpha == 5.0
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]


def test_every_problem_is_listed_at_once():
    raw = apply_overrides(MIN, ["train.max_steps=0", "train.methd=lora", "lora.r=abc"])
    with pytest.raises(ConfigError) as exc:
        parse_config(raw, origin="params.yaml")
    msg = str(exc.value)
    assert "3 problem(s)" in msg
    assert "train.max_steps" in msg and "train.methd" in msg and "lora.r" in msg


def test_cross_field_rules():
    with pytest.raises(ConfigError, match="qlora needs model.quantization"):
        parse_config(apply_overrides(MIN, ["train.method=qlora"]))
    with pytest.raises(ConfigError, match="full cannot train a quantized"):
        parse_config(apply_overrides(MIN, ["train.method=full", "model.quantization=nf4"]))
    with pytest.raises(ConfigError, match="lora with a quantized base is qlora"):
        parse_config(apply_overrides(MIN, ["model.quantization=int8"]))
    assert parse_config(apply_overrides(MIN, ["train.method=qlora", "model.quantization=nf4"]))


def test_bad_override_syntax_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="expected key=value"):
        apply_overrides(MIN, ["train.max_steps"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_config_hash_tracks_content():
    a = parse_config(MIN)
    assert a.hash() == parse_config(MIN).hash()
    assert a.hash() != parse_config(apply_overrides(MIN, ["lora.r=8"])).hash()
