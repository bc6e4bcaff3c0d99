"""What a hostile-input trial of `ftpipe run` broke, met as a user meets it (the CLI): bad
settings fail in seconds with one line naming the field, file or source, before any stage,
model build or training; a run that skips records nothing it did not do; the README's
Python lines work as written."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers import PG as PG_SERVER, needs_postgres, BIN, copy_project, make_project, mlflow_client, run_cli

pytestmark = pytest.mark.integration
PG = f"{PG_SERVER}/test"


def _params(project: Path, edit) -> None:
    doc = yaml.safe_load((project / "params.yaml").read_text())
    edit(doc)
    (project / "params.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))


def _nothing_ran(project: Path) -> None:
    """No data stage, no base model build, no MLflow run."""
    for path in ("data/collected", "models/base", "mlflow/mlflow.db", "runs"):
        assert not (project / path).exists(), f"{path} exists: something ran"


def _one_clean_error(proc) -> str:
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.count("error:") == 1, proc.stderr[-3000:]
    return " ".join(proc.stderr.split())    # the message, unwrapped


@pytest.mark.parametrize("override", ["model.base=/nonexistent", "model.revision=abc123"])
def test_keys_the_clean_stage_reads_cannot_be_overridden(tmp_path, override):
    project = make_project(tmp_path / "p")
    proc = run_cli(["run", override], project)
    assert proc.returncode == 2
    err = _one_clean_error(proc)
    assert f"cannot be overridden on the command line: {override}" in err
    _nothing_ran(project)


def _weightless(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "tokenizer.json").write_text("{}")
    return folder


def test_a_missing_or_unusable_base_model_is_named_before_anything_runs(tmp_path):
    project = make_project(tmp_path / "p")
    half = _weightless(tmp_path / "sharded")
    (half / "model-00001-of-00002.safetensors").write_bytes(b"")
    (half / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    cases = {"/nonexistent/base": "model.base: /nonexistent/base: no such folder",
             str(_weightless(tmp_path / "weightless")): f"model.base: {tmp_path / 'weightless'} is not a usable "
                                                         "checkpoint: no weights (*.safetensors)",
             str(half): "no weight shard(s) model-00002-of-00002.safetensors named in model.safetensors.index.json",
             "acme/not-cached-7b": "model.base: 'acme/not-cached-7b' is not a local folder"}
    for base, expected in cases.items():
        _params(project, lambda d: d["model"].update(base=base))
        proc = run_cli(["run"], project, {"HF_HUB_OFFLINE": "1"}, timeout=120)
        assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
        assert expected in _one_clean_error(proc)
        _nothing_ran(project)



@needs_postgres
def test_sql_and_file_source_problems_are_all_reported_before_slow_work(tmp_path):
    """A bad column, an unreachable database and a missing file: all three named at once,
    before the base model is built or a stage runs, and never retried."""
    project = make_project(tmp_path / "p")

    def edit(doc):
        doc["data"]["sources"] += [
            {"name": "faq", "type": "sql", "url": PG.replace("postgresql://", "postgresql+psycopg://"),
             "query": "SELECT no_such_column FROM pg_class"},
            {"name": "down", "type": "sql", "url": "postgresql+psycopg://postgres@127.0.0.1:9/test",
             "query": "SELECT 1"},
            {"name": "gone", "path": "data/sources/gone.jsonl"}]
    _params(project, edit)
    proc = run_cli(["run"], project, timeout=120)
    assert proc.returncode == 2
    err = _one_clean_error(proc)
    assert re.search(r"data\.sources\.2: sql source 'faq' \(postgresql\+psycopg://postgres@127\.0\.0\.1:5432/test\): "
                     r".*column \"no_such_column\" does not exist", err), err
    assert "data.sources.3: sql source 'down'" in err and "data.sources.4: source 'gone': " \
                                                          "data/sources/gone.jsonl not found" in err
    assert "Retry" not in proc.stdout + proc.stderr
    _nothing_ran(project)


def test_a_rule_on_a_slice_the_data_lacks_stops_the_run_before_training(tmp_path, prefect_server):
    project = make_project(tmp_path / "p", {"registry.promotion": {"primary_metric": "slice.nope.exact_match",
                                                                   "thresholds": {"slice.dates.token_f1": 0.5}}})
    proc = run_cli(["run"], project, prefect_server)
    assert proc.returncode == 1
    err = _one_clean_error(proc)
    assert ("registry.promotion.primary_metric: slice.nope.exact_match names slice 'nope', which the test set "
            "does not have (its slices: none (no row has a slice))") in err
    assert "registry.promotion.thresholds.slice.dates.token_f1" in err
    assert "No model was trained" in err
    assert not list((project / "runs").glob("train-*"))
    assert not mlflow_client(project).search_model_versions("name='ftpipe-dates'")


# ------------------------------------------------------------------ on a project that has run

@pytest.fixture(scope="module")
def ran(tmp_path_factory, trained):
    return copy_project(trained.project, tmp_path_factory.mktemp("ran") / "p")


def test_a_run_that_skips_records_only_what_it_did(ran, prefect_server):
    """Nothing new: the run ends skipped. Its MLflow run carries no metrics of the earlier
    training it reused, and the Prefect UI shows it as Skipped, with the reason."""
    proc = run_cli(["run"], ran, prefect_server)
    assert proc.returncode == 0 and "skipped: ftpipe-dates v1 already holds these weights" in proc.stdout
    c = mlflow_client(ran)
    run_id = re.search(r"MLflow run (\w+)", proc.stdout).group(1)
    run = c.get_run(run_id)
    assert run.data.tags["ftpipe.skipped"].startswith("skipped: ftpipe-dates v1 already holds")
    assert not run.data.metrics, run.data.metrics          # train_seconds, train_loss ... belong to v1's run
    assert c.get_run(c.get_model_version("ftpipe-dates", "1").run_id).data.metrics["train_seconds"] > 0

    import requests

    api = prefect_server["PREFECT_API_URL"]
    fr = requests.get(f"{api}/flow_runs/{run.data.tags['ftpipe.prefect_flow_run']}", timeout=30).json()
    arts = requests.post(f"{api}/artifacts/filter", timeout=30,
                         json={"flow_runs": {"id": {"any_": [fr["id"]]}}}).json()
    assert fr["state"]["type"] == "COMPLETED" and fr["state"]["name"] == "Skipped"
    assert fr["state"]["message"].startswith("skipped: ftpipe-dates v1 already holds these weights")
    outcome = next(a for a in arts if a["key"] == "retrain-outcome")
    assert "skipped: nothing trained" in outcome["data"]


def test_the_readme_python_lines_load_the_champion_as_written(ran, tmp_path):
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    code = re.search(r"```python\n(.*?mlflow\.pyfunc\.load_model.*?)```", readme, re.S).group(1)
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("MLFLOW_")}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ran, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r"\['.*'\]", proc.stdout), proc.stdout       # one generated answer
    assert not (ran / "mlflow.db").exists()                      # no stray empty store left behind


def test_help_lists_each_command_on_one_line():
    env = {k: v for k, v in __import__("os").environ.items()} | {"COLUMNS": "120"}
    out = subprocess.run([str(BIN / "ftpipe"), "--help"], env=env, capture_output=True, text=True).stdout
    rows = [line.strip("│ ") for line in out[out.index("Commands"):].splitlines()[1:] if line.startswith("│")]
    assert len(rows) >= 10 and all(re.match(r"[a-z-]+ {2,}\S", r) for r in rows), out
