"""The incremental planner: new rows by content hash, replay, when a run skips, and when the
champion's weights cannot be the start."""
import json

from ftpipe.training.plan import plan, scaled_steps, skip_reason


def _splits(tmp_path, train: list[str], test: list[str]):
    d = tmp_path / "splits"
    d.mkdir()
    for name, hashes in (("train", train), ("validation", []), ("test", test)):
        (d / f"{name}.jsonl").write_text("".join(json.dumps({"_hash": h, "prompt": h}) + "\n" for h in hashes))
    return d


def test_new_rows_are_counted_by_content_hash_and_replay_follows_the_ratio(tmp_path):
    d = _splits(tmp_path, [f"old{i}" for i in range(40)] + [f"new{i}" for i in range(10)], ["old-t", "new-t"])
    seen = {f"old{i}" for i in range(40)} | {"old-t"}
    inc = plan(d, "m v1", "1", seen, "champion", 0.5, 0, tmp_path / "out")
    assert (inc.new_rows, inc.new_train_rows, inc.replay_rows, inc.start_from) == (11, 10, 10, "champion")
    rows = [json.loads(x)["_hash"] for x in (tmp_path / "out/train.jsonl").read_text().splitlines()]
    assert sorted(h for h in rows if h.startswith("new")) == sorted(f"new{i}" for i in range(10))
    assert len(rows) == 20
    again = plan(d, "m v1", "1", seen, "champion", 0.5, 0, tmp_path / "out2")   # deterministic
    assert (tmp_path / "out2/train.jsonl").read_bytes() == (tmp_path / "out/train.jsonl").read_bytes()
    assert again == inc.__class__(**{**inc.__dict__, "train_path": again.train_path})
    assert scaled_steps(1200, inc) == 480      # same epochs: 1,200 steps x 20 rows / 50 training rows


def test_skip_reasons(tmp_path):
    d = _splits(tmp_path, ["a", "b", "c"], ["t"])
    inc = plan(d, "m v1", "1", {"a", "b"}, "champion", 0.5, 0, tmp_path / "out")
    assert skip_reason(inc, 5, None) == "skipped: 2 new rows < 5"        # c and t
    assert skip_reason(inc, 1, None) is None
    assert skip_reason(inc, 1, "m v1 (refuse)") == "skipped: m v1 (refuse) already trained on this data version with this config"
    only_test = plan(d, "m v1", "1", {"a", "b", "c"}, "champion", 0.5, 0, tmp_path / "out3")
    assert skip_reason(only_test, 1, None) == "skipped: none of the 1 new rows is in the training split"
    no_champion = plan(d, None, None, None, "champion", 0.5, 0, tmp_path / "out4")
    assert no_champion.start_from == "scratch" and skip_reason(no_champion, 100, None) is None


def test_a_champion_of_another_base_model_is_never_the_start(tmp_path):
    d = _splits(tmp_path, ["a", "b", "c"], ["t"])
    why = "the base model changed since m v1 (models/base@abc -> Qwen/Qwen2.5-0.5B@main)"
    inc = plan(d, "m v1", "1", {"a"}, "champion", 0.5, 0, tmp_path / "out", base_changed=why)
    assert inc.start_from == "scratch" and inc.train_path is None
    assert inc.reason.startswith(why) and "all 3 training rows" in inc.reason
    assert inc.new_rows == 3   # still counted against the champion's data (b, c, t)
