"""The sweep's space and study bookkeeping, without training: what a config may sweep, what a
trial's values make of the recipe, the budget two workers share, a dead worker's trial."""
from __future__ import annotations

import subprocess
import sys

import optuna
import pytest

from ftpipe.config import ConfigError, LoraConfig, SweepConfig, TrainConfig, load_config
from ftpipe.sweeps import space, study
from tests.helpers import REPO


def test_every_bad_space_entry_is_named_at_once():
    with pytest.raises(ConfigError) as err:
        load_config(REPO / "params.yaml", [
            "sweep.space={train.lr: {low: 0.1, high: 0.01}, lora.r: [0, 8], data.split.test: [0.2], "
            "train.nope: [1], train.warmup_steps: {low: 1, hgh: 3}}"])
    text = str(err.value)
    for expected in ("'train.lr': low (0.1) must be below high (0.01)", "'lora.r': 0 is not a valid lora.r",
                     "'data.split.test': only train.* and lora.* recipe keys", "train has no field 'nope'",
                     "'train.warmup_steps': high: Field required"):
        assert expected in text, text
    with pytest.raises(ConfigError, match="sampler grid needs a list of values"):
        load_config(REPO / "params.yaml", ["sweep.sampler=grid"])   # the default space has a range


def test_a_trials_values_make_its_recipe_and_its_validation_points():
    cfg = SweepConfig(space={"train.lr": {"low": 1e-4, "high": 1e-2, "log": True}, "lora.r": [4, 8],
                             "train.warmup_steps": {"low": 0, "high": 20, "step": 5}}, eval_points=4)
    s = optuna.create_study()
    for _ in range(5):
        params = space.suggest(s.ask(), cfg.params())
        assert 1e-4 <= params["train.lr"] <= 1e-2 and params["lora.r"] in (4, 8)
        assert isinstance(params["train.warmup_steps"], int) and params["train.warmup_steps"] % 5 == 0
        lora, train = space.apply(params, LoraConfig(), TrainConfig(max_steps=200))
        assert (lora.r, train.lr, train.warmup_steps, train.max_steps) == (
            params["lora.r"], params["train.lr"], params["train.warmup_steps"], 200)
    assert space.with_eval_points(TrainConfig(max_steps=200), cfg).eval_every == 50
    assert space.with_eval_points(TrainConfig(max_steps=200, eval_every=7), cfg).eval_every == 7
    with pytest.raises(ValueError):
        space.apply({"lora.r": 0}, LoraConfig(), TrainConfig())


def test_the_budget_counts_finished_and_running_trials_and_names_one_too_many(tmp_path):
    cfg = SweepConfig(trials=3, space={"lora.r": [2, 4, 8, 16]})
    url = f"sqlite:///{tmp_path / 'o.db'}"
    s = study.open_study(url, "s", cfg, cfg.params())
    a, b = s.ask(), s.ask()
    s.tell(a, 1.0)
    assert study.counts(s) == (1, 1) and study.needed(s, 3) == 1
    c, d = s.ask(), s.ask()                      # two workers asked for the last trial at once
    assert not study.over_budget(s, c.number, 3) and study.over_budget(s, d.number, 3)
    s.tell(b, state=optuna.trial.TrialState.PRUNED)
    assert study.counts(s) == (2, 2)


def test_a_trial_whose_worker_died_here_is_failed_and_retried_once(tmp_path):
    cfg = SweepConfig(trials=3, space={"lora.r": [2, 4, 8]})
    s = study.open_study(f"sqlite:///{tmp_path / 'o.db'}", "s", cfg, cfg.params())
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    gone, alive = s.ask(), s.ask()
    space.suggest(gone, cfg.params())
    gone.set_user_attr(study.WORKER, study.worker_id().rsplit(":", 1)[0] + f":{dead}")   # this machine, a dead pid
    alive.set_user_attr(study.WORKER, study.worker_id())
    assert study.fail_dead_trials(s) == [gone.number]
    states = {t.number: t.state for t in s.trials}
    assert states[gone.number] == optuna.trial.TrialState.FAIL and states[alive.number] == optuna.trial.TrialState.RUNNING
    retry = [t for t in s.trials if t.state == optuna.trial.TrialState.WAITING]
    assert len(retry) == 1 and retry[0].params == s.trials[gone.number].params
    assert study.retried_from(retry[0]) == gone.number
    assert study.fail_dead_trials(s) == []       # once only
