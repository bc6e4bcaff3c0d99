"""Mixed sources through the whole flow (CLI, real DVC, GX, MLflow, Prefect server): three
formats and four file types at once, per-source reconciliation in the summary, both GX
suites with Data Docs, every data version pushed to the DVC remote, and `ftpipe data
status` before and after a new drop lands."""
from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.helpers import ok, make_project, mlflow_client, run_cli

pytestmark = pytest.mark.integration
NAME = "ftpipe-dates"



@pytest.fixture(scope="module")
def project(tmp_path_factory):
    sources = [
        {"name": "dates", "path": "data/sources/dates.jsonl", "format": "alpaca"},
        {"name": "pc", "path": "data/sources/extra/pc.csv", "weight": 2.0},
        {"name": "chat", "path": "data/sources/extra/chat.jsonl"},
        {"name": "pq", "path": "data/sources/extra/*.parquet", "columns": {"instruction": "q", "output": "a"}},
        {"name": "incoming", "path": "data/incoming", "type": "drop"},
    ]
    dest = tmp_path_factory.mktemp("mixed")
    extra = dest / "data/sources/extra"
    extra.mkdir(parents=True)
    with (extra / "pc.csv").open("w", newline="") as f:
        f.write("prompt,completion\n")
        for i in range(60):
            f.write(f'"Double {i}:"," {2 * i}"\n')
        f.write('"Say ""hi""\nthen stop:"," hi"\n')       # quotes and a newline inside a field
        f.write('"Double 3:"," 6"\n')                      # duplicate prompt of line 5
    with (extra / "chat.jsonl").open("w") as f:
        for i in range(40):
            f.write(json.dumps({"messages": [{"role": "system", "content": "Be brief."},
                                             {"role": "user", "content": f"Spell {i} backwards: {i}xyz"},
                                             {"role": "assistant", "content": f"zyx{str(i)[::-1]}"}]}) + "\n")
        f.write(json.dumps({"messages": [{"role": "user", "content": "unanswered"}]}) + "\n")
        f.write('{"messages": [\n')                          # truncated
    pq.write_table(pa.table({"q": [f"Triple {i}?" for i in range(30)], "a": [str(3 * i) for i in range(30)]}),
                   extra / "part-0.parquet")
    pq.write_table(pa.table({"q": ["Contact?"], "a": ["mail ops@example.com or call +1 415-555-0132"]}),
                   extra / "part-1.parquet")
    return make_project(dest, {"data.sources": sources, "quality.min_rows": 50})


def test_mixed_sources_run_reconciles_validates_and_pushes(project, prefect_server):
    out = ok(run_cli(["run", "train.max_steps=30"], project, prefect_server))
    report = json.loads((project / "data/cleaned/report.json").read_text())
    per = report["per_source"]
    assert set(per) == {"dates", "pc", "chat", "pq"}
    for name, n in per.items():
        assert n["read"] == n["kept"] + n["quarantined"], name
    assert per["pc"] == {"read": 62, "kept": 61, "quarantined": 1}
    assert per["chat"] == {"read": 42, "kept": 40, "quarantined": 2}
    assert per["pq"] == {"read": 31, "kept": 31, "quarantined": 0}
    assert report["pii"]["found"] == {"email": 1, "phone": 1}
    q = {(r["source"], r["line"]): r for r in
         map(json.loads, (project / "data/cleaned/quarantine.jsonl").read_text().splitlines())}
    assert q[("data/sources/extra/pc.csv", 64)]["reason"] == "duplicate of data/sources/extra/pc.csv:5"
    assert q[("data/sources/extra/chat.jsonl", 41)]["category"] == "bad chat"
    assert q[("data/sources/extra/chat.jsonl", 42)]["category"] == "unparseable"
    # the summary shows the per-source reconciliation and both GX suites
    assert "Rows per source" in out and "GX raw_snapshot" in out and "GX cleaned" in out
    assert "pushed to 'local'" in out
    manifest = json.loads((project / "data/collected/manifest.json").read_text())
    formats = {f["path"]: f["format"] for f in manifest["files"]}
    assert formats == {"data/sources/dates.jsonl": "alpaca", "data/sources/extra/pc.csv": "prompt_completion",
                       "data/sources/extra/chat.jsonl": "chat", "data/sources/extra/part-0.parquet": "alpaca",
                       "data/sources/extra/part-1.parquet": "alpaca"}
    # weight 2.0: each train row of `pc` appears twice in the training mix
    mix = json.loads((project / "data/splits/counts.json").read_text())["train_mix"]
    assert mix["pc"]["train_rows"] == 2 * mix["pc"]["rows"] and mix["dates"]["train_rows"] == mix["dates"]["rows"]
    # GX results and Data Docs are on disk and on the MLflow run
    assert (project / "data/reports/docs/index.html").is_file()
    c = mlflow_client(project)
    run_id = c.get_model_version_by_alias(NAME, "champion").run_id
    logged = {a.path for a in c.list_artifacts(run_id, "data")}
    assert {"data/raw_validation.json", "data/cleaned_validation.json", "data/docs",
            "data/quarantine.jsonl", "data/manifest.json"} <= logged
    assert "data/docs/index.html" in {a.path for a in c.list_artifacts(run_id, "data/docs")}
    assert any((project / "dvc-remote").rglob("*.dir"))


def test_data_status_then_a_new_drop(project, prefect_server):
    proc = run_cli(["data", "status", "--json"], project)
    assert proc.returncode == 0, proc.stderr
    st = json.loads(proc.stdout)
    assert st["champion"] == f"{NAME} v1"
    assert st["current"]["split:data/splits"] == st["champion_data"]["split:data/splits"]
    assert (st["added"], st["removed"]) == (0, 0)
    assert st["workspace_changes"] == {}
    assert all(s == {"cache": True, "remote": True} for s in st["storage"].values())

    drop = project / "data/incoming"
    rows = [json.dumps({"instruction": f"Halve {2 * i}.", "output": str(i)}) for i in range(50)]
    (drop / "drop-0003.jsonl").write_text("\n".join(rows) + "\n")
    (drop / "drop-0004.jsonl.part").write_text(rows[0] + "\n")          # still being written
    (drop / "drop-0005.jsonl").write_text("\n".join(rows) + "\n")  # a re-delivery of 0003
    out = ok(run_cli(["run", "train.max_steps=1"], project, prefect_server))
    assert "skipped data/incoming/drop-0005.jsonl: same bytes as data/incoming/drop-0003.jsonl" in out
    assert "skipped data/incoming/drop-0004.jsonl.part" in out
    report = json.loads((project / "data/cleaned/report.json").read_text())
    assert report["per_source"]["incoming"] == {"read": 50, "kept": 50, "quarantined": 0}

    st = json.loads(run_cli(["data", "status", "--json"], project).stdout)
    assert st["champion"] == f"{NAME} v1"  # the 1-step candidate was refused
    assert st["current"]["split:data/splits"] != st["champion_data"]["split:data/splits"]
    assert (st["added"], st["removed"]) == (50, 0)
    assert all(s["remote"] for s in st["storage"].values())
    text = ok(run_cli(["data", "status"], project))
    assert "+50 added, -0 removed" in text


def test_a_changed_default_reruns_the_stages_it_shapes(tmp_path):
    """DVC reruns `clean` when data.clean changes in params.yaml and when a default of it
    changes in the code (ftpipe/data/params.py is a dependency of the data stages), and
    leaves the other stages be."""
    import os
    import re
    import subprocess

    from tests.helpers import BIN

    project = make_project(tmp_path / "p")
    env = os.environ | {"PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}   # stage commands run `python`
    dvc = lambda *a: subprocess.run([str(BIN / "dvc"), *a], cwd=project, env=env, capture_output=True,  # noqa: E731
                                    text=True)
    assert dvc("repro").returncode == 0          # base_model, collect, clean, split
    changed = lambda: set(json.loads(dvc("status", "--json").stdout or "{}"))  # noqa: E731
    assert changed() == set()
    params = project / "params.yaml"
    before = params.read_text()
    params.write_text(before.replace("    near_dup:\n", "    near_dup:\n      num_perm: 128\n", 1))
    assert changed() == {"clean"}
    params.write_text(before)
    code = project / "ftpipe/data/params.py"
    text = code.read_text()
    assert re.search(r"num_perm: int = Field\(64,", text)
    code.write_text(re.sub(r"num_perm: int = Field\(64,", "num_perm: int = Field(32,", text))
    assert "clean" in changed() and "train" not in changed()
