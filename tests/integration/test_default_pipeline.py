"""The README's promise, checked as CI runs it: the embedded default (real params.yaml,
the 1.9M-parameter base built by DVC, 3,000 date rows) fine-tunes to a champion whose
exact match beats the base model's by at least 0.5, and `ftpipe generate` answers with it.
About 2½ minutes on 2 quiet cores."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import make_project, mlflow_client, run_cli

pytestmark = pytest.mark.integration


def test_default_pipeline_learns_the_task_and_promotes(tmp_path, prefect_server):
    project = make_project(tmp_path / "proj", tiny=False)
    proc = run_cli(["run"], project, prefect_server, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-5000:]
    c = mlflow_client(project)
    champ = c.get_model_version_by_alias("ftpipe-dates", "champion")
    m = c.get_run(champ.run_id).data.metrics
    assert m["base_exact_match"] < 0.05
    assert m["candidate_exact_match"] - m["base_exact_match"] >= 0.5, m

    (tmp_path / "dl").mkdir()
    table = json.loads(Path(c.download_artifacts(
        champ.run_id, "eval/candidate_predictions.json", str(tmp_path / "dl"))).read_text())
    rows = [dict(zip(table["columns"], r)) for r in table["data"]]
    right = next(r for r in rows if r["correct"] and "### Input" not in r["prompt"])
    instruction = right["prompt"].split("### Instruction:\n", 1)[1].split("\n\n### ", 1)[0]
    out = run_cli(["generate", instruction], project)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().split("\n")[-1] == right["expected"]
