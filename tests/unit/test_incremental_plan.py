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


def test_stages_chain_weights_keys_and_one_step_axis(tmp_path):
    """train.stages: each stage a whole train section; the first from the plan's start, a later
    one from what the stage before left (its adapter trained on, or its full weights), keyed by
    that training, its steps after the earlier stages'; the run's result joins them."""
    import pytest

    from ftpipe.config import TrainConfig
    from ftpipe.training.plan import TrainingPlan, stage_plan
    from ftpipe.training.recipe import TrainResult

    train = TrainConfig(lr=0.01, stages=[{"max_steps": 30}, {"objective": "dpo", "lr": 0.001, "dpo": {"beta": 0.3}}])
    sft, dpo = train.stage_configs()
    assert (sft.objective, sft.max_steps, sft.lr, sft.stages) == ("sft", 30, 0.01, [])
    assert (dpo.objective, dpo.max_steps, dpo.lr, dpo.dpo.beta, dpo.dpo.loss) == ("dpo", 800, 0.001, 0.3, "sigmoid")
    with pytest.raises(ValueError) as bad:
        TrainConfig(stages=[{"method": "full"}, {"objective": "dpo", "neftune_alpha": 5}, {"dpo": {"beta": -1}}])
    text = str(bad.value)
    assert "train.stages[1]: method cannot change between stages" in text
    assert "train.stages[2]: train.neftune_alpha does not apply to train.objective=dpo" in text
    assert "train.stages[3].dpo.beta: Input should be greater than 0" in text

    inc = plan(_splits(tmp_path, ["a"], ["t"]), None, None, None, "scratch", 0.5, 0, tmp_path / "o")
    p = TrainingPlan(inc, None, "/base", {"train": "t.jsonl"}, train, "md5:scratch", "scratch", stages=(sft, dpo))
    first = stage_plan(p, 0, None)
    assert (first.train, first.base_path, first.start_adapter, first.data_key, first.first_step, first.stages) == \
        (sft, "/base", None, "md5:scratch", 0, ())
    done = TrainResult("/r/train-aaa/model", "/r/train-aaa/adapter", "lora", 30, 0.5, 0.4, 900, 3.0,
                       [(10, 0.9), (30, 0.5)], [(30, 0.4)], 30)
    second = stage_plan(p, 1, done)
    assert (second.train, second.base_path, second.start_adapter, second.first_step) == \
        (dpo, "/base", "/r/train-aaa/adapter", 30)
    assert second.data_key == "md5:scratch:after:train-aaa"
    full = stage_plan(p, 1, TrainResult("/r/train-bbb/model", None, "full", 30, 0.5, 0.4, 900, 3.0))
    assert (full.base_path, full.start_adapter) == ("/r/train-bbb/model", None)

    last = TrainResult("/r/train-ccc/model", "/r/train-ccc/adapter", "lora", 20, 0.3, 0.2, 400, 2.0,
                       [(10, 0.6), (20, 0.3)], [(20, 0.2)], 10)
    joined = TrainResult.chained([done, last], ["sft", "dpo"])
    assert (joined.model_dir, joined.adapter_dir, joined.steps, joined.train_loss, joined.tokens) == \
        ("/r/train-ccc/model", "/r/train-ccc/adapter", 50, 0.3, 1300)
    assert joined.loss_history == [(10, 0.9), (30, 0.5), (40, 0.6), (50, 0.3)]
    assert joined.val_history == [(30, 0.4), (50, 0.2)] and joined.best_step == 40
    assert [(s["stage"], s["objective"], s["first_step"], s["steps"]) for s in joined.stages] == \
        [(1, "sft", 1, 30), (2, "dpo", 31, 20)]


def test_a_training_is_keyed_by_what_its_start_weights_are_not_where_they_lie(tmp_path):
    """The same recipe, data and start weights in a moved or cloned project (another base
    path) is the same training; a base rebuilt in place with other weights is another."""
    from ftpipe.config import LoraConfig, ModelConfig, TrainConfig
    from ftpipe.training.recipe import training_dir

    args = LoraConfig(), TrainConfig(), "md5.dir:scratch"
    here = training_dir(tmp_path, ModelConfig(base="/home/a/proj/models/base"), *args, "models/base", "sha256:aa")
    moved = training_dir(tmp_path, ModelConfig(base="/srv/ci/proj/models/base"), *args, "models/base", "sha256:aa")
    rebuilt = training_dir(tmp_path, ModelConfig(base="/home/a/proj/models/base"), *args, "models/base", "sha256:bb")
    assert here == moved and here != rebuilt and here.parent == tmp_path / "runs"
