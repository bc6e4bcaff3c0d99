"""Preference pairs through collect, clean and split: every bad pair quarantined with its
reason, PII scrubbed in all three fields, duplicates judged on the whole pair, a prompt in
one split only."""
import json
from pathlib import Path

from ftpipe.config import CleanConfig, SourceConfig, SplitConfig
from ftpipe.data.cleaning import clean
from ftpipe.data.collection import collect
from ftpipe.data.records import canonical, detect_format, prompt_parts, rejected_view
from ftpipe.data.splitting import split_examples, split_of


def pair(prompt, chosen, rejected, **kw) -> str:
    return json.dumps({"prompt": prompt, "chosen": chosen, "rejected": rejected} | kw)


def test_trl_conversational_pairs_become_chat_pairs():
    obj = {"prompt": [{"role": "user", "content": "Convert 2001-02-03 to words."}],
           "chosen": [{"role": "assistant", "content": "February 3, 2001"}],
           "rejected": [{"role": "assistant", "content": "3 February 2001"}]}
    fmt = detect_format(list(obj), {})
    row = canonical(obj, fmt, {})
    assert row["_format"] == "chat_preference" and "_error" not in row
    assert row["chosen"] == "February 3, 2001" and row["rejected"] == "3 February 2001"
    assert prompt_parts(row) == [["user", "Convert 2001-02-03 to words."]]
    assert rejected_view(row)["chosen"] == "3 February 2001"
    bad = canonical({"prompt": "p", "chosen": [{"role": "user", "content": "x"}], "rejected": "r"},
                    "preference", {})
    assert "does not end with an assistant turn" in bad["_error"]


def test_bad_pairs_are_quarantined_with_reasons_and_counts_reconcile(tmp_path):
    src = tmp_path / "data/sources/pairs.jsonl"
    src.parent.mkdir(parents=True)
    lines = [
        pair("Convert 2001-02-03 to words.", "February 3, 2001", "3 February 2001"),      # 1 kept
        pair("Convert 2001-02-04 to words.", "", "4 February 2001"),                      # 2 empty chosen
        pair("Convert 2001-02-05 to words.", "February 5, 2001", " February 5,  2001"),  # 3 same answers
        pair("Convert 2001-02-03 to words.", "February 3, 2001", "3 February 2001"),      # 4 duplicate pair
        pair("Convert 2001-02-03 to words.", "February 3, 2001", "2001/02/03"),           # 5 same prompt, other pair: kept
        pair("Mail bob@example.com the date 2001-02-06.", "Sent to bob@example.com", "call 555-123-4567"),  # 6 PII
        json.dumps({"prompt": "Convert 2001-02-07 to words.", "chosen": "February 7, 2001"}),  # 7 missing rejected
        pair("Convert 2001-02-08 to words.", "February 8, 2001", "x " * 400),              # 8 too long
    ]
    src.write_text("\n".join(lines) + "\n")
    res = collect(tmp_path, [SourceConfig(path="data/sources/pairs.jsonl")], tmp_path / "out", log=lambda m: None)
    c = clean(Path(res.snapshot), CleanConfig(max_tokens=64), tmp_path / "clean")
    assert c.read == 8 == c.kept + c.quarantined
    q = {r["line"]: r for r in map(json.loads, Path(c.quarantine).read_text().splitlines())}
    assert set(q) == {2, 3, 4, 7, 8}
    assert q[2]["reason"].startswith("empty chosen answer")
    assert q[3]["reason"] == "chosen and rejected answers are the same"
    assert q[4]["category"] == "duplicate"
    assert q[7]["reason"] == "missing field 'rejected' (null or absent)"
    assert q[8]["reason"].startswith("too long: ") and q[8]["category"] == "too long"
    kept = {r["_line"]: r for r in map(json.loads, Path(c.cleaned).read_text().splitlines())}
    assert set(kept) == {1, 5, 6}
    scrubbed = json.dumps(kept[6])
    assert "bob@example.com" not in scrubbed and "555-123-4567" not in scrubbed
    assert c.pii


def test_too_long_pairs_count_the_longer_answer(tmp_path):
    src = tmp_path / "data/sources/pairs.jsonl"
    src.parent.mkdir(parents=True)
    src.write_text("\n".join([pair("Say it.", "ok", "no " * 100), pair("Say it again.", "no " * 100, "ok")]) + "\n")
    res = collect(tmp_path, [SourceConfig(path="data/sources/pairs.jsonl")], tmp_path / "out", log=lambda m: None)
    c = clean(Path(res.snapshot), CleanConfig(max_tokens=64), tmp_path / "clean")
    assert (c.kept, c.quarantined) == (0, 2) and c.reasons == {"too long": 2}


def test_a_prompt_sits_in_one_split_whatever_its_pairs(tmp_path):
    rows = [{"_format": "preference", "prompt": f"Convert 2001-02-{d:02d} to words.", "chosen": f"c{k}",
             "rejected": f"r{k}", "_src": "pairs"} for d in range(1, 29) for k in range(3)]
    cleaned = tmp_path / "clean.jsonl"
    cleaned.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = SplitConfig(validation=0.2, test=0.2, salt="s")
    split_examples(cleaned, cfg, tmp_path / "splits")
    where: dict[str, set] = {}
    for name in ("train", "validation", "test"):
        for line in (tmp_path / "splits" / f"{name}.jsonl").read_text().splitlines():
            where.setdefault(json.loads(line)["prompt"], set()).add(name)
    assert len(where) == 28 and all(len(s) == 1 for s in where.values())
    assert {split_of(r, cfg) for r in rows} == {"train", "validation", "test"}
