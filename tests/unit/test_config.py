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


def test_six_problems_field_and_cross_field_all_at_once(tmp_path):
    """A wrong type, a bad encoding, an unknown key, a bad cron, a section rule and a rule
    across sections: one message lists all six, each naming its field and where it was set."""
    import yaml

    doc = yaml.safe_load((ROOT / "params.yaml").read_text())
    doc["data"]["sources"][0]["encoding"] = "utf-9"
    doc["schedule"]["cron"] = "every night"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(doc))
    with pytest.raises(ConfigError) as exc:
        load_config(tmp_path / "params.yaml", ["train.lr=fast", "train.method=qlora", "lora.rank=8",
                                               "train.early_stopping_patience=3"])
    msg = str(exc.value)
    assert "6 problem(s)" in msg, msg
    lines = msg.splitlines()[1:]
    expect = {
        "data.sources.0.encoding: unknown encoding 'utf-9'": "(source 'dates')",
        "schedule.cron: 'every night' is not a 5-field cron expression": None,
        "train.lr: Input should be a valid number": "(from the command line: train.lr=fast)",
        "lora.rank: Extra inputs are not permitted": "(from the command line: lora.rank=8)",
        "train: train.early_stopping_patience needs train.eval_every > 0": None,
        "(top level): train.method=qlora needs model.quantization": "(from the command line: train.method=qlora)",
    }
    for start, tail in expect.items():
        line = next((x for x in lines if x.startswith(f"  - {start}")), None)
        assert line is not None, f"{start!r} missing from:\n{msg}"
        assert tail is None or line.endswith(tail), line
        assert "command line" not in line or tail, line   # a value from the file is not blamed on the CLI


def test_list_items_can_be_overridden_by_index():
    cfg = parse_config(apply_overrides(MIN, ["data.sources.0.encoding=cp1252"]))
    assert cfg.data.sources[0].encoding == "cp1252"
    with pytest.raises(ConfigError, match="no item 3"):
        apply_overrides(MIN, ["data.sources.3.encoding=cp1252"])


def test_serve_settings_keep_secrets_out_of_the_config_and_do_not_change_what_trains():
    with pytest.raises(ConfigError) as exc:
        parse_config(apply_overrides(MIN, ["serve.token=hunter2",
                                           "serve.store=postgresql://u:pw@db/feedback"]))
    msg = str(exc.value)
    assert "serve.token must be an environment variable reference, e.g. ${FTPIPE_SERVE_TOKEN}" in msg
    assert "serve.store: holds a literal password: write it as ${SERVE_DB_PASSWORD}" in msg
    ok = parse_config(apply_overrides(MIN, ["serve.token=${FTPIPE_SERVE_TOKEN}",
                                            "serve.store=postgresql://u:${SERVE_DB_PASSWORD}@db/feedback",
                                            "serve.max_batch=4"]))
    assert ok.hash() == parse_config(MIN).hash()        # how it serves is not what it trains
