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

from tests.helpers import ok, make_project, mlflow_client, run_cli

pytestmark = pytest.mark.integration
NAME = "ftpipe-dates"


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    return make_project(tmp_path_factory.mktemp("proj"))



def test_first_run_registers_and_promotes_with_lineage(project, prefect_server):
    out = ok(run_cli(["run"], project, prefect_server))
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
