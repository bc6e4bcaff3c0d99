"""Every kind of source and every kind of bad input: a clear message naming the file (and
line/column where it applies), and nothing lost — each row is either kept or quarantined
with a reason, and read = kept + quarantined, overall and per source."""
import codecs
import csv
import hashlib
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from ftpipe.data.cleaning import clean
from ftpipe.data.collection import SourceError, collect
from ftpipe.config import CleanConfig, ConfigError, SourceConfig, parse_config
from ftpipe.data.records import public


# ------------------------------------------------------------------ helpers

def put(root: Path, rel: str, data: bytes | str) -> Path:
    """Write a fixture file byte for byte (str is written as UTF-8)."""
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
    return path


def alpaca(i: int, **kw) -> dict:
    return {"instruction": f"Convert item {i}.", "input": "", "output": f"answer {i}"} | kw


def jsonl(*objs: dict) -> str:
    return "".join(json.dumps(o, ensure_ascii=False) + "\n" for o in objs)


def read_jsonl(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


@dataclass
class Collected:
    result: object
    manifest: dict
    snapshot: list[dict]
    logged: list[str]


@dataclass
class Cleaned:
    result: object
    kept: list[dict]
    quarantine: list[dict]
    report: dict

    def q(self, source: str, line: int) -> dict:
        [entry] = [e for e in self.quarantine if (e["source"], e["line"]) == (source, line)]
        return entry


def run_collect(root: Path, *sources: SourceConfig) -> Collected:
    logged: list[str] = []
    res = collect(root, list(sources), root / "out/collected", log=logged.append)
    manifest = json.loads(Path(res.manifest).read_text())
    snapshot = read_jsonl(res.snapshot)
    assert res.rows == len(snapshot) == manifest["rows"] == sum(f["rows"] for f in manifest["files"])
    assert res.parse_errors == sum(f["parse_errors"] for f in manifest["files"])
    for f in manifest["files"]:
        assert re.fullmatch(r"[0-9a-f]{64}", f["sha256"]), f
        assert f["rows"] == sum(1 for r in snapshot if r["_source"] == f["path"])
    return Collected(res, manifest, snapshot, logged)


def run_clean(root: Path, col: Collected, cfg: CleanConfig | None = None,
              tokenizer: str | None = None) -> Cleaned:
    """Clean the snapshot and check that nothing is lost: every snapshot row is either in
    clean.jsonl or in quarantine.jsonl (with a category and reason), exactly once, and the
    counts reconcile overall and per source."""
    res = clean(Path(col.result.snapshot), cfg or CleanConfig(), root / "out/cleaned", tokenizer=tokenizer)
    kept, quarantine = read_jsonl(res.cleaned), read_jsonl(res.quarantine)
    report = json.loads((root / "out/cleaned/report.json").read_text())
    assert res.read == len(col.snapshot) == res.kept + res.quarantined
    assert (res.kept, res.quarantined) == (len(kept), len(quarantine))
    assert report["read"] == report["kept"] + report["quarantined"] == len(col.snapshot)
    for counts in report["per_source"].values():
        assert counts["read"] == counts["kept"] + counts["quarantined"]
    # per source, clean read what collect wrote
    collected = {s["name"]: s["rows"] for s in col.manifest["sources"] if s["rows"]}
    assert {s: c["read"] for s, c in report["per_source"].items()} == collected
    where = sorted([(r["_source"], r["_line"]) for r in kept] +
                   [(e["source"], e["line"]) for e in quarantine])
    assert where == sorted((r["_source"], r["_line"]) for r in col.snapshot)
    for e in quarantine:
        assert e["category"] and e["reason"], e
        assert (e["row"]["_source"], e["row"]["_line"]) == (e["source"], e["line"])
        assert e["src"] == e["row"]["_src"]
    return Cleaned(res, kept, quarantine, report)


def src(path: str, **kw) -> SourceConfig:
    return SourceConfig(path=path, **kw)


# ------------------------------------------------------------------ 1. truncated JSON

def test_truncated_jsonl_last_line_is_quarantined_with_file_and_line(tmp_path):
    cut = '{"instruction": "Convert item 3.", "input": "", "out'
    put(tmp_path, "data/sources/t.jsonl", jsonl(alpaca(1), alpaca(2)) + cut)   # no final newline
    col = run_collect(tmp_path, src("data/sources/t.jsonl"))
    assert (col.result.rows, col.result.parse_errors) == (3, 1)
    assert any(m.startswith("data/sources/t.jsonl:3: malformed JSON") for m in col.logged), col.logged
    c = run_clean(tmp_path, col)
    assert [r["output"] for r in c.kept] == ["answer 1", "answer 2"]
    entry = c.q("data/sources/t.jsonl", 3)
    assert entry["category"] == "unparseable" and entry["reason"].startswith("malformed JSON")
    assert entry["row"]["_raw"] == cut


@pytest.mark.parametrize("tail, reason, raw", [
    (',\n  {"instruction": "Convert item 3.", "inp', "truncated or malformed JSON at element 3",
     '{"instruction": "Convert item 3.", "inp'),
    (",\n", "truncated JSON: the array is never closed", ""),
], ids=["cut-inside-element", "cut-after-comma"])
def test_truncated_json_array_keeps_complete_elements(tmp_path, tail, reason, raw):
    text = "[\n  " + json.dumps(alpaca(1)) + ",\n  " + json.dumps(alpaca(2)) + tail
    put(tmp_path, "data/sources/t.json", text)
    col = run_collect(tmp_path, src("data/sources/t.json"))
    assert (col.result.rows, col.result.parse_errors) == (3, 1)
    assert [r["_line"] for r in col.snapshot[:2]] == [2, 3]
    c = run_clean(tmp_path, col)
    assert [r["output"] for r in c.kept] == ["answer 1", "answer 2"]
    [entry] = c.quarantine
    assert entry["source"] == "data/sources/t.json" and entry["category"] == "unparseable"
    assert entry["reason"].startswith(reason)
    # the tail is kept, byte for byte, for whoever fixes the file
    assert entry["row"]["_raw"] == raw
    assert entry["line"] == 4


# ------------------------------------------------------------------ 2. Latin-1

LATIN1 = (b'{"instruction": "Name the drink.", "input": "", "output": "tea"}\n'
          b'{"instruction": "Name the other drink.", "input": "", "output": "caf\xe9"}\n'
          b'{"instruction": "Name a third.", "input": "", "output": "water"}\n')


def test_latin1_lines_are_quarantined_with_an_encoding_hint(tmp_path):
    put(tmp_path, "data/sources/l1.jsonl", LATIN1)
    col = run_collect(tmp_path, src("data/sources/l1.jsonl"))
    assert col.result.parse_errors == 1
    c = run_clean(tmp_path, col)
    assert [r["output"] for r in c.kept] == ["tea", "water"]
    entry = c.q("data/sources/l1.jsonl", 2)
    assert entry["category"] == "unparseable"
    assert "not valid utf-8" in entry["reason"] and "0xe9" in entry["reason"]
    assert "line 2" in entry["reason"] and "l1.jsonl" in entry["reason"]
    assert "encoding: cp1252" in entry["reason"]


def test_latin1_file_with_declared_format_still_gets_the_encoding_hint(tmp_path):
    # Every line undecodable: there is no column to check the declared format against,
    # so the rows must still reach quarantine with the encoding hint (not a format error).
    put(tmp_path, "data/sources/l1.jsonl", b'{"instruction": "Caf\xe9?", "output": "caf\xe9"}\n')
    col = run_collect(tmp_path, src("data/sources/l1.jsonl", format="alpaca"))
    c = run_clean(tmp_path, col)
    [entry] = c.quarantine
    assert "not valid utf-8" in entry["reason"] and "encoding: cp1252" in entry["reason"]


@pytest.mark.parametrize("name, data, where", [
    ("l1.csv", b"instruction,input,output\nName the drink.,,tea\nName the other.,,caf\xe9\n",
     "column 21 of line 3"),
    ("l1.json", b'[\n{"instruction": "Name the drink.", "output": "tea"},\n'
                b'{"instruction": "Name the other.", "output": "caf\xe9"}\n]\n', "column 50 of line 3"),
], ids=["csv", "json"])
def test_latin1_csv_or_json_fails_naming_file_line_and_encoding(tmp_path, name, data, where):
    # CSV and JSON are decoded as a whole: the file is refused, naming where and what to set.
    put(tmp_path, f"data/sources/{name}", data)
    with pytest.raises(SourceError) as err:
        collect(tmp_path, [src(f"data/sources/{name}")], tmp_path / "out", log=lambda m: None)
    msg = str(err.value)
    assert name in msg and "not valid utf-8" in msg and "0xe9" in msg and "cp1252" in msg
    assert where in msg, msg


@pytest.mark.parametrize("encoding", ["latin-1", "cp1252"])
@pytest.mark.parametrize("name, data", [
    ("l1.jsonl", LATIN1),
    ("l1.csv", b"instruction,input,output\nName the drink.,,tea\nName the other drink.,,caf\xe9\n"),
], ids=["jsonl", "csv"])
def test_latin1_reads_correctly_with_its_encoding(tmp_path, encoding, name, data):
    put(tmp_path, f"data/sources/{name}", data)
    col = run_collect(tmp_path, src(f"data/sources/{name}", encoding=encoding))
    assert col.result.parse_errors == 0
    c = run_clean(tmp_path, col)
    assert c.quarantine == []
    assert "café" in [r["output"] for r in c.kept]


# ------------------------------------------------------------------ 3. UTF-16

TEXT = "Café ☕, 日本語 and “quotes”"


@pytest.mark.parametrize("bom, codec", [(codecs.BOM_UTF16_LE, "utf-16-le"), (codecs.BOM_UTF16_BE, "utf-16-be")],
                         ids=["le", "be"])
@pytest.mark.parametrize("name", ["u16.jsonl", "u16.csv"])
def test_utf16_with_bom_reads_correctly(tmp_path, name, bom, codec):
    if name.endswith(".jsonl"):
        text = jsonl(alpaca(1, output=TEXT), alpaca(2))
    else:
        text = f'instruction,input,output\r\nConvert item 1.,,"{TEXT}"\r\nConvert item 2.,,answer 2\r\n'
    put(tmp_path, f"data/sources/{name}", bom + text.encode(codec))
    col = run_collect(tmp_path, src(f"data/sources/{name}"))
    assert col.result.parse_errors == 0
    first = 2 if name.endswith(".csv") else 1   # the CSV header is line 1
    assert [(r["_line"], r["instruction"], r["output"]) for r in col.snapshot] == \
        [(first, "Convert item 1.", TEXT), (first + 1, "Convert item 2.", "answer 2")]
    c = run_clean(tmp_path, col)
    assert [r["output"] for r in c.kept] == [TEXT, "answer 2"]


# ------------------------------------------------------------------ 4. empty files

def test_empty_file_as_a_source_is_an_error_naming_it(tmp_path):
    put(tmp_path, "data/sources/empty.jsonl", b"")
    with pytest.raises(SourceError, match=r"empty\.jsonl.*empty"):
        collect(tmp_path, [src("data/sources/empty.jsonl")], tmp_path / "out", log=lambda m: None)


def test_empty_file_in_a_drop_folder_is_skipped_and_listed(tmp_path):
    put(tmp_path, "data/incoming/a.jsonl", jsonl(alpaca(1), alpaca(2)))
    put(tmp_path, "data/incoming/b.jsonl", b"")
    col = run_collect(tmp_path, SourceConfig(type="drop", path="data/incoming"))
    assert [f["path"] for f in col.manifest["files"]] == ["data/incoming/a.jsonl"]
    assert col.manifest["skipped"] == [{"path": "data/incoming/b.jsonl", "why": "empty file (0 bytes)",
                                        "source": "data/incoming"}]
    assert any("data/incoming/b.jsonl: skipped, empty" in m for m in col.logged)
    c = run_clean(tmp_path, col)
    assert c.result.kept == 2


# ------------------------------------------------------------------ 5. binary

@pytest.mark.parametrize("name", ["x.jsonl", "x.csv", "x.json"])
def test_binary_file_is_an_error_naming_it(tmp_path, name):
    data = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 16   # NULs, no byte-order mark
    put(tmp_path, f"data/sources/{name}", data)
    with pytest.raises(SourceError, match=re.escape(name) + r".*binary"):
        collect(tmp_path, [src(f"data/sources/{name}")], tmp_path / "out", log=lambda m: None)


# ------------------------------------------------------------------ 6. a 10 MB line

def test_ten_megabyte_line_is_collected_then_quarantined_as_too_long(tmp_path):
    huge = "0123456789" * 1_000_000
    put(tmp_path, "data/sources/big.jsonl", jsonl(alpaca(1), alpaca(2, output=huge), alpaca(3)))
    col = run_collect(tmp_path, src("data/sources/big.jsonl"))
    assert col.result.parse_errors == 0
    assert len(col.snapshot[1]["output"]) == 10_000_000
    c = run_clean(tmp_path, col)
    assert [r["output"] for r in c.kept] == ["answer 1", "answer 3"]
    entry = c.q("data/sources/big.jsonl", 2)
    assert entry["category"] == "too long"
    assert re.fullmatch(r"too long: \d+ characters > data\.clean\.max_chars=20000", entry["reason"])
    assert entry["row"]["output"] == huge     # the row itself is preserved


# ------------------------------------------------------------------ 7, 8. columns and fields

@pytest.mark.parametrize("name, data", [
    ("q.csv", "question,reply\nWhat?,That.\n"),
    ("q.jsonl", jsonl({"question": "What?", "reply": "That."})),
], ids=["csv", "jsonl"])
def test_columns_matching_no_format_are_listed(tmp_path, name, data):
    put(tmp_path, f"data/sources/{name}", data)
    with pytest.raises(SourceError) as err:
        collect(tmp_path, [src(f"data/sources/{name}")], tmp_path / "out", log=lambda m: None)
    msg = str(err.value)
    assert f"data/sources/{name}" in msg and "columns found: ['question', 'reply']" in msg
    assert "columns:" in msg  # says how to map them


@pytest.mark.parametrize("bad, category, reason", [
    ({"instruction": "No answer."}, "missing field", "missing field 'output' (null or absent)"),
    ({"instruction": "Null answer.", "output": None}, "missing field", "missing field 'output' (null or absent)"),
    ({"instruction": "Number answer.", "output": 42}, "wrong type", "field 'output' is integer, expected text"),
    ({"instruction": ["a", "list"], "output": "x"}, "wrong type", "field 'instruction' is list, expected text"),
    ({"instruction": "Bool input.", "input": True, "output": "x"}, "wrong type",
     "field 'input' is boolean, expected text"),
], ids=["missing-output", "null-output", "number-output", "list-instruction", "bool-input"])
def test_bad_field_is_quarantined_naming_it(tmp_path, bad, category, reason):
    put(tmp_path, "data/sources/f.jsonl", jsonl(alpaca(1), bad, alpaca(3)))
    col = run_collect(tmp_path, src("data/sources/f.jsonl"))
    c = run_clean(tmp_path, col)
    assert [r["output"] for r in c.kept] == ["answer 1", "answer 3"]
    entry = c.q("data/sources/f.jsonl", 2)
    assert (entry["category"], entry["reason"]) == (category, reason)
    if category == "wrong type":  # the original value is kept for the fix
        assert json.loads(entry["row"]["_raw"]) == bad


def test_null_output_is_a_missing_field(tmp_path):
    put(tmp_path, "data/sources/n.jsonl", '{"instruction": "Say hi.", "input": "", "output": null}\n'
                                         + jsonl(alpaca(2)))
    c = run_clean(tmp_path, run_collect(tmp_path, src("data/sources/n.jsonl")))
    entry = c.q("data/sources/n.jsonl", 1)
    assert entry["category"] == "missing field" and entry["reason"].startswith("missing field 'output'")
    assert entry["row"]["output"] is None and entry["row"]["instruction"] == "Say hi."


@pytest.mark.parametrize("name, data", [
    ("m.csv", "question,answer,extra\nWhat is 2+2?,four,x\nWhat is 3+3?,six,y\n"),
    ("m.jsonl", jsonl({"question": "What is 2+2?", "answer": "four"},
                      {"question": "What is 3+3?", "answer": "six"})),
], ids=["csv", "jsonl"])
def test_column_mapping(tmp_path, name, data):
    put(tmp_path, f"data/sources/{name}", data)
    cols = {"instruction": "question", "output": "answer"}
    col = run_collect(tmp_path, src(f"data/sources/{name}", columns=cols))
    assert col.manifest["files"][0]["format"] == "alpaca"
    c = run_clean(tmp_path, col)
    assert [public(r) for r in c.kept] == [
        {"instruction": "What is 2+2?", "input": None, "output": "four"},
        {"instruction": "What is 3+3?", "input": None, "output": "six"}]


def test_mapped_column_of_the_wrong_type_is_named_as_in_the_file(tmp_path):
    put(tmp_path, "data/sources/m.jsonl",
        jsonl({"question": "Q?", "answer": 7}, {"question": "R?", "answer": "r"}))
    cols = {"instruction": "question", "output": "answer"}
    col = run_collect(tmp_path, src("data/sources/m.jsonl", columns=cols))
    c = run_clean(tmp_path, col)
    entry = c.q("data/sources/m.jsonl", 1)
    assert (entry["category"], entry["reason"]) == ("wrong type", "field 'answer' is integer, expected text")


# ------------------------------------------------------------------ 9. CSV quoting

@pytest.mark.parametrize("nl", ["\n", "\r\n"], ids=["lf", "crlf"])
def test_csv_embedded_newlines_and_quotes(tmp_path, nl):
    text = nl.join([
        "instruction,input,output",                        # line 1
        '"Say ""hi"", twice",,"line one',                 # line 2: a 3-line record
        "line two",                                        # line 3
        'line ""three"""',                                 # line 4
        "Next one,,plain",                                 # line 5
        "",                                                # line 6: blank, not a row
        "Bad,row",                                         # line 7: 2 fields
        'Last one,,"a, b"',                                # line 8
    ]) + nl
    put(tmp_path, "data/sources/q.csv", text)
    col = run_collect(tmp_path, src("data/sources/q.csv"))
    rows = {r["_line"]: r for r in col.snapshot}
    assert sorted(rows) == [2, 5, 7, 8]
    assert rows[2]["instruction"] == 'Say "hi", twice'
    assert rows[2]["output"] == f'line one{nl}line two{nl}line "three"'     # exactly as in the file
    assert (rows[5]["instruction"], rows[5]["output"]) == ("Next one", "plain")
    assert rows[8]["output"] == "a, b"
    assert any(m.startswith("data/sources/q.csv:7: 2 fields where the header has 3") for m in col.logged)
    c = run_clean(tmp_path, col)
    assert [r["_line"] for r in c.kept] == [2, 5, 8]
    assert c.kept[0]["output"] == 'line one\nline two\nline "three"'
    entry = c.q("data/sources/q.csv", 7)
    assert entry["category"] == "unparseable" and entry["reason"] == "2 fields where the header has 3"
    assert json.loads(entry["row"]["_raw"]) == ["Bad", "row"]


# ------------------------------------------------------------------ 10, 11. paths

def test_glob_matching_nothing_names_the_glob(tmp_path):
    put(tmp_path, "data/sources/a.jsonl", jsonl(alpaca(1)))
    with pytest.raises(SourceError, match=re.escape("data/sources/*.parquet") + ".*matches no files"):
        collect(tmp_path, [src("data/sources/*.parquet")], tmp_path / "out", log=lambda m: None)


@pytest.mark.parametrize("path, message", [
    ("data/sources/../../../x.jsonl", "'data/sources/../../../x.jsonl' leaves the project"),
    ("/etc/passwd", "'/etc/passwd' leaves the project"),
    ("models/x.jsonl", "'models/x.jsonl' is not under data/sources or data/incoming"),
    ("data/sources/../x.jsonl", "'data/sources/../x.jsonl' is not under data/sources or data/incoming"),
], ids=["dotdot-outside", "absolute", "inside-elsewhere", "dotdot-inside-elsewhere"])
def test_source_path_must_stay_under_the_source_folders(path, message):
    with pytest.raises(ConfigError) as err:
        parse_config({"data": {"sources": [{"path": path}]}})
    assert re.search(r"data\.sources\.0: .*" + re.escape(message), str(err.value)), str(err.value)


# ------------------------------------------------------------------ 12. formats

FORMATS = {
    "alpaca.jsonl": ([alpaca(1), alpaca(2)], "alpaca"),
    "pc.jsonl": ([{"prompt": "Say hi.", "completion": "hi"}, {"prompt": "Say yo.", "completion": "yo"}],
                 "prompt_completion"),
    "chat.jsonl": ([{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"},
                                  {"role": "assistant", "content": "Hello."}]}], "chat"),
    "sharegpt.jsonl": ([{"messages": [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "Hello."}]}],
                       "chat"),
}


def test_formats_are_detected_and_recorded_per_file(tmp_path):
    for name, (objs, _) in FORMATS.items():
        put(tmp_path, f"data/sources/{name}", jsonl(*objs))
    # real ShareGPT files call the list "conversations": one mapping away
    put(tmp_path, "data/sources/conv.jsonl",
        jsonl({"conversations": [{"from": "human", "value": "Yo?"}, {"from": "gpt", "value": "Yo."}]}))
    col = run_collect(tmp_path, *(src(f"data/sources/{n}") for n in FORMATS),
                      src("data/sources/conv.jsonl", columns={"messages": "conversations"}))
    assert {f["path"]: f["format"] for f in col.manifest["files"]} == {
        **{f"data/sources/{n}": fmt for n, (_, fmt) in FORMATS.items()}, "data/sources/conv.jsonl": "chat"}
    by_file = {}
    for r in col.snapshot:
        by_file.setdefault(r["_source"].rsplit("/", 1)[1], []).append(r)
    assert [public(r) for r in by_file["pc.jsonl"]] == FORMATS["pc.jsonl"][0]
    assert by_file["chat.jsonl"][0]["messages"] == FORMATS["chat.jsonl"][0][0]["messages"]
    assert by_file["sharegpt.jsonl"][0]["messages"] == [{"role": "user", "content": "Hi?"},
                                                        {"role": "assistant", "content": "Hello."}]
    assert by_file["conv.jsonl"][0]["messages"] == [{"role": "user", "content": "Yo?"},
                                                    {"role": "assistant", "content": "Yo."}]


@pytest.mark.parametrize("fmt, columns, missing", [
    ("chat", {}, "['messages']"),
    ("prompt_completion", {}, "['prompt', 'completion']"),
    ("alpaca", {"output": "answer"}, "['answer']"),
], ids=["chat", "prompt_completion", "alpaca-mapped"])
def test_declared_format_with_missing_columns_names_them(tmp_path, fmt, columns, missing):
    put(tmp_path, "data/sources/a.jsonl", jsonl(alpaca(1)))
    with pytest.raises(SourceError) as err:
        collect(tmp_path, [src("data/sources/a.jsonl", format=fmt, columns=columns)], tmp_path / "out",
                log=lambda m: None)
    msg = str(err.value)
    assert "data/sources/a.jsonl" in msg and f"format {fmt} needs column(s) {missing}" in msg
    assert "columns found: ['input', 'instruction', 'output']" in msg


# ------------------------------------------------------------------ 13. file types

ROWS = [alpaca(i) for i in range(1, 4)]
CHAT = [{"messages": [{"role": "user", "content": f"Question {i}?"},
                      {"role": "assistant", "content": f"Answer {i}."}]} for i in range(1, 3)]


def _csv_text(rows: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def _parquet(root: Path, rel: str, rows: list[dict], schema=None) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), root / rel)


def _saved(root: Path, rel: str, splits: dict[str, list[dict]] | None = None, rows=None) -> None:
    from datasets import Dataset, DatasetDict

    if splits is None:
        Dataset.from_list(rows).save_to_disk(str(root / rel))
    else:
        DatasetDict({k: Dataset.from_list(v) for k, v in splits.items()}).save_to_disk(str(root / rel))


def _chat_schema():
    import pyarrow as pa

    return pa.schema([("messages", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())])))])


# name -> (build(root) -> SourceConfig, expected canonical rows, expected (path, type, rows) per file)
CASES = {
    "jsonl": (lambda r: (put(r, "data/sources/a.jsonl", jsonl(*ROWS)), src("data/sources/a.jsonl"))[1],
              ROWS, [("data/sources/a.jsonl", "jsonl", 3)]),
    "json-array": (lambda r: (put(r, "data/sources/a.json", json.dumps(ROWS, indent=2)),
                              src("data/sources/a.json"))[1], ROWS, [("data/sources/a.json", "json", 3)]),
    "json-data-key": (lambda r: (put(r, "data/sources/a.json", json.dumps({"version": 2, "data": ROWS})),
                                 src("data/sources/a.json"))[1], ROWS, [("data/sources/a.json", "json", 3)]),
    "csv": (lambda r: (put(r, "data/sources/a.csv", _csv_text(ROWS)), src("data/sources/a.csv"))[1],
            ROWS, [("data/sources/a.csv", "csv", 3)]),
    "parquet": (lambda r: (_parquet(r, "data/sources/a.parquet", ROWS), src("data/sources/a.parquet"))[1],
                ROWS, [("data/sources/a.parquet", "parquet", 3)]),
    "parquet-chat": (lambda r: (_parquet(r, "data/sources/c.parquet", CHAT, _chat_schema()),
                                src("data/sources/c.parquet"))[1],
                     CHAT, [("data/sources/c.parquet", "parquet", 2)]),
    "saved-dataset": (lambda r: (_saved(r, "data/sources/ds", rows=ROWS), src("data/sources/ds"))[1],
                      ROWS, [("data/sources/ds", "saved", 3)]),
    "saved-chat": (lambda r: (_saved(r, "data/sources/ds", rows=CHAT), src("data/sources/ds"))[1],
                   CHAT, [("data/sources/ds", "saved", 2)]),
    "saved-datasetdict": (lambda r: (_saved(r, "data/sources/dd", {"train": ROWS, "test": [alpaca(9)]}),
                                     src("data/sources/dd", split="train"))[1],
                          ROWS, [("data/sources/dd", "saved", 3)]),
    "glob": (lambda r: (put(r, "data/sources/parts/part-2.jsonl", jsonl(*ROWS[2:])),
                        put(r, "data/sources/parts/part-1.jsonl", jsonl(*ROWS[:2])),
                        put(r, "data/sources/parts/notes.txt", "not data"),
                        src("data/sources/parts/part-*.jsonl"))[-1],
             ROWS, [("data/sources/parts/part-1.jsonl", "jsonl", 2),
                    ("data/sources/parts/part-2.jsonl", "jsonl", 1)]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_each_file_type_reads_every_row(tmp_path, case):
    build, expected, files = CASES[case]
    source = build(tmp_path)
    col = run_collect(tmp_path, source)
    assert col.result.parse_errors == 0
    assert [public(r) for r in col.snapshot] == [public({"_format": "chat" if "messages" in e else "alpaca", **e})
                                                for e in expected]
    assert [(f["path"], f["type"], f["rows"]) for f in col.manifest["files"]] == files
    for f in col.manifest["files"]:
        path = tmp_path / f["path"]
        if path.is_file():
            assert f["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
            assert f["size"] == path.stat().st_size
        else:
            assert f["size"] == sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) > 0
    # the rows of each file are numbered from 1 in file order
    for f in col.manifest["files"]:
        lines = [r["_line"] for r in col.snapshot if r["_source"] == f["path"]]
        assert lines == sorted(lines) and len(set(lines)) == len(lines)
    assert col.manifest["sources"][0]["name"] == source.label


def test_parquet_chat_column_is_list_of_struct(tmp_path):
    import pyarrow.parquet as pq

    _parquet(tmp_path, "data/sources/c.parquet", CHAT, _chat_schema())
    assert str(pq.read_schema(tmp_path / "data/sources/c.parquet").field("messages").type) == \
        "list<element: struct<role: string, content: string>>"
    col = run_collect(tmp_path, src("data/sources/c.parquet"))
    assert col.manifest["files"][0]["format"] == "chat"
    assert [r["messages"] for r in col.snapshot] == [c["messages"] for c in CHAT]


def test_datasetdict_without_split_lists_the_splits(tmp_path):
    _saved(tmp_path, "data/sources/dd", {"train": ROWS, "test": [alpaca(9)]})
    with pytest.raises(SourceError) as err:
        collect(tmp_path, [src("data/sources/dd")], tmp_path / "out", log=lambda m: None)
    msg = str(err.value)
    assert "data/sources/dd" in msg and "['test', 'train']" in msg and "split" in msg


def test_drop_folder_reads_in_name_order_and_skips_partial_hidden_and_redelivered(tmp_path):
    first = jsonl(alpaca(1), alpaca(2))
    put(tmp_path, "data/incoming/002.csv", _csv_text([alpaca(3)]))
    put(tmp_path, "data/incoming/001.jsonl", first)
    put(tmp_path, "data/incoming/003.jsonl.part", jsonl(alpaca(4)))       # still being written
    put(tmp_path, "data/incoming/.004.jsonl", jsonl(alpaca(5)))           # hidden
    put(tmp_path, "data/incoming/005.jsonl", first)                       # the same bytes again
    put(tmp_path, "data/incoming/README.md", "drop files here")
    col = run_collect(tmp_path, SourceConfig(type="drop", path="data/incoming", name="drops"))
    assert [(f["path"], f["type"], f["rows"]) for f in col.manifest["files"]] == [
        ("data/incoming/001.jsonl", "jsonl", 2), ("data/incoming/002.csv", "csv", 1)]
    for f in col.manifest["files"]:
        path = tmp_path / f["path"]
        assert f["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest() and f["size"] == path.stat().st_size
    skipped = {s["path"]: s["why"] for s in col.manifest["skipped"]}
    assert skipped == {
        "data/incoming/.004.jsonl": "hidden or still being written",
        "data/incoming/003.jsonl.part": "hidden or still being written",
        "data/incoming/005.jsonl": "same bytes as data/incoming/001.jsonl (re-delivery)",
    }
    assert all(s["source"] == "drops" for s in col.manifest["skipped"])
    c = run_clean(tmp_path, col)
    assert [r["output"] for r in c.kept] == ["answer 1", "answer 2", "answer 3"]
    assert c.report["per_source"] == {"drops": {"read": 3, "kept": 3, "quarantined": 0}}


def test_large_json_array_names_every_element_by_its_line(tmp_path):
    # (its speed, linear in the file's size, is measured by benchmarks/data_bench.py --json-array)
    n = 60_000
    put(tmp_path, "data/sources/big.json", json.dumps([alpaca(i) for i in range(n)], indent=2))
    from ftpipe.data.sources import read_items

    items = list(read_items(tmp_path / "data/sources/big.json", "json", src("data/sources/big.json")))
    assert len(items) == n and items[-1].obj == alpaca(n - 1)
    assert items[-1].line == 1 + 5 * (n - 1) + 1   # indent=2: "[" then 5 lines per element


# ------------------------------------------------------------------ 14. chat through clean

@pytest.fixture(scope="module")
def chat_tokenizer(tmp_path_factory):
    """A real tokenizer with a chat template (the default base model's builder)."""
    from ftpipe.training.basemodel import build_tokenizer

    tok = build_tokenizer(["Question one? Answer one.", "Be brief. Hello there."] * 50, vocab_size=300)
    path = tmp_path_factory.mktemp("tokenizer")
    tok.save_pretrained(path)
    return str(path)


def test_chat_rows_through_clean(tmp_path, chat_tokenizer):
    good = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Question one?"},
                         {"role": "assistant", "content": "Answer one."}]}
    ends_with_user = {"messages": [{"role": "user", "content": "Question two?"},
                                   {"role": "assistant", "content": "Answer two."},
                                   {"role": "user", "content": "And then?"}]}
    no_user = {"messages": [{"role": "system", "content": "Be brief."},
                            {"role": "assistant", "content": "Hello there."}]}
    bad_role = {"messages": [{"role": "narrator", "content": "Once."}, {"role": "assistant", "content": "Hi."}]}
    empty = {"messages": []}
    put(tmp_path, "data/sources/chat.jsonl", jsonl(good, ends_with_user, no_user, bad_role, empty))
    col = run_collect(tmp_path, src("data/sources/chat.jsonl"))
    assert col.manifest["files"][0]["format"] == "chat"
    c = run_clean(tmp_path, col, tokenizer=chat_tokenizer)
    assert [r["messages"] for r in c.kept] == [good["messages"]]
    assert c.kept[0]["_tokens"] > 0
    got = {e["line"]: (e["category"], e["reason"]) for e in c.quarantine}
    assert got == {
        2: ("bad chat", "the conversation does not end with an assistant turn"),
        3: ("bad chat", "the conversation has no user turn"),
        4: ("wrong type", "messages[0].role 'narrator' is not system, user or assistant"),
        5: ("empty", "empty conversation"),
    }


def test_evaluation_slices_come_from_a_column_or_the_source(tmp_path):
    """A `task` (or `slice`) column, a mapped column, or the source's own `slice:` name the
    slice each row is scored in; it survives cleaning into the splits."""
    put(tmp_path, "data/sources/mixed.jsonl", jsonl(alpaca(1, task="dates"), alpaca(2, task="math"), alpaca(3)))
    put(tmp_path, "data/sources/cat.jsonl", jsonl(alpaca(4, category="geo")))
    put(tmp_path, "data/sources/plain.jsonl", jsonl(alpaca(5), alpaca(6, slice="own")))
    col = run_collect(tmp_path, SourceConfig(path="data/sources/mixed.jsonl"),
                      SourceConfig(path="data/sources/cat.jsonl", columns={"slice": "category"}),
                      SourceConfig(path="data/sources/plain.jsonl", slice="support"))
    by_line = {(r["_source"], r["_line"]): r.get("slice") for r in col.snapshot}
    assert by_line == {("data/sources/mixed.jsonl", 1): "dates", ("data/sources/mixed.jsonl", 2): "math",
                       ("data/sources/mixed.jsonl", 3): None, ("data/sources/cat.jsonl", 1): "geo",
                       ("data/sources/plain.jsonl", 1): "support", ("data/sources/plain.jsonl", 2): "own"}
    cleaned = run_clean(tmp_path, col)
    assert sorted(r.get("slice") or "" for r in cleaned.kept) == ["", "dates", "geo", "math", "own", "support"]


# ------------------------------------------------------------------ hostile input, second trial

@pytest.mark.parametrize("name", ["x.jsonl", "x.csv", "x.json"])
def test_binary_file_without_nul_bytes_is_an_error_naming_it(tmp_path, name):
    """Compressed or encrypted bytes need not hold a NUL: the file still fails as binary,
    instead of being quarantined line by line with a Latin-1 hint."""
    import random

    rng = random.Random(7)
    data = bytes(rng.randrange(1, 256) for _ in range(200_000))
    put(tmp_path, f"data/sources/{name}", data)
    with pytest.raises(SourceError, match=re.escape(name) + r": binary content \([\d,]+ control bytes"):
        collect(tmp_path, [src(f"data/sources/{name}")], tmp_path / "out", log=lambda m: None)


def test_latin1_text_is_not_mistaken_for_binary(tmp_path):
    text = "".join(f'{{"instruction": "Café n°{i} à Zürich – ½ €", "output": "ok"}}\n' for i in range(200))
    put(tmp_path, "data/sources/l.jsonl", text.encode("cp1252"))
    col = collect(tmp_path, [SourceConfig(path="data/sources/l.jsonl", encoding="cp1252")], tmp_path / "out",
                  log=lambda m: None)
    assert col.rows == 200 and col.parse_errors == 0


def test_wrong_typed_row_names_every_bad_field(tmp_path):
    put(tmp_path, "data/sources/f.jsonl", jsonl({"instruction": ["a"], "input": 3, "output": False}))
    c = run_clean(tmp_path, run_collect(tmp_path, src("data/sources/f.jsonl")))
    assert c.q("data/sources/f.jsonl", 1)["reason"] == ("field 'instruction' is list, expected text; field 'input' "
                                                        "is integer, expected text; field 'output' is boolean, "
                                                        "expected text")


def test_unterminated_csv_quote_is_named_as_such(tmp_path):
    put(tmp_path, "data/sources/q.csv", 'instruction,input,output\nOne,,fine\n"Two,,oops\nThree,,lost\n')
    col = run_collect(tmp_path, src("data/sources/q.csv"))
    bad = next(r for r in col.snapshot if r["_line"] == 3)
    assert bad["_error"] == ("unterminated quote: a quoted field opened on line 3 runs to line 4, taking the "
                             "lines in between with it (1 fields where the header has 3)")


def test_an_unknown_encoding_is_a_config_error_naming_the_source():
    from ftpipe.config import ConfigError, parse_config

    with pytest.raises(ConfigError) as err:
        parse_config({"data": {"sources": [{"name": "legacy", "path": "data/sources/a.csv", "encoding": "latin-9x"}]}})
    assert "data.sources.0.encoding: unknown encoding 'latin-9x' (e.g. utf-8, cp1252, latin-1, utf-16) " \
           "(source 'legacy')" in str(err.value)
