"""Faults injected for real into `ftpipe run` (real Prefect server, MLflow, DVC): SIGKILL
during training, then the same run again; SIGKILL after the version is registered but
before the gate decided; two retrains started at once in one project. Each time: one
registered version per candidate, no alias moved by a partial run, the registry whole."""
from __future__ import annotations

import json
import os
import signal
import time

import pytest

from tests.helpers import ok, REPO, make_project, mlflow_client, run_cli, start_cli

MODEL = "ftpipe-dates"



def _start(project, env, *args):
    """`ftpipe run` in its own process group (so a kill takes its children too)."""
    return start_cli(["run", *args], project, env)


def _kill(proc):
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(30)


def _versions(c):
    return sorted(c.search_model_versions(f"name = '{MODEL}'"), key=lambda v: int(v.version))


def _wait(cond, proc, what, timeout=300):
    deadline = time.time() + timeout
    while not cond():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before {what}:\n{proc.output()[-3000:]}")
        assert time.time() < deadline, f"no {what} within {timeout} s"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    return make_project(tmp_path_factory.mktemp("faults"), {
        "train": {"max_steps": 300, "checkpoint_every": 20, "log_every": 20},
        "registry": {"io_retry_delay_s": 0.5}})


def test_sigkill_during_training_then_the_same_run_resumes_and_registers_once(project, prefect_server):
    c = mlflow_client(project)
    proc = _start(project, prefect_server)
    ckpts = lambda: sorted(project.glob("runs/train-*/checkpoints/step-*"))  # noqa: E731
    _wait(lambda: any(int(p.name.split("-")[1]) >= 40 for p in ckpts()), proc, "checkpoint at step 40")
    _kill(proc)
    assert not list(project.glob("runs/train-*/train_result.json"))        # it died mid-training
    killed_at = max(int(p.name.split("-")[1]) for p in ckpts())
    assert _versions(c) == []                                                # nothing registered

    out = ok(run_cli(["run"], project, prefect_server))
    assert "resuming from" in out and f"(step {killed_at}/300)" in out
    result = json.loads(next(project.glob("runs/train-*/train_result.json")).read_text())
    assert result["resumed_from"] == killed_at and result["steps"] == 300
    vs = _versions(c)
    assert [str(v.version) for v in vs] == ["1"] and vs[0].tags["ftpipe.decision"] == "promote"
    assert "champion" in c.get_model_version(MODEL, "1").aliases

    out = ok(run_cli(["run"], project, prefect_server))                     # the same run once more
    assert "Cached" in out                                                   # training reused, not repeated
    assert "skipped: ftpipe-dates v1 already holds these weights" in out
    assert [str(v.version) for v in _versions(c)] == ["1"]


def test_sigkill_between_registration_and_the_gate_is_finished_by_the_next_run(project, prefect_server):
    """The test holds the registry's promotion lock, so the run stops inside the gate with
    its version registered and undecided; it is killed there. The next run reuses the
    training, does not register again, and the gate decides on that version."""
    c = mlflow_client(project)
    drops = (REPO / "data/drops/drop-0002.jsonl").read_text().splitlines(keepends=True)
    (project / "data/incoming/more.jsonl").write_text("".join(drops[:150]))
    lock = f"{MODEL}--promotion-lock"
    c.create_registered_model(lock, tags={"ftpipe.holder": "the test", "ftpipe.since": f"{time.time():.3f}"})
    try:
        proc = _start(project, prefect_server, "train.max_steps=60")
        _wait(lambda: len(_versions(c)) == 2, proc, "version 2 registered")
        time.sleep(2)                                                        # now waiting on the lock
        _kill(proc)
    finally:
        c.delete_registered_model(lock)
    v2 = c.get_model_version(MODEL, "2")
    assert "ftpipe.decision" not in v2.tags and "champion" not in v2.aliases   # undecided, no alias moved
    assert v2.tags["ftpipe.candidate"].startswith("train-")                      # registered whole
    assert str(c.get_model_version_by_alias(MODEL, "champion").version) == "1"

    out = ok(run_cli(["run", "train.max_steps=60"], project, prefect_server))
    assert "Cached" in out
    assert "registered by a run that stopped before the gate; the gate decides on it now" in out
    assert [str(v.version) for v in _versions(c)] == ["1", "2"]                   # not registered twice
    assert c.get_model_version(MODEL, "2").tags["ftpipe.decision"] in ("promote", "refuse")


def test_two_retrains_at_once_both_finish_and_the_registry_stays_whole(project, prefect_server):
    c = mlflow_client(project)
    before = len(_versions(c))
    a = _start(project, prefect_server, "train.max_steps=30")
    b = _start(project, prefect_server, "train.max_steps=31")
    out_a, out_b = a.communicate(timeout=900)[0], b.communicate(timeout=900)[0]
    assert a.returncode == 0, out_a[-3000:]
    assert b.returncode == 0, out_b[-3000:]
    assert "another retrain is running in this project" in out_a + out_b    # one waited for the other
    vs = _versions(c)
    assert len(vs) == before + 2
    for v in vs[before:]:                                                     # each whole and decided
        assert v.tags["ftpipe.decision"] in ("promote", "refuse") and v.tags["ftpipe.candidate"]
        assert ok(run_cli(["lineage", f"models:/{MODEL}/{v.version}"], project, prefect_server))
    champions = [str(v.version) for v in vs if "champion" in c.get_model_version(MODEL, str(v.version)).aliases]
    assert champions == [str(c.get_model_version_by_alias(MODEL, "champion").version)]
