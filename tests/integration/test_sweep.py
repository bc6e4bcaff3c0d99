"""`ftpipe sweep`: one Optuna study of tiny-model trials, the pruner, MLflow child runs, the
winner through the gate; a killed sweep resumed; two workers on one PostgreSQL study."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
import uuid
from pathlib import Path

import optuna
import pytest

from tests.helpers import BIN, PG, REPO, make_project, mlflow_client, needs_postgres, ok, ok_json, run_cli, start_cli

pytestmark = pytest.mark.integration
NAME = "ftpipe-dates"

SWEEP = {"trials": 6, "sampler": "random", "seed": 0, "eval_points": 4, "pruner": {"startup_trials": 1},
         "space": {"train.lr": {"low": 0.001, "high": 0.03, "log": True}, "lora.r": [2, 4, 8]}}


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    return make_project(tmp_path_factory.mktemp("sweep"), {"sweep": SWEEP, "train": {"max_steps": 40}})


def study_of(project: Path, name: str, url: str | None = None) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=url or f"sqlite:///{project / 'optuna' / 'optuna.db'}")


def trial_lines(out: str) -> list[int]:
    """The trial numbers a sweep process started (its `trial N: key=value` lines)."""
    return [int(n) for n in re.findall(r"Task run 'trial-\d+' - trial (\d+): \w+\.\w+=", out)]


def test_a_sweep_prunes_registers_its_best_through_the_gate_and_never_reads_the_test_split(project, prefect_server):
    out = ok(run_cli(["sweep"], project, prefect_server))
    c = mlflow_client(project)
    parent = c.search_runs([c.get_experiment_by_name("ftpipe").experiment_id],
                           filter_string="tags.`ftpipe.sweep.study` LIKE 'ftpipe-dates-sweep-%' "
                                         "and tags.`mlflow.runName` LIKE 'sweep-%'")[0]
    name = parent.data.tags["ftpipe.sweep.study"]
    study = study_of(project, name)
    states = [t.state for t in study.trials]
    assert sum(s in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED) for s in states) == 6
    assert optuna.trial.TrialState.PRUNED in states, states          # the median pruner stopped a trial
    assert len({tuple(sorted(t.params.items())) for t in study.trials}) == len(study.trials)   # six recipes

    # one child run per trial under the sweep's run, its state, params and loss curve
    children = c.search_runs([parent.info.experiment_id],
                             filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    by_trial = {int(r.data.tags["ftpipe.sweep.trial"]): r for r in children}
    assert sorted(by_trial) == [t.number for t in study.trials]
    for t in study.trials:
        run = by_trial[t.number]
        assert run.data.tags["ftpipe.sweep.state"] == t.state.name.lower()
        assert run.info.status == {"COMPLETE": "FINISHED", "PRUNED": "KILLED"}[t.state.name]
        assert float(run.data.params["train.lr"]) == pytest.approx(t.params["train.lr"])
        assert c.get_metric_history(run.info.run_id, "val_loss")
    arts = {a.path for a in c.list_artifacts(parent.info.run_id, "sweep")}
    assert {"sweep/leaderboard.csv", "sweep/sweep.html", "sweep/optimization_history.png",
            "sweep/parallel_coordinate.png", "sweep/param_importances.png"} <= arts

    # the best complete trial is the registered candidate, gated like `ftpipe run`, its lineage names it
    best = min((t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE), key=lambda t: t.value)
    assert f"best trial {best.number} (val_loss {best.value:.4f}) -> the gate" in out
    assert "Promotion gate: PROMOTE" in out
    v1 = c.get_model_version_by_alias(NAME, "champion")
    assert v1.run_id == parent.info.run_id
    from ftpipe.lineage.record import recorded_tags

    facts = recorded_tags(c, NAME, v1.version)
    assert facts["ftpipe.sweep"].startswith(f"study {name} trial {best.number} (val_loss=")
    assert facts["ftpipe.candidate"] == best.user_attrs["training_dir"]          # its training, reused
    audit = ok_json(run_cli(["lineage", f"models:/{NAME}/{v1.version}", "--json"], project, prefect_server))
    link = next(x for x in audit["links"] if x["name"] == "sweep trial")
    assert link["ok"] and not link["warning"] and f"trial {best.number} complete" in link["detail"], link

    # the test split never reaches a trial: not in any trial's spec, and the objective is the
    # validation loss of the exported weights, which the run logs next to its test-set scores
    test_split = str(project / "data" / "splits" / "test.jsonl")
    specs = [p for p in (project / "runs" / "sweeps" / name).glob("worker-*.json") if ".result" not in p.name]
    assert len(specs) >= 6
    for spec in specs:
        text = spec.read_text()
        assert "test.jsonl" not in text and test_split not in text
        assert json.loads(text)["val_path"].endswith("validation.jsonl")
    val = [m.value for m in c.get_metric_history(parent.info.run_id, "val_loss")]
    assert any(v == pytest.approx(best.value) for v in val), (val, best.value)
    assert c.get_run(parent.info.run_id).data.metrics["candidate_eval_loss"] not in val   # the test set's

    report = ok(run_cli(["sweep", "--report"], project, prefect_server))
    assert f"study {name}" in report and f"best: trial {best.number}" in report
    assert report.count("pruned") >= 1 and report.count("complete") >= 1


def test_a_killed_sweep_resumes_its_study_and_a_worse_best_is_refused(project, prefect_server):
    # a sweep of hopeless learning rates, checkpoints every 10 steps, killed inside its first trial
    args = ["sweep", "sweep.sampler=grid", "sweep.trials=2", "sweep.space={train.lr: [0.00001, 0.00002], lora.r: [2]}",
            "train.checkpoint_every=10"]
    before = set((project / "runs").glob("train-*"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")} | prefect_server | {"COLUMNS": "200"}
    proc = start_cli(args, project, env=env)
    deadline = time.time() + 300
    while not any((d / "checkpoints").is_dir() and any((d / "checkpoints").glob("step-*"))
                  for d in set((project / "runs").glob("train-*")) - before):
        assert proc.poll() is None and time.time() < deadline, proc.output()[-3000:]
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()

    out = ok(run_cli(args, project, prefect_server))
    assert "were running when their worker died" in out and re.search(r"resuming from .*step-\d+ \(step \d+/40\)", out)
    c = mlflow_client(project)
    run = c.search_runs([c.get_experiment_by_name("ftpipe").experiment_id],
                        filter_string="tags.`ftpipe.sweep.resumes` != ''")[0]
    study = study_of(project, run.data.tags["ftpipe.sweep.study"])
    finished = [t for t in study.trials if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)]
    failed = [t for t in study.trials if t.state == optuna.trial.TrialState.FAIL]
    assert len(finished) == 2 and len(failed) == 1                     # the same count as an unbroken sweep
    assert [t.system_attrs.get("failed_trial") for t in finished].count(failed[0].number) == 1   # retried once
    assert c.get_run(run.data.tags["ftpipe.sweep.resumes"]).info.status == "KILLED"
    # its best is worse than the champion: registered, refused, the champion stays
    assert "Promotion gate: REFUSE" in out
    assert str(c.get_model_version_by_alias(NAME, "champion").version) == "1"


@needs_postgres
def test_a_second_machine_joins_a_postgresql_study_from_the_champion_and_no_trial_runs_twice(project, prefect_server,
                                                                                           tmp_path):
    """Two workers on one PostgreSQL study of a sweep that starts from the champion (new rows
    dropped: an incremental set + replay, the champion's adapter trains on). The second works in
    a git clone of the project, as another machine would: its data from `dvc pull`, the
    incremental training file from the first worker's run, the champion from the registry."""
    import psycopg

    db = f"ftpipe_sweep_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(f"{PG}/postgres", autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {db}")
    url = f"postgresql+psycopg://postgres@127.0.0.1:5432/{db}"
    drops = (REPO / "data/drops/drop-0002.jsonl").read_text().splitlines(keepends=True)
    (project / "data/incoming/drop-sweep.jsonl").write_text("".join(drops[400:480]))
    args = [f"sweep.storage={url}", "sweep.study=pg", "sweep.trials=4", "sweep.pruner.enabled=false", "sweep.seed=7",
            "incremental.start_from=champion", "incremental.max_steps=30"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")} | prefect_server | {"COLUMNS": "200"}
    first = start_cli(["sweep", *args], project, env=env)
    deadline = time.time() + 300
    while "pg" not in optuna.study.get_all_study_names(url):   # the first worker prepared the data, made the study
        assert first.poll() is None and time.time() < deadline, first.output()[-3000:]
        time.sleep(0.5)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(git + ["add", "-A"], cwd=project, check=True)            # the drop and dvc.lock, committed
    subprocess.run(git + ["commit", "-qm", "drop"], cwd=project, check=True)
    clone = tmp_path / "machine-2"
    subprocess.run(["git", "clone", "-q", str(project), str(clone)], check=True)
    pull = subprocess.run([str(BIN / "dvc"), "pull"], cwd=clone, capture_output=True, text=True)
    assert pull.returncode == 0, pull.stdout[-2000:] + pull.stderr[-2000:]
    second = run_cli(["sweep", "--join", "--study", "pg", *args], clone,
                     prefect_server | {"MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow' / 'mlflow.db'}"})
    out_first, _ = first.communicate(timeout=600)
    out_second = ok(second)
    assert first.returncode == 0, out_first[-3000:]
    assert "new training rows" in out_first and "replayed" in out_first        # the sweep starts from the champion
    here, there = trial_lines(out_first), trial_lines(out_second)
    assert here and there, (here, there)                                      # both workers ran trials
    assert not set(here) & set(there)                                         # none twice
    study = study_of(project, "pg", url)
    assert sorted(here + there) == [t.number for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(here + there) == 4
    # the second machine fetched what it had not: the incremental set (byte-identical) and the champion
    mine = next((project / "runs").glob("increment-*/train.jsonl"))
    theirs = clone / mine.relative_to(project)
    assert theirs.read_bytes() == mine.read_bytes()
    assert list((clone / "runs").glob("champion-ftpipe-dates-v1/.complete"))
    assert "Promotion gate:" in out_first                         # the first worker registers and gates the winner
