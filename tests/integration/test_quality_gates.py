"""The data gates against the real services: a SQL source on the local PostgreSQL, and both
Great Expectations suites (results JSON, Data Docs HTML, readable failure tables, the
per-source floor, through the functions and through `ftpipe run`)."""
from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from ftpipe.data.cleaning import clean
from ftpipe.data.collection import collect
from ftpipe.config import CleanConfig, QualityConfig, SourceConfig, SplitConfig, parse_config
from ftpipe.data.quality import QualityGateFailed, gate_cleaned, gate_raw, validate_cleaned
from tests.helpers import PG as PG_SERVER, needs_postgres, postgres_reachable
from ftpipe.data.sources import SourceError, fetch_sql
from tests.helpers import make_project, mlflow_client, run_cli

pytestmark = pytest.mark.integration
PG = f"{PG_SERVER}/test"


@pytest.fixture
def pg_table():
    if not postgres_reachable():
        pytest.skip("no PostgreSQL on 127.0.0.1:5432 (CI has one)")
    from sqlalchemy import create_engine, text

    name = f"ftpipe_t_{uuid.uuid4().hex[:8]}"
    engine = create_engine(PG)
    with engine.begin() as c:
        c.execute(text(f"CREATE TABLE {name} (id serial primary key, question text, answer text, "
                       "added date default current_date)"))
        for i in range(150):
            c.execute(text(f"INSERT INTO {name} (question, answer) VALUES (:q, :a)"),
                      {"q": f"What is {i} plus one?", "a": str(i + 1)})
        c.execute(text(f"INSERT INTO {name} (question, answer) VALUES ('No answer yet', NULL)"))
    yield engine, name
    with engine.begin() as c:
        c.execute(text(f"DROP TABLE {name}"))
    engine.dispose()


def test_sql_source_exports_collects_and_tracks_changes(tmp_path, pg_table, monkeypatch):
    from sqlalchemy import text

    engine, table = pg_table
    monkeypatch.setenv("FTPIPE_TEST_PG", PG)
    src = SourceConfig(name="qa", type="sql", url="${FTPIPE_TEST_PG}",
                       query=f"SELECT question, answer FROM {table} ORDER BY id",
                       columns={"instruction": "question", "output": "answer"})
    first = fetch_sql(tmp_path, src)
    assert (first.rows, first.changed, first.path) == (151, True, "data/sources/sql/qa.jsonl")
    again = fetch_sql(tmp_path, src)
    assert not again.changed  # same rows, same bytes: DVC's collect stage stays skipped
    res = collect(tmp_path, [src], tmp_path / "out", log=lambda m: None)
    manifest = json.loads(Path(res.manifest).read_text())
    assert manifest["sources"][0]["query"].startswith("SELECT question")
    assert manifest["sources"][0]["url"] == "postgresql://postgres@127.0.0.1:5432/test"
    assert manifest["files"][0]["format"] == "alpaca" and manifest["files"][0]["rows"] == 151
    c = clean(Path(res.snapshot), CleanConfig(), tmp_path / "clean")
    assert (c.read, c.kept, c.quarantined) == (151, 150, 1)
    q = json.loads(Path(c.quarantine).read_text().splitlines()[0])
    assert q["source"] == "data/sources/sql/qa.jsonl" and q["line"] == 151
    assert q["reason"].startswith("missing field 'output'")
    with engine.begin() as conn:
        conn.execute(text(f"INSERT INTO {table} (question, answer) VALUES ('New?', 'yes')"))
    assert fetch_sql(tmp_path, src).changed  # new rows: a new export, a new data version


@needs_postgres
def test_sql_errors_name_the_source_and_hide_the_password(tmp_path, monkeypatch):
    monkeypatch.setenv("FTPIPE_TEST_DB_PASSWORD", "hunter2")
    bad = SourceConfig(name="qa", type="sql", url="postgresql://postgres:${FTPIPE_TEST_DB_PASSWORD}@127.0.0.1:5432/test",
                       query="SELECT nope FROM no_such_table")
    with pytest.raises(SourceError) as err:
        fetch_sql(tmp_path, bad)
    msg = str(err.value)
    assert "sql source 'qa'" in msg and "no_such_table" in msg
    assert "hunter2" not in msg and "***" in msg
    assert not (tmp_path / "data/sources/sql/qa.jsonl").exists()


def _rows(n: int, **extra) -> list[str]:
    return [json.dumps({"instruction": f"Say {i} in words.", "input": "", "output": f"number {i}"} | extra)
            for i in range(n)]


def _collected(tmp_path: Path, lines: list[str]):
    src = tmp_path / "data/sources/d.jsonl"
    src.parent.mkdir(parents=True, exist_ok=True)
    src.write_text("\n".join(lines) + "\n")
    return collect(tmp_path, [SourceConfig(path="data/sources/d.jsonl")], tmp_path / "out", log=lambda m: None)


def test_raw_suite_passes_writes_results_and_data_docs(tmp_path):
    res = _collected(tmp_path, _rows(300) + ['{"instruction": "broken'])
    q = gate_raw(Path(res.snapshot), QualityConfig(min_rows=100), tmp_path / "reports")
    assert q.success and q.rows == 301 and q.evaluated >= 8
    doc = json.loads((tmp_path / "reports/raw_validation.json").read_text())
    assert doc["success"] is True and doc["suite_name"] == "raw_snapshot"
    html = list((tmp_path / "reports/docs/validations/raw_snapshot").rglob("*.html"))
    assert html and "raw_snapshot" in html[0].read_text()
    assert (tmp_path / "reports/docs/index.html").is_file()


def test_raw_suite_failure_lists_expectations_and_observed_values(tmp_path):
    lines = _rows(150) + [json.dumps({"instruction": "Q", "output": 7})] * 5 + ["[1, 2]"] * 5
    res = _collected(tmp_path, lines)
    with pytest.raises(QualityGateFailed) as err:
        gate_raw(Path(res.snapshot), QualityConfig(min_rows=100, raw={"mostly": 0.99}), tmp_path / "reports")
    msg = str(err.value)
    assert "data quality gate 'raw_snapshot' failed" in msg
    # wrong types are reported with the value seen, parse failures with their count
    assert "expect_column_values_to_be_in_set" in msg and "response_type" in msg and "alpaca:integer" in msg
    assert "expect_column_values_to_be_null" in msg and "10 of 160 rows" in msg
    assert {f["kwargs"].get("column") for f in err.value.failed} >= {"_error", "response_type"}


def test_cleaned_suite_checks_lengths_uniqueness_pii_and_split_proportions(tmp_path):
    res = _collected(tmp_path, _rows(400))
    c = clean(Path(res.snapshot), CleanConfig(), tmp_path / "clean")
    q = gate_cleaned(Path(c.cleaned), QualityConfig(min_rows=100), CleanConfig(), SplitConfig(),
                     tmp_path / "reports")
    kinds = {r["expectation_config"]["type"] for r in
             json.loads((tmp_path / "reports/cleaned_validation.json").read_text())["results"]}
    assert q.success and {"expect_column_values_to_be_unique", "expect_column_values_to_be_between",
                          "expect_column_values_to_not_match_regex_list",
                          "expect_column_mean_to_be_between"} <= kinds
    # a tolerance of zero cannot hold for hash-based splits: the failure shows the observed share
    strict = QualityConfig(min_rows=100, cleaned={"split_tolerance": 0.0})
    r = validate_cleaned(Path(c.cleaned), strict, CleanConfig(), SplitConfig(), tmp_path / "reports")
    failed = {f["kwargs"]["column"]: f["observed"] for f in r.failed}
    assert not r.success and set(failed) >= {"is_test"}
    assert 0.05 < float(failed["is_test"]) < 0.15


def test_cleaned_suite_catches_pii_left_in_by_policy_change(tmp_path):
    """If PII reaches the cleaned set (policy keep but the gate still checks), GX says so."""
    res = _collected(tmp_path, _rows(200) + [json.dumps({"instruction": "Who gets the report?",
                                                          "output": "write to ann@example.org"})])
    c = clean(Path(res.snapshot), CleanConfig(pii="keep"), tmp_path / "clean")
    cfg = parse_config({"data": {"sources": [{"path": "data/sources/d.jsonl"}], "clean": {"pii": "scrub"}},
                        "quality": {"min_rows": 100}})
    r = validate_cleaned(Path(c.cleaned), cfg.quality, cfg.data.clean, cfg.data.split, tmp_path / "reports")
    bad = [f for f in r.failed if f["expectation"] == "expect_column_values_to_not_match_regex_list"]
    assert bad and "1 of 201 rows" in bad[0]["observed"]
    # scrubbed by the cleaner, the same data passes
    c2 = clean(Path(res.snapshot), CleanConfig(pii="scrub"), tmp_path / "clean2")
    assert c2.pii == {"email": 1}
    assert "<EMAIL>" in Path(c2.cleaned).read_text()
    assert validate_cleaned(Path(c2.cleaned), cfg.quality, cfg.data.clean, cfg.data.split,
                            tmp_path / "reports2").success


def _cp1252_rows(n: int) -> bytes:
    """Alpaca rows written by a tool that saved them as cp1252, not UTF-8."""
    return b"".join(json.dumps({"instruction": f"Traduis « café n°{i} ».", "output": f"coffee number {i}"},
                               ensure_ascii=False).encode("cp1252") + b"\n" for i in range(n))


def test_source_floor_counts_what_cleaning_lost_not_duplicates(tmp_path):
    """quality.raw.mostly pools sources; the cleaned gate also holds each source to
    quality.cleaned.min_source_share of its rows, duplicates counting neither way."""
    src = tmp_path / "data/sources"
    src.mkdir(parents=True)
    good = _rows(300)
    (src / "d.jsonl").write_text("\n".join(good) + "\n")
    (src / "repeat.jsonl").write_text("\n".join(good[:60][::-1]) + "\n")         # a re-delivery: all duplicates
    (src / "legacy.jsonl").write_bytes(_cp1252_rows(40))                         # lost whole to its encoding
    (src / "mixed.jsonl").write_text("\n".join(                                  # keeps 30 of 40: 0.75
        [json.dumps({"instruction": f"Name colour {i}.", "output": f"colour {i}"}) for i in range(30)]
        + [json.dumps({"instruction": f"Name shape {i}."}) for i in range(10)]) + "\n")

    def gate(legacy: dict, **cleaned):
        sources = [SourceConfig(name=n, path=f"data/sources/{n}.jsonl") for n in ("d", "repeat", "mixed")]
        res = collect(tmp_path, sources + [SourceConfig(name="legacy", path="data/sources/legacy.jsonl", **legacy)],
                      tmp_path / "out", log=lambda m: None)
        c = clean(Path(res.snapshot), CleanConfig(), tmp_path / "clean")
        return validate_cleaned(Path(c.cleaned), QualityConfig(min_rows=100, cleaned=cleaned), CleanConfig(),
                                SplitConfig(), tmp_path / "reports")

    r = gate({})
    assert not r.success and [f["expectation"] for f in r.failed] == ["unexpected_rows_expectation"]
    observed = r.failed[0]["observed"]
    assert observed.startswith("source legacy, kept 0, checked 40, kept_share 0.0 (expected: each source "
                               "keeps >= 50% of its rows through cleaning")
    assert "repeat" not in observed and "mixed" not in observed and "source d," not in observed
    # its encoding set, the source keeps its rows and the gate passes
    assert gate({"encoding": "cp1252"}).success
    # a stricter floor catches the source that lost a quarter of its rows, naming its share
    strict = gate({"encoding": "cp1252"}, min_source_share=0.8)
    assert [f["observed"].split(" (expected")[0] for f in strict.failed] == [
        "source mixed, kept 30, checked 40, kept_share 0.75"]


def test_a_source_lost_to_its_encoding_stops_the_run_naming_it(tmp_path, prefect_server):
    """40 cp1252 rows beside the 3,000 default rows pass the pooled raw gate (1.3% < 5%), yet
    the source keeps nothing: `ftpipe run` stops at the cleaned gate, naming the source and
    its share, before anything is trained or registered."""
    dest = tmp_path / "proj"
    (dest / "data/sources").mkdir(parents=True)
    (dest / "data/sources/legacy.jsonl").write_bytes(_cp1252_rows(40))
    project = make_project(dest, {"data.sources": [
        {"name": "dates", "path": "data/sources/dates.jsonl", "format": "alpaca"},
        {"name": "legacy", "path": "data/sources/legacy.jsonl"},
        {"name": "incoming", "path": "data/incoming", "type": "drop"}]})
    proc = run_cli(["run"], project, prefect_server)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out[-4000:]
    assert "error: data quality gate 'cleaned' failed" in out
    assert "source legacy, kept 0, checked 40, kept_share 0.0" in out
    assert "quality.cleaned.min_source_share" in out and "source dates" not in out
    assert "No model was trained and no alias moved" in out
    assert mlflow_client(project).search_model_versions("name='ftpipe-dates'") == []
    assert json.loads((project / "data/reports/cleaned_validation.json").read_text())["success"] is False
