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
