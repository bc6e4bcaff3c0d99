"""Collect, clean and split: bad rows are named and quarantined, counts reconcile."""
import json
from pathlib import Path

import pytest

from ftpipe.data.cleaning import clean, normalize_text
from ftpipe.data.collection import SourceError, collect
from ftpipe.config import CleanConfig, SourceConfig, SplitConfig
from ftpipe.data.splitting import split_examples, split_of


def write(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def row(i: int, **kw) -> str:
    return json.dumps({"instruction": f"Convert item {i}.", "input": "", "output": f"answer {i}"} | kw)


@pytest.fixture
def messy(tmp_path):
    write(tmp_path / "data/sources/a.jsonl", [
        row(1), row(2),
        '{"instruction": "broken',                       # line 3: malformed JSON
        json.dumps({"instruction": "No answer here."}),  # line 4: missing output
        "",                                              # blank: not a row
        row(1),                                          # line 6: duplicate of line 1
        "[1, 2]",                                        # line 7: not an object
        row(3, instruction="  Convert\titem   3.\x07 "),  # line 8: normalised, kept
    ])
    write(tmp_path / "data/sources/b.jsonl", [row(10), row(11)])
    return tmp_path


def test_collect_names_file_and_line_and_keeps_everything(messy):
    logged = []
    res = collect(messy, [SourceConfig(path="data/sources/a.jsonl"),
                          SourceConfig(path="data/sources/b.jsonl")],
                  messy / "out", log=logged.append)
    assert res.rows == 9 and res.parse_errors == 2
    assert any(m.startswith("data/sources/a.jsonl:3: malformed JSON") for m in logged)
    assert any(m.startswith("data/sources/a.jsonl:7: expected a JSON object") for m in logged)
    manifest = json.loads(Path(res.manifest).read_text())
    a = manifest["files"][0]
    assert a["path"] == "data/sources/a.jsonl" and a["format"] == "alpaca"
    assert a["rows"] == 7 and a["parse_errors"] == 2 and len(a["sha256"]) == 64
    assert a["size"] == (messy / "data/sources/a.jsonl").stat().st_size


def test_clean_quarantines_with_reasons_and_reconciles(messy):
    res = collect(messy, [SourceConfig(path="data/sources/a.jsonl"),
                          SourceConfig(path="data/sources/b.jsonl")], messy / "out", log=lambda m: None)
    c = clean(Path(res.snapshot), CleanConfig(), messy / "clean")
    assert c.read == res.rows == c.kept + c.quarantined
    assert (c.kept, c.quarantined) == (5, 4)
    q = [json.loads(line) for line in Path(c.quarantine).read_text().splitlines()]
    by_line = {(r["source"], r["line"]): r["reason"] for r in q}
    assert by_line[("data/sources/a.jsonl", 3)].startswith("malformed JSON")
    assert by_line[("data/sources/a.jsonl", 4)] == "missing field 'output' (null or absent)"
    assert by_line[("data/sources/a.jsonl", 6)] == "duplicate of data/sources/a.jsonl:1"
    assert by_line[("data/sources/a.jsonl", 7)].startswith("expected a JSON object")
    per = c.per_source
    assert per["data/sources/a.jsonl"] == {"read": 7, "kept": 3, "quarantined": 4}
    assert per["data/sources/b.jsonl"] == {"read": 2, "kept": 2, "quarantined": 0}
    kept = [json.loads(line) for line in Path(c.cleaned).read_text().splitlines()]
    assert {"instruction": "Convert\titem   3.", "output": "answer 3"}.items() <= kept[2].items()


def test_paths_outside_the_project_are_refused(messy, tmp_path_factory):
    from ftpipe.config import ConfigError, parse_config

    # `..` is refused when the config is read, naming the field
    with pytest.raises(ConfigError, match=r"data\.sources\.0: .*'data/sources/../../../etc/passwd' leaves the project"):
        parse_config({"data": {"sources": [{"path": "data/sources/../../../etc/passwd"}]}})
    # a symlink that points outside is refused when collected
    outside = tmp_path_factory.mktemp("outside") / "secret.jsonl"
    outside.write_text(row(1) + "\n")
    (messy / "data/sources/link.jsonl").symlink_to(outside)
    with pytest.raises(SourceError, match="outside the project"):
        collect(messy, [SourceConfig(path="data/sources/link.jsonl")], messy / "out")
    with pytest.raises(SourceError, match="not found"):
        collect(messy, [SourceConfig(path="data/sources/missing.jsonl")], messy / "out")


def test_column_mapping(tmp_path):
    write(tmp_path / "data/sources/q.jsonl", [json.dumps({"question": "Q?", "answer": "A."})])
    res = collect(tmp_path, [SourceConfig(path="data/sources/q.jsonl", columns={"instruction": "question",
                                                                    "output": "answer"})],
                  tmp_path / "out")
    snap = json.loads(Path(res.snapshot).read_text())
    assert snap["instruction"] == "Q?" and snap["output"] == "A."


def test_normalize_text():
    # NFC, control characters gone, CRLF -> LF, trailing spaces gone; indentation kept
    assert normalize_text("  Cafe\u0301 \t ok\r\n    next\x00 \n\n\n\nend") == "Café \t ok\n    next\n\nend"


def test_split_is_stable_and_proportional(tmp_path):
    cfg = SplitConfig(validation=0.1, test=0.1)
    rows = [{"instruction": f"Convert {i}.", "input": "", "output": str(i)} for i in range(3000)]
    write(tmp_path / "clean.jsonl", [json.dumps(r) for r in rows])
    first = split_examples(tmp_path / "clean.jsonl", cfg, tmp_path / "s1")
    assert sum(first.counts.values()) == 3000
    assert 0.07 < first.counts["test"] / 3000 < 0.13
    # More data later: every old example keeps its split.
    more = rows + [{"instruction": f"New {i}.", "input": "", "output": str(i)} for i in range(500)]
    write(tmp_path / "clean2.jsonl", [json.dumps(r) for r in more])
    split_examples(tmp_path / "clean2.jsonl", cfg, tmp_path / "s2")
    old_test = (tmp_path / "s1/test.jsonl").read_text().splitlines()
    new_test = set((tmp_path / "s2/test.jsonl").read_text().splitlines())
    assert all(line in new_test for line in old_test)
    # A corrected answer does not move its prompt to another split.
    assert split_of({"instruction": "Convert 5.", "output": "5"}, cfg) == \
        split_of({"instruction": "Convert 5.", "output": "five"}, cfg)


PII_ROW_EMAIL, PII_ROW_CARD = "jane.doe@example.org", "4111 1111 1111 1111"


@pytest.mark.parametrize("policy", ["scrub", "drop"])
def test_quarantine_holds_no_pii_the_policy_removes(tmp_path, policy):
    """The quarantine file is logged to MLflow: a malformed line, a wrong-typed row and a row
    dropped for PII keep their file, line and reason, but none of the PII itself."""
    write(tmp_path / "data/sources/a.jsonl", [
        row(1), row(2, output=f"mail {PII_ROW_EMAIL}"),                        # 2: scrubbed or dropped
        '{"instruction": "Write to ' + PII_ROW_EMAIL + '", "output": "ok',     # 3: truncated line
        json.dumps({"instruction": f"card {PII_ROW_CARD}", "output": 7}),      # 4: wrong type
        row(5, input=f"pay with {PII_ROW_CARD}")])                             # 5: scrubbed or dropped
    res = collect(tmp_path, [SourceConfig(path="data/sources/a.jsonl")], tmp_path / "out", log=lambda m: None)
    c = clean(Path(res.snapshot), CleanConfig(pii=policy), tmp_path / "clean")
    assert c.read == 5 == c.kept + c.quarantined
    text = Path(c.quarantine).read_text() + Path(c.cleaned).read_text()
    assert PII_ROW_EMAIL not in text and "4111" not in text
    q = {r["line"]: r for r in map(json.loads, Path(c.quarantine).read_text().splitlines())}
    assert q[3]["reason"].startswith("malformed JSON") and "<EMAIL>" in q[3]["row"]["_raw"]
    assert q[4]["source"] == "data/sources/a.jsonl" and "<CARD>" in q[4]["row"]["_raw"]
    if policy == "drop":
        assert {q[2]["reason"], q[5]["reason"]} == {"personal data or secret: email",
                                                    "personal data or secret: card"}
        assert "<EMAIL>" in q[2]["row"]["output"]
    # the report counts PII in every row read, kept or quarantined
    assert c.pii == {"email": 2, "card": 2}


def test_pii_keep_leaves_the_quarantine_as_read(tmp_path):
    write(tmp_path / "data/sources/a.jsonl", ['{"instruction": "Write to ' + PII_ROW_EMAIL + '", "output": "ok'])
    res = collect(tmp_path, [SourceConfig(path="data/sources/a.jsonl")], tmp_path / "out", log=lambda m: None)
    c = clean(Path(res.snapshot), CleanConfig(pii="keep"), tmp_path / "clean")
    assert PII_ROW_EMAIL in Path(c.quarantine).read_text()
