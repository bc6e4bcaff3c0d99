"""Feedback on a conversation becomes conversation data: a correction a chat row ending with
the corrected assistant turn, a preference a chat pair; collection reads each file as that
format (the store is a real SQLite file)."""
import json

import pytest

from ftpipe.data.collection import _rows_of_file
from ftpipe.data.params import SourceConfig
from ftpipe.serving.records import FeedbackError, Records


def test_feedback_on_a_conversation_exports_as_chat_rows_and_chat_pairs(tmp_path):
    rec = Records.open(f"sqlite:///{tmp_path / 'r.db'}")
    chat = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"}]}
    a = rec.record("models:/m/1", "1", chat, "<prompt>", "Paris.", 10.0)
    b = rec.record("models:/m/2", "2", chat, "<prompt>", "The capital of France is Paris, a city...", 12.0)
    rec.add_feedback(a, "preference", rejected_id=b)
    rec.add_feedback(b, "correction", correction="Paris.")
    with pytest.raises(FeedbackError, match="same answer") as exc:
        rec.add_feedback(a, "preference", rejected_id=a)
    assert exc.value.status == 422
    paths, counts = rec.export(tmp_path / "incoming")
    assert counts == {"corrections": 1, "preferences": 1}
    by_fmt = {p.name.rsplit("-", 1)[1].removesuffix(".jsonl"): p for p in paths}
    assert set(by_fmt) == {"chat", "chat_preference"}
    row = json.loads(by_fmt["chat"].read_text())
    assert row["messages"][-1] == {"role": "assistant", "content": "Paris."} and row["request_ids"] == [b]
    pair = json.loads(by_fmt["chat_preference"].read_text())
    assert (pair["chosen"], pair["rejected"], pair["request_ids"]) == ("Paris.", "The capital of France is Paris, a city...", [a, b])
    for fmt, path in by_fmt.items():
        got, rows = _rows_of_file(path, path.name, SourceConfig(name="incoming", path="data/incoming"), "jsonl")
        assert got == fmt and not any("_error" in r for r in rows)
    assert sorted(rec.requests_in(by_fmt["chat_preference"].name)) == sorted([a, b])
    assert rec.drops_of(b) == sorted(p.name for p in paths)


def test_each_text_of_a_request_is_scrubbed_on_its_own(tmp_path):
    """Not the JSON of the row: an email after a newline, a key after a tab, are found as in the data."""
    rec = Records.open(f"sqlite:///{tmp_path / 'r.db'}")
    row = {"messages": [{"role": "user", "content": "Contact:\nbob@example.com\tkey AKIAIOSFODNN7EXAMPLE"}]}
    rid = rec.record("models:/m/1", "1", row, "p", "a", 1.0)
    kept = rec.request(rid)["row"]
    assert "bob@example.com" not in kept and "AKIAIOSFODNN7EXAMPLE" not in kept
    assert json.loads(kept)["messages"][0]["content"].startswith("Contact:\n<EMAIL>")


def test_an_export_claims_its_rows_so_two_exporters_never_write_one_twice(tmp_path):
    rec = Records.open(f"sqlite:///{tmp_path / 'r.db'}")
    ids = [rec.record("models:/m/1", "1", {"instruction": f"q{i}", "input": ""}, f"p{i}", "a", 1.0) for i in range(20)]
    for rid in ids:
        rec.add_feedback(rid, "correction", correction="fixed")
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda k: rec.export(tmp_path / "incoming"), range(4)))
    rows = [json.loads(x) for paths, _ in got for p in paths for x in p.read_text().splitlines()]
    assert sorted(r["request_ids"][0] for r in rows) == sorted(ids)          # each exactly once
    assert sum(c["corrections"] for _, c in got) == 20
