"""Real model families through the whole flow on CPU: random-initialised checkpoints of the
shapes that break pipelines (ftpipe.training.families), saved as sharded safetensors with an
index, trained on chat-format data with and without system turns.

- Qwen2 (tied embeddings, grouped-query attention, a template that adds a system turn, no
  BOS): LoRA -> adapter version -> gate -> the served pyfunc answers -> a drop -> an
  incremental run that continues the champion's adapter on the same stored base.
- Llama 3 (untied output layer, GQA, no pad token): QLoRA (NF4) -> adapter version -> merged
  export that loads without peft and answers as the version does.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import dates_rows, make_project, mlflow_client, ok, run_cli, write_rows

pytestmark = pytest.mark.integration
NAME = "ftpipe-dates"


def chat_rows(rows: list[dict]) -> list[dict]:
    """The date task as conversations: every third with its own system turn."""
    out = []
    for i, r in enumerate(rows):
        system = [{"role": "system", "content": "You convert dates."}] if i % 3 == 0 else []
        out.append({"messages": system + [{"role": "user", "content": r["instruction"]},
                                          {"role": "assistant", "content": r["output"]}]})
    return out


def family_project(tmp_path, family: str, tweaks: dict):
    from ftpipe.training.families import random_model

    base = random_model(family, tmp_path / f"{family}-base", shard="60KB")
    assert (base / "model.safetensors.index.json").is_file() and len(list(base.glob("*.safetensors"))) > 1
    project = make_project(tmp_path / "proj", {
        "model.base": str(base),
        "data.sources": [{"name": "chats", "path": "data/sources/chats.jsonl", "format": "chat"},
                         {"name": "incoming", "path": "data/incoming", "type": "drop"}],
        "train": {"max_seq_len": 96, "max_steps": 60}, "eval": {"max_examples": 24}} | tweaks)
    write_rows(project / "data/sources/chats.jsonl", chat_rows(dates_rows(400)))
    subprocess.run(["git", "add", "-A"], cwd=project, check=True)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "chats"], cwd=project,
                   check=True)
    return project, base


PREDICT = """
import json, sys
import mlflow
mlflow.set_tracking_uri(sys.argv[1])
mlflow.set_registry_uri(sys.argv[1])
model = mlflow.pyfunc.load_model(sys.argv[2])
print(json.dumps(list(model.predict([{"messages": json.loads(sys.argv[3])}], params={"max_new_tokens": 8}))))
"""


def _predict(project, uri: str, messages: list[dict]) -> list[str]:
    # not the registry an earlier test in this process pointed MLflow at (it exports MLFLOW_*_URI)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    proc = subprocess.run([sys.executable, "-c", PREDICT, f"sqlite:///{project / 'mlflow/mlflow.db'}", uri,
                           json.dumps(messages)], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _answers(model_dir: str, messages: list[dict], adapter: str | None = None) -> list[str]:
    from ftpipe.evaluation.generation import generate, load_for_eval

    m, tok = load_for_eval(model_dir, adapter=adapter)
    return generate(m, tok, [tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)], 8)


def test_qwen2_lora_through_the_flow_then_an_incremental_run_continues_its_adapter(tmp_path, prefect_server):
    project, base = family_project(tmp_path, "qwen2", {"incremental": {"start_from": "champion", "max_steps": 1},
                                                       "train": {"max_seq_len": 96, "max_steps": 200}})
    out = ok(run_cli(["run"], project, prefect_server))
    assert "Promotion gate: PROMOTE" in out, out[-3000:]
    c = mlflow_client(project)
    v1 = c.get_model_version(NAME, "1")
    assert v1.tags["ftpipe.method"] == "lora"
    messages = [{"role": "user", "content": "Convert 2004-07-21 to words."}]
    # the served version (adapter + the stored base) answers as the evaluated weights do, with
    # the family's chat template (its default system turn added)
    evaluated = _answers(str(project / "runs" / v1.tags["ftpipe.candidate"] / "model"), messages)
    assert _predict(project, f"models:/{NAME}@champion", messages) == evaluated

    drop = chat_rows(dates_rows(480)[400:])
    write_rows(project / "data/incoming/drop-1.jsonl", drop)
    out = ok(run_cli(["run"], project, prefect_server))
    assert c.get_model_version(NAME, "2").tags["ftpipe.start_from"].startswith(f"champion models:/{NAME}/1: ")
    assert "continuing the LoRA adapter of the start weights" in out
    arts = project / "mlflow/artifacts"
    refs = [json.loads(p.read_text()) for p in arts.rglob("base.json")]
    assert len(refs) == 2 and len({r["digest"] for r in refs}) == 1 and refs[0]["source"] == str(base)
    assert len([p for p in arts.rglob("*.safetensors") if p.parent.name == "base"]) == len(
        list(base.glob("*.safetensors")))                                  # the sharded base, stored once
    # one incremental step moved v1's adapter by at most the learning rate per weight (Adam's
    # first step): it went on from v1's adapter, not from a fresh one (whose B starts at zero)
    from safetensors.torch import load_file

    import mlflow

    def adapter(version: str) -> dict:
        mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow/mlflow.db'}")
        mlflow.set_registry_uri(f"sqlite:///{project / 'mlflow/mlflow.db'}")
        local = mlflow.artifacts.download_artifacts(f"models:/{NAME}/{version}", dst_path=str(tmp_path / f"v{version}"))
        return load_file(next(Path(local).rglob("adapter_model.safetensors")))

    try:
        a1, a2 = adapter("1"), adapter("2")
    finally:   # a later test in this process that sets only the tracking URI must not read this registry
        mlflow.set_registry_uri(None)
        os.environ.pop("MLFLOW_REGISTRY_URI", None)
    assert a1.keys() == a2.keys()
    lr = 0.01                                                              # tests.helpers.TINY
    assert max(a1[k].abs().max().item() for k in a1 if "lora_B" in k) > 3 * lr
    assert max((a2[k] - a1[k]).abs().max().item() for k in a1) <= lr * 1.01
    audit = json.loads(run_cli(["lineage", f"models:/{NAME}/2", "--json"], project, prefect_server).stdout)
    assert next(x for x in audit["links"] if x["name"] == "base model")["ok"], audit["broken"]


def test_llama3_qlora_registers_an_adapter_and_exports_a_merged_checkpoint(tmp_path, prefect_server):
    project, base = family_project(tmp_path, "llama", {"train": {"method": "qlora", "max_seq_len": 96,
                                                                 "max_steps": 40},
                                                       "model.quantization": "nf4"})
    tok_cfg = json.loads((base / "tokenizer_config.json").read_text())
    assert tok_cfg.get("pad_token") is None                                 # Llama 3 has none
    ok(run_cli(["run"], project, prefect_server))
    c = mlflow_client(project)
    v1 = c.get_model_version(NAME, "1")
    assert v1.tags["ftpipe.method"] == "qlora"
    arts = project / "mlflow/artifacts"
    assert not [p for p in arts.rglob("model*.safetensors") if p.parent.name != "base"]   # no full weights
    messages = [{"role": "system", "content": "You convert dates."},
                {"role": "user", "content": "Convert 2011-11-02 to words."}]
    served = _predict(project, f"models:/{NAME}/1", messages)
    ok(run_cli(["export", f"models:/{NAME}/1", "--to", str(tmp_path / "merged"), "--merged"], project))
    code = ("import json, sys; from transformers import AutoModelForCausalLM, AutoTokenizer; "
            "from ftpipe.evaluation.generation import generate; "
            "m = AutoModelForCausalLM.from_pretrained(sys.argv[1]); t = AutoTokenizer.from_pretrained(sys.argv[1]); "
            "t.pad_token = t.pad_token or t.eos_token; "
            "p = t.apply_chat_template(json.loads(sys.argv[2]), tokenize=False, add_generation_prompt=True); "
            "print(json.dumps({'peft': 'peft' in sys.modules, 'untied': not m.config.tie_word_embeddings, "
            "'answers': generate(m, t, [p], 8)}))")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "merged"), json.dumps(messages)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"peft": False, "untied": True, "answers": served}
