"""The whole retrain flow through the CLI, on a tiny model, against real DVC, GX, MLflow
(SQLite store in the project) and a real Prefect server. Tests run in file order and
share one project: promote -> rerun with nothing new (refused) -> messy data
(quarantined, proceeds) -> too messy (GX stops it before training)."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.helpers import ok, ok_json, copy_project, mlflow_client, run_cli

pytestmark = pytest.mark.integration
NAME = "ftpipe-dates"


@pytest.fixture(scope="module")
def project(tmp_path_factory, trained):
    """The session's trained tiny project (its first run), copied: the module's later runs."""
    return copy_project(trained.project, tmp_path_factory.mktemp("proj") / "p")


def test_first_run_registers_and_promotes_with_lineage(project, trained):
    out = trained.output                                  # the first `ftpipe run` of a fresh project
    assert "Promotion gate: PROMOTE" in out
    c = mlflow_client(project)
    champ = c.get_model_version_by_alias(NAME, "champion")
    assert champ.version == 1
    from ftpipe.lineage.record import recorded_tags

    tags = recorded_tags(c, NAME, "1")   # the version's few tags + every fact of its lineage record
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=project, capture_output=True,
                          text=True, check=True).stdout.strip()
    assert tags["ftpipe.git_commit"] == head
    lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    for stage, path in (("collect", "data/collected"), ("clean", "data/cleaned"), ("split", "data/splits")):
        assert tags[f"ftpipe.dvc.{stage}:{path}"] == lock[stage]["outs"][0]["md5"]
    assert tags["ftpipe.gx_verdict"].startswith("passed")
    assert tags["ftpipe.base_model"] == "models/base"
    assert tags["ftpipe.base_model_revision"].startswith("sha256:")
    assert tags["ftpipe.decision"] == "promote"
    assert tags["ftpipe.source.data/sources/dates.jsonl"].startswith("sha256:")
    assert len(tags["ftpipe.config_hash"]) == 16 and tags["ftpipe.prefect_flow_run"]
    run = c.get_run(champ.run_id)
    assert run.info.status == "FINISHED"
    for label in ("base", "candidate"):
        assert f"{label}_exact_match" in run.data.metrics and f"{label}_eval_loss" in run.data.metrics
    # the candidate learned: its loss on the test set is far below the base model's
    assert run.data.metrics["candidate_eval_loss"] < run.data.metrics["base_eval_loss"] - 0.3
    (project / "dl").mkdir(exist_ok=True)
    path = c.download_artifacts(champ.run_id, "promotion/decision.json", str(project / "dl"))
    decision = json.loads(Path(path).read_text())
    assert decision["promote"] and decision["reasons"]
    # what a reviewer reads without the UI: the report, the plots, the per-example table
    arts = {a.path for d in ("eval", "report", "model_card", "train") for a in c.list_artifacts(champ.run_id, d)}
    assert {"eval/metrics_comparison.png", "eval/candidate_predictions.json", "eval/test_set.jsonl",
            "report/report.html", "model_card/model_card.md", "train/loss_curve.png"} <= arts
    page = Path(c.download_artifacts(champ.run_id, "report/report.html", str(project / "dl"))).read_text()
    assert "PROMOTE" in page and "data:image/png;base64," in page and "beats_champion" in page
    for metric in ("candidate_token_f1", "candidate_rouge_l", "candidate_non_empty", "candidate_pii_outputs"):
        assert metric in run.data.metrics
    # the model card sits in the registered version's own artifacts
    import mlflow
    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow' / 'mlflow.db'}")
    card = Path(mlflow.artifacts.download_artifacts(f"models:/{NAME}/1/model_card.md",
                                                    dst_path=str(project / "dl-card"))).read_text()
    assert f"# {NAME} v1" in card and "## Gate decision" in card and "**PROMOTE**" in card
    assert lock["split"]["outs"][0]["md5"] in card and "## Intended use" in card


def test_generate_answers_with_the_champion(project):
    c = mlflow_client(project)
    champ = c.get_model_version_by_alias(NAME, "champion")
    (project / "dl2").mkdir(exist_ok=True)
    path = c.download_artifacts(champ.run_id, "eval/candidate_predictions.json", str(project / "dl2"))
    table = json.loads(Path(path).read_text())
    cols = table["columns"]
    first = dict(zip(cols, table["data"][0]))
    instruction = first["prompt"].split("### Instruction:\n", 1)[1].split("\n\n### ", 1)[0]
    assert "### Input" not in first["prompt"], "pick a row without input for this check"
    out = run_cli(["generate", instruction, "--max-new-tokens", "12"], project)
    assert out.returncode == 0, out.stderr
    # the CLI goes through the registered pyfunc and must reproduce the evaluated answer
    assert out.stdout.rstrip("\n").split("\n")[-1] == first["prediction"]


def test_rerun_with_nothing_new_skips_data_and_refuses_worse(project, prefect_server):
    out = ok(run_cli(["run", "train.max_steps=1"], project, prefect_server))
    for line in ("base model models/base: up to date, skipped", "collect: unchanged, skipped",
                 "clean: unchanged, skipped", "split: unchanged, skipped"):
        assert line in out
    assert "Promotion gate: REFUSE" in out
    c = mlflow_client(project)
    assert c.get_model_version_by_alias(NAME, "champion").version == 1
    v2 = c.get_model_version(NAME, "2")
    assert "challenger" in v2.aliases and "champion" not in v2.aliases
    assert v2.tags["ftpipe.decision"] == "refuse"
    reasons = {r["rule"]: r for r in json.loads(v2.tags["ftpipe.decision.reasons"])}
    assert not reasons["beats_champion"]["passed"]
    assert "vs champion" in reasons["beats_champion"]["detail"]
    assert "Gate decision: refuse" in v2.description
    # the champion was re-scored on the same test set in this run
    run = c.get_run(v2.run_id)
    first = c.get_run(c.get_model_version(NAME, "1").run_id)
    assert run.data.metrics["champion_eval_loss"] == pytest.approx(
        first.data.metrics["candidate_eval_loss"], abs=1e-5)
    assert run.data.metrics["champion_exact_match"] == first.data.metrics["candidate_exact_match"]


def _rows(project: Path) -> list[dict]:
    rows = [json.loads(line) for line in (project / "data/splits/test.jsonl").read_text().splitlines()[:6]]
    return [{"instruction": r["instruction"], "input": r.get("input", "")} for r in rows]


def _evaluated(project: Path, version: str, rows: list[dict]) -> list[str]:
    """The greedy answers of the weights a version was evaluated with (its training's merged folder)."""
    from ftpipe.data.formatting import prompt_of
    from ftpipe.evaluation.generation import generate, load_for_eval

    key = mlflow_client(project).get_model_version(NAME, version).tags["ftpipe.candidate"]
    m, tok = load_for_eval(str(project / "runs" / key / "model"))
    return generate(m, tok, [prompt_of(r) for r in rows], 12)


SECOND_MACHINE = """
import json, sys
import mlflow
import pandas as pd
mlflow.set_tracking_uri(sys.argv[1])
rows = json.loads(sys.argv[2])
print(json.dumps({v: list(mlflow.pyfunc.load_model(f"models:/ftpipe-dates/{v}").predict(
    pd.DataFrame(rows), params={"max_new_tokens": 12})) for v in ("1", "2")}))
"""


def test_each_version_stores_its_adapter_and_the_base_is_stored_once(project, prefect_server, tmp_path):
    """Two LoRA versions on one base: each version's artifacts hold its adapter and a pinned
    base reference, never full weights; the base sits once in the registry's artifact store.
    A second machine (only the tracking URI and the artifact store: no project base folder,
    an empty base cache) loads each version and answers as the evaluated weights did; the
    lineage audit re-hashes the stored base and names it when its bytes change."""
    import os
    import sys

    from ftpipe.files import sha256_path

    c = mlflow_client(project)
    versions = {str(v.version): v for v in c.search_model_versions(f"name = '{NAME}'")}
    assert set(versions) == {"1", "2"}
    arts = project / "mlflow" / "artifacts"
    full = [p for p in arts.rglob("model.safetensors")]
    assert len(full) == 1 and full[0].parent.name == "base", full          # the base, once
    assert len(list(arts.rglob("adapter_model.safetensors"))) == 2           # an adapter per version
    refs = [json.loads(p.read_text()) for p in arts.rglob("base.json")]
    assert len(refs) == 2 and refs[0]["digest"] == refs[1]["digest"] and refs[0]["source"] == "models/base"
    assert refs[0]["files"]["model.safetensors"] == sha256_path(project / "models/base/model.safetensors")

    rows = _rows(project)
    evaluated = {v: _evaluated(project, v, rows) for v in ("1", "2")}
    hidden = project.parent / (project.name + "-base-hidden")
    (project / "models").rename(hidden)
    try:
        env = {"FTPIPE_CACHE": str(tmp_path / "second-machine-cache"), "PYTHONPATH": ""}
        proc = subprocess.run([sys.executable, "-c", SECOND_MACHINE, f"sqlite:///{project / 'mlflow/mlflow.db'}",
                               json.dumps(rows)], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                              env={k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")} | env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert json.loads(proc.stdout.strip().splitlines()[-1]) == evaluated
        assert len(list((tmp_path / "second-machine-cache" / "bases").glob("*/.complete"))) == 1
    finally:
        hidden.rename(project / "models")

    audit = ok_json(run_cli(["lineage", f"models:/{NAME}/2", "--json"], project))
    link = next(x for x in audit["links"] if x["name"] == "base model")
    assert link["ok"] and "stored once" in link["detail"], link
    stored = next(p for p in arts.rglob("tokenizer.json") if p.parent.name == "base")
    keep = stored.read_bytes()
    stored.write_bytes(keep + b" ")
    try:
        broken = run_cli(["lineage", f"models:/{NAME}/2"], project)
        assert broken.returncode == 1 and "BROKEN base model models/base: the stored base changed: tokenizer.json " \
            "changed" in broken.stderr, broken.stderr[-2000:]
    finally:
        stored.write_bytes(keep)


LOAD_MERGED = """
import json, sys
from transformers import AutoModelForCausalLM, AutoTokenizer
from ftpipe.evaluation.generation import generate
m, tok = AutoModelForCausalLM.from_pretrained(sys.argv[1]), AutoTokenizer.from_pretrained(sys.argv[1])
tok.pad_token = tok.pad_token or tok.eos_token
answers = generate(m, tok, json.loads(sys.argv[2]), 12)
print(json.dumps({"peft_imported": "peft" in sys.modules, "answers": answers}))
"""


def test_export_as_an_adapter_folder_or_a_merged_checkpoint(project, tmp_path):
    """`ftpipe export`: the adapter folder loads with PeftModel on the base it names; the merged
    folder (sharded safetensors + index, tokenizer, chat template, generation config) loads
    with from_pretrained alone, no peft imported, and both answer as the version did."""
    import sys

    from peft import PeftModel

    from ftpipe.data.formatting import prompt_of
    from ftpipe.evaluation.generation import generate, load_for_eval

    rows = _rows(project)
    prompts = [prompt_of(r) for r in rows]
    evaluated = _evaluated(project, "1", rows)
    out = ok(run_cli(["export", f"models:/{NAME}/1", "--to", str(tmp_path / "adapter")], project))
    assert "(adapter)" in out
    cfg = json.loads((tmp_path / "adapter/adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == "models/base"
    assert json.loads((tmp_path / "adapter/base.json").read_text())["source"] == "models/base"
    base, tok = load_for_eval(str(project / "models/base"))
    assert generate(PeftModel.from_pretrained(base, tmp_path / "adapter").merge_and_unload(), tok, prompts, 12) \
        == evaluated

    ok(run_cli(["export", f"models:/{NAME}@champion", "--to", str(tmp_path / "merged"), "--merged",
                "--max-shard-size", "100KB"], project))
    names = {p.name for p in (tmp_path / "merged").iterdir()}
    assert "model.safetensors.index.json" in names and len([n for n in names if n.endswith(".safetensors")]) > 1
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "chat_template.jinja"} <= names
    proc = subprocess.run([sys.executable, "-c", LOAD_MERGED, str(tmp_path / "merged"), json.dumps(prompts)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaded = json.loads(proc.stdout.strip().splitlines()[-1])
    assert loaded == {"peft_imported": False, "answers": evaluated}
    again = run_cli(["export", f"models:/{NAME}/1", "--to", str(tmp_path / "merged")], project)
    assert again.returncode == 2 and "is not empty" in again.stderr


def _append_bad_rows(project: Path) -> None:
    src = project / "data/sources/dates.jsonl"
    with src.open("a") as f:
        f.write('{"instruction": "Convert 2001-02-03 to words.", "output": \n')   # malformed
        f.write(json.dumps({"instruction": "Convert 2001-02-04 to words.", "input": ""}) + "\n")


def test_messy_source_is_quarantined_and_run_proceeds(project, prefect_server):
    _append_bad_rows(project)
    n_lines = len((project / "data/sources/dates.jsonl").read_text().splitlines())
    out = ok(run_cli(["run", "train.max_steps=1"], project, prefect_server))
    assert f"data/sources/dates.jsonl:{n_lines - 1}: malformed JSON" in out
    report = json.loads((project / "data/cleaned/report.json").read_text())
    assert report["read"] == n_lines == report["kept"] + report["quarantined"]
    q = [json.loads(l) for l in (project / "data/cleaned/quarantine.jsonl").read_text().splitlines()]
    lines = {(r["line"], r["category"]) for r in q}
    assert (n_lines - 1, "unparseable") in lines
    assert (n_lines, "missing field") in lines
    assert all(r["source"] == "data/sources/dates.jsonl" and r["reason"] for r in q)
    c = mlflow_client(project)
    assert c.get_model_version_by_alias(NAME, "champion").version == 1


def test_gx_gate_stops_before_training_and_moves_nothing(project, prefect_server):
    c = mlflow_client(project)
    before = len(c.search_model_versions(f"name='{NAME}'"))
    proc = run_cli(["run", "quality.raw.mostly=1.0"], project, prefect_server)
    assert proc.returncode == 1
    err = proc.stdout + proc.stderr
    assert "data quality gate 'raw_snapshot' failed" in err
    assert "expect_column_values_to_not_be_null" in err and "response" in err
    assert "2 of 3002 rows" in err  # observed values, not just a verdict
    assert "No model was trained and no alias moved" in err
    assert len(c.search_model_versions(f"name='{NAME}'")) == before
    assert c.get_model_version_by_alias(NAME, "champion").version == 1
    report = json.loads((project / "data/reports/raw_validation.json").read_text())
    assert report["success"] is False
    failed = c.search_runs([c.get_experiment_by_name("ftpipe").experiment_id],
                           order_by=["attributes.start_time DESC"], max_results=1)[0]
    assert failed.info.status == "FAILED"
    # the GX result that stopped it is on the failed run, for whoever reads it later
    assert "data/raw_validation.json" in [a.path for a in c.list_artifacts(failed.info.run_id, "data")]
