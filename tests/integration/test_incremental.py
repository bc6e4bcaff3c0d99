"""Scheduled and incremental retraining (real Prefect server, MLflow, DVC): the deployment
`ftpipe schedule` serves, triggered through the Prefect API over two incoming drops and a
too-small one; the same on a Prefect server backed by PostgreSQL; prefect.yaml deployed to a
process work pool; `ftpipe run --if-new-data`."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import subprocess
import sys

import pytest
import yaml

from tests.helpers import stop, needs_postgres, ok, BIN, REPO, TINY, copy_project, free_port, mlflow_client, run_cli, start_cli, wait_http

MODEL = "ftpipe-dates"



def _always_skip(project):
    """Triggered runs below: every one skips (cheap, and the same each time)."""
    import yaml

    params = yaml.safe_load((project / "params.yaml").read_text())
    params["schedule"]["min_new_rows"] = 100000
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def _runs(project):
    c = mlflow_client(project)
    exp = c.get_experiment_by_name("ftpipe")
    if exp is None:
        return []
    return c.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"])


TRIGGER = """
import json, os, signal, sys, time
from prefect.client.orchestration import get_client
from prefect.deployments import run_deployment

with get_client(sync_client=True) as client:
    deadline = time.time() + 120
    while True:
        try:
            dep = client.read_deployment_by_name("scheduled-retrain/ftpipe-retrain")
            break
        except Exception:
            if time.time() > deadline:
                sys.exit("deployment never registered")
            time.sleep(2)
    sched = dep.schedules[0].schedule
    fr = run_deployment("scheduled-retrain/ftpipe-retrain", parameters=json.loads(sys.argv[1]), timeout=0)
    deadline = time.time() + 600
    while not (fr := client.read_flow_run(fr.id)).state.is_final() and time.time() < deadline:
        time.sleep(0.05 if len(sys.argv) > 2 else 0.5)   # to stop the scheduler: the moment it ends
if len(sys.argv) > 2:   # stop `ftpipe schedule` the moment the run reports its end
    os.kill(int(sys.argv[2]), signal.SIGTERM)
print(json.dumps({"id": str(fr.id), "state": fr.state.type.value, "message": fr.state.message,
                  "cron": sched.cron, "timezone": sched.timezone, "pool": dep.work_pool_name}))
"""

STATE = """
import sys, uuid
from prefect.client.orchestration import get_client

with get_client(sync_client=True) as client:
    print(client.read_flow_run(uuid.UUID(sys.argv[1])).state.type.value)
"""


@contextlib.contextmanager
def serving(project, prefect_env: dict):
    """`ftpipe schedule` against a Prefect server; yields trigger(stop=False, **parameters): one run
    of the deployment through the Prefect API, from a separate process (Prefect's settings are fixed
    per process), returning the flow run and the MLflow run it made. With stop=True, `ftpipe schedule`
    is stopped (SIGTERM) the moment the run reports COMPLETED, and the run must still read COMPLETED
    once it has exited: stopping the scheduler never rewrites a finished run."""
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI",
                                                             "PREFECT_API_URL", "PREFECT_HOME")}
    env |= prefect_env
    served = start_cli(["schedule"], project, env=env)

    def trigger(stop: bool = False, **parameters) -> tuple[dict, object]:
        before = len(_runs(project))
        proc = subprocess.run([sys.executable, "-c", TRIGGER, json.dumps(parameters), *([str(served.pid)] * stop)],
                              env=env, capture_output=True, text=True, timeout=700)
        assert proc.returncode == 0, proc.stderr[-3000:]
        fr = json.loads(proc.stdout.strip().splitlines()[-1])
        assert (fr["cron"], fr["timezone"]) == ("0 3 * * *", "UTC")
        assert fr["state"] == "COMPLETED", fr
        if stop:
            served.wait(120)
            state = subprocess.run([sys.executable, "-c", STATE, fr["id"]], env=env, capture_output=True,
                                   text=True, timeout=300)
            assert state.stdout.strip() == "COMPLETED", (state.stdout + state.stderr)[-3000:]
        runs = _runs(project)
        assert len(runs) == before + 1
        assert runs[0].data.tags["ftpipe.prefect_flow_run"] == fr["id"]      # the triggered run's record
        return fr, runs[0]

    try:
        yield trigger
    finally:
        stop(served)


def _skips(project, prefect_env):
    """One triggered run that skips (the cheap check of a served deployment); the scheduler is
    stopped the moment it completes. The module's project has a champion from the start (a copy
    of the session's trained project), so the run skips rather than training from scratch."""
    _always_skip(project)
    with serving(project, prefect_env) as trigger:
        fr, run = trigger(stop=True)
    assert re.fullmatch(r"skipped: \d+ new rows < 100000", run.data.tags["ftpipe.skipped"])
    return fr


@pytest.fixture(scope="module")
def project(tmp_path_factory, trained):
    """The session's trained project (v1 from scratch, the champion), copied, with incremental
    runs from the champion."""
    return copy_project(trained.project, tmp_path_factory.mktemp("incr") / "p", {
        "incremental": {"start_from": "champion", "replay_ratio": 0.5, "max_steps": 80},
        "schedule": {"min_new_rows": 20}, "registry.promotion": TINY["registry.promotion"] | {"max_forgetting": 0.2}})


def test_three_drops_through_the_served_deployment(project, prefect_server):
    """The deployment `ftpipe schedule` serves, triggered through the Prefect API over incoming
    drops after a first version (v1, from scratch, the champion): too few new rows skip; a drop
    crafted to make the model forget (the same kind of questions, wrong answers) trains from the
    champion and the gate refuses it for forgetting; with it withdrawn, the next trains from the
    champion on new rows + replay and promotes."""
    c = mlflow_client(project)
    assert str(c.get_model_version_by_alias(MODEL, "champion").version) == "1"
    assert c.get_model_version(MODEL, "1").tags["ftpipe.start_from"] == "scratch"
    drops = (REPO / "data/drops/drop-0002.jsonl").read_text().splitlines(keepends=True)
    with serving(project, prefect_server) as trigger:
        (project / "data/incoming/small.jsonl").write_text("".join(drops[:5]))
        fr, run = trigger()
        assert run.data.tags["ftpipe.skipped"] == "skipped: 5 new rows < 20"
        assert "nothing trained" in run.data.tags["mlflow.note.content"]
        assert len(c.search_model_versions(f"name = '{MODEL}'")) == 1          # nothing registered

        bad = [json.loads(x) | {"output": "banana banana banana"} for x in drops[200:400]]
        (project / "data/incoming/drop-2.jsonl").write_text("".join(json.dumps(r) + "\n" for r in bad))
        params = yaml.safe_load((project / "params.yaml").read_text())
        params["incremental"] |= {"replay_ratio": 0, "max_steps": 40}
        (project / "params-forget.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        trigger(config="params-forget.yaml")
        v2 = c.get_model_version(MODEL, "2")
        assert v2.tags["ftpipe.start_from"].startswith(f"champion models:/{MODEL}/1: ")
        assert v2.tags["ftpipe.start_from"].endswith(" + 0 replayed")
        assert str(c.get_model_version_by_alias(MODEL, "champion").version) == "1"   # refused, and why:
        assert v2.tags["ftpipe.decision"] == "refuse", v2.tags.get("ftpipe.decision.summary")
        failed = [r["rule"] for r in json.loads(v2.tags["ftpipe.decision.reasons"]) if not r["passed"]]
        assert "forgetting" in failed, v2.tags["ftpipe.decision.summary"]
        assert "on an earlier test set" in v2.description and "> allowed 0.2" in v2.description

        (project / "data/incoming/drop-2.jsonl").unlink()                      # the bad drop is withdrawn
        (project / "data/incoming/drop-3.jsonl").write_text("".join(drops[5:125]))
        fr, run = trigger()
    v3 = c.get_model_version(MODEL, "3")
    assert v3.run_id == run.info.run_id
    assert run.data.tags["ftpipe.new_rows"] == "125"                       # 5 + 120 since v1, every split
    start = v3.tags["ftpipe.start_from"]
    assert start.startswith(f"champion models:/{MODEL}/1: ")
    n_new, n_replay = (int(x.split()[0]) for x in start.split(": ", 1)[1].split(" + "))
    assert 90 <= n_new <= 125 and n_replay == n_new                        # replay_ratio 0.5
    md5 = v3.tags["ftpipe.dvc.split:data/splits"]
    rows = (project / "runs" / f"increment-{md5[:12]}-v1" / "train.jsonl").read_text().splitlines()
    assert len(rows) == n_new + n_replay
    new_files = ("data/incoming/small.jsonl", "data/incoming/drop-3.jsonl")
    assert sum(json.loads(r)["_source"].startswith(new_files) for r in rows) == n_new
    assert str(c.get_model_version_by_alias(MODEL, "champion").version) == "3", v3.description
    audit3 = json.loads(run_cli(["lineage", f"models:/{MODEL}/3", "--json"], project, prefect_server).stdout)
    assert audit3["base_model"]["start_from"] == start
    # a deletion request against v1's data reaches every version trained from v1's weights
    from ftpipe.lineage.queries import with_descendants

    found = with_descendants(c, [{"model": MODEL, "version": "1"}])
    assert {(h["version"], h.get("via")) for h in found} == {
        ("1", None), ("2", f"models:/{MODEL}/1"), ("3", f"models:/{MODEL}/1")}
    # ... and a question about one row answers from what each version trained on: v2 and v3
    # trained on new rows (+ replay for v3), not on their whole train split
    trained = {json.loads(r)["_hash"] for r in rows}
    old = [r for r in map(json.loads, (project / "data/splits/train.jsonl").read_text().splitlines())
           if r["_source"] == "data/sources/dates.jsonl"]

    def answers(row: dict) -> dict[str, str]:
        out = ok(run_cli(["lineage", "--row-hash", row["_hash"]], project, prefect_server))
        return {line.split(":")[0].split()[1]: line.split(": ", 1)[1] for line in out.splitlines()[1:]}

    from_v1 = f"trained from the weights of models:/{MODEL}/1, which trained on it"
    not_trained = "in its train split, not in the rows it trained on (incremental: new rows + replay)"
    assert answers(next(r for r in old if r["_hash"] not in trained)) == {
        "v1": "trained on it (train split)", "v2": f"{not_trained}; {from_v1}", "v3": f"{not_trained}; {from_v1}"}
    assert answers(next(r for r in old if r["_hash"] in trained))["v3"] == (
        "trained on it (in its incremental training file: new rows + replay)")             # replayed
    # what it trained on is pinned in its lineage record and re-hashed like every other link
    train_sha = hashlib.sha256("".join(r + "\n" for r in rows).encode()).hexdigest()
    assert {k: audit3["trained_on"][k] for k in ("file", "rows", "sha256")} == {
        "file": "run artifact data/increment/train.jsonl", "rows": n_new + n_replay, "sha256": train_sha}
    assert next(link for link in audit3["links"] if link["name"] == "training file")["ok"]
    # the training file altered in the artifact store: the audit names the link
    stored = next((project / "mlflow/artifacts").glob(f"**/{v3.run_id}/artifacts/data/increment/train.jsonl"))
    stored.write_text("".join(r + "\n" for r in rows[1:]))
    broken = run_cli(["lineage", f"models:/{MODEL}/3"], project, prefect_server)
    assert broken.returncode == 1 and "BROKEN training file data/increment/train.jsonl: altered since registration" \
        in broken.stderr and broken.stderr.count("BROKEN") == 1
    stored.write_text("".join(r + "\n" for r in rows))


def test_if_new_data_from_the_cli(project, prefect_server):
    """`ftpipe run --if-new-data` (what a file-arrival hook calls): nothing new skips, says why."""
    out = ok(run_cli(["run", "--if-new-data"], project, prefect_server))
    assert "skipped: 0 new rows < 20" in out and "nothing trained" in out


def test_stopping_the_scheduler_as_a_run_completes_leaves_it_completed(project, prefect_server):
    """`ftpipe schedule` stopped (SIGTERM) the moment a run it served reports COMPLETED: the run's
    record stays COMPLETED (Prefect's runner cancelled the runs it still tracked, and a finished run
    is still tracked while its process tears down: it read CANCELLED)."""
    _always_skip(project)
    with serving(project, prefect_server) as trigger:
        trigger(stop=True)


@needs_postgres
def test_the_same_on_a_prefect_server_backed_by_postgresql(project):
    import psycopg

    pg, db = "postgresql://postgres@127.0.0.1:5432", f"ftpipe_prefect_{os.getpid()}"
    with psycopg.connect(f"{pg}/postgres", autocommit=True) as con:
        con.execute(f"DROP DATABASE IF EXISTS {db}")
        con.execute(f"CREATE DATABASE {db}")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "PREFECT_HOME")}
    server = start_cli(["prefect-server", "--db", f"{pg}/{db}", "--port", str(port)], project, env=env)
    try:
        wait_http(f"http://127.0.0.1:{port}/api/health", 180, server)
        fr = _skips(project, {"PREFECT_API_URL": f"http://127.0.0.1:{port}/api"})
        with psycopg.connect(f"{pg}/{db}") as con:                         # the run is in PostgreSQL
            assert con.execute("SELECT state_type FROM flow_run WHERE id = %s", (fr["id"],)).fetchone()[0] == "COMPLETED"
    finally:
        stop(server)
        with psycopg.connect(f"{pg}/postgres", autocommit=True) as con:
            con.execute(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")


def test_prefect_yaml_deploys_to_a_process_work_pool_and_a_worker_runs_it(project, prefect_server):
    import re
    import shutil

    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    _always_skip(project)
    for rel in ("flows", "tasks", "prefect.yaml"):          # the project as the repo has it
        src = REPO / rel
        (shutil.copytree(src, project / rel, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))
         if src.is_dir() else shutil.copy2(src, project / rel))
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    env |= prefect_server
    prefect = str(BIN / "prefect")

    def sh(*args, timeout=300):
        proc = subprocess.run([prefect, *args], cwd=project, env=env, capture_output=True, text=True, timeout=timeout)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        return proc.stdout

    sh("work-pool", "create", "ftpipe-process", "--type", "process", "--overwrite")
    sh("--no-prompt", "deploy", "--all")
    os.environ.update(prefect_server)
    with get_client(sync_client=True) as client:
        dep = client.read_deployment_by_name("scheduled-retrain/ftpipe-retrain")
        assert dep.work_pool_name == "ftpipe-process"
        assert dep.schedules[0].schedule.cron == "0 3 * * *" and dep.schedules[0].schedule.timezone == "UTC"
        sweeps = client.read_deployment_by_name("sweep-trials/ftpipe-sweep-trials")   # extra sweep workers' queue
        assert (sweeps.work_pool_name, sweeps.work_queue_name) == ("ftpipe-process", "sweeps")
    fr = run_deployment("scheduled-retrain/ftpipe-retrain", timeout=0)   # queued for the pool
    sh("worker", "start", "--pool", "ftpipe-process", "--run-once", timeout=600)
    with get_client(sync_client=True) as client:
        state = client.read_flow_run(fr.id).state
    assert state.is_completed(), state
    newest = _runs(project)[0]
    assert newest.data.tags["ftpipe.prefect_flow_run"] == str(fr.id)
    assert re.fullmatch(r"skipped: \d+ new rows < 100000", newest.data.tags["ftpipe.skipped"])
