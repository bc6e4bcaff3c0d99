"""The registry and its gates against a real `mlflow server` with a PostgreSQL backend
store (started by mlflow/launch.py): promote, refuse below a threshold, refuse for
forgetting, a manual override with its reason, rollback, two flows racing to promote, and
`mlflow models serve` answering an HTTP request with the champion."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from ftpipe.registry import gate as gate

from ftpipe.registry import store as registry
from ftpipe.config import EvalConfig, LoraConfig, ModelConfig, PromotionConfig, RegistryConfig, TrainConfig
from ftpipe.training.recipe import fine_tune
from tests.helpers import PG, needs_postgres, build_tiny_base, BIN, REPO, free_port, wait_http
from ftpipe.evaluation.compare import evaluate_all, log_evaluation
from ftpipe.names import TEST_SET as TEST_SET_TAG
from ftpipe.registry.lock import LOCK_SUFFIX

pytestmark = [pytest.mark.integration, needs_postgres]

NAME = "gate-test"
EVAL = EvalConfig(batch_size=32, max_new_tokens=8, regression_max_examples=40)


def _policy(**kw) -> PromotionConfig:
    # eval_loss moves smoothly on a tiny model; generation checks are unit-tested elsewhere
    return PromotionConfig(**({"primary_metric": "eval_loss", "min_improvement": 0.0, "thresholds": {},
                               "max_forgetting": 0.05, "required_checks": ["data_gate", "finite_metrics"]} | kw))


def _reg(tracking: str, **kw) -> RegistryConfig:
    return RegistryConfig(tracking_uri=tracking, experiment="gates", model_name=NAME, promotion=_policy(**kw))


def _stop(proc: subprocess.Popen) -> None:
    """Stop a server started in its own session, with its workers."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def _sql(statement: str) -> None:
    import psycopg

    with psycopg.connect(f"{PG}/postgres", autocommit=True) as con:
        con.execute(statement)


@pytest.fixture(scope="module", autouse=True)
def _restore_tracking_uri():
    """registry.setup / mlflow.set_tracking_uri export MLFLOW_TRACKING_URI: undo it for the
    tests that come after this module."""
    import mlflow

    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    mlflow.set_registry_uri(saved["MLFLOW_REGISTRY_URI"])   # None: follow the tracking URI again
    mlflow.set_tracking_uri(saved["MLFLOW_TRACKING_URI"] or "")
    if saved["MLFLOW_TRACKING_URI"] is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`mlflow server` on a fresh PostgreSQL database, through the project's launcher."""
    d = tmp_path_factory.mktemp("mlflow-pg")
    db = f"ftpipe_test_{uuid.uuid4().hex[:10]}"
    _sql(f"CREATE DATABASE {db}")
    port = free_port()
    log = open(d / "server.log", "w")
    proc = subprocess.Popen([sys.executable, str(REPO / "mlflow/launch.py"), "--backend", f"{PG}/{db}",
                             "--artifacts", str(d / "artifacts"), "--port", str(port), "--workers", "2"],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", 180, proc)
        yield {"uri": f"http://127.0.0.1:{port}", "dir": d}
    finally:
        _stop(proc)
        log.close()
        _sql(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny base; task A (dates to words) and task B (the same prompts, answers reversed)."""
    d = tmp_path_factory.mktemp("gate-models")
    build_tiny_base(d / "base")
    rows = [json.loads(x) for x in (REPO / "data/sources/dates.jsonl").read_text().splitlines()[:240]]
    a = rows[:200]
    b = [r | {"output": r["output"][::-1]} for r in rows[:200]]
    for name, data in (("a", a), ("b", b)):
        (d / f"train_{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data[:160]))
        (d / f"test_{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data[160:]))

    def train(label, data, steps, seed=0):
        res = fine_tune(ModelConfig(base=str(d / "base")), LoraConfig(r=8, alpha=16),
                        TrainConfig(max_steps=steps, batch_size=16, lr=1e-2, warmup_steps=2, log_every=10,
                                    checkpoint_every=0, seed=seed),
                        d / f"train_{data}.jsonl", None, d / label, log=lambda m: None)
        return res.model_dir

    return {"dir": d, "base": str(d / "base"), "a1": train("a1", "a", 20), "a2": train("a2", "a", 60),
            "a3": train("a3", "a", 60, seed=1), "a4": train("a4", "a", 90, seed=2), "b": train("b", "b", 60)}


def _run(server, models, candidate: str, test: str, reg: RegistryConfig):
    """What the retrain flow does after training: evaluate, log, register, gate."""
    registry.setup(reg, server["dir"])
    c = registry.client()
    run_id = c.create_run(c.get_experiment_by_name(reg.experiment).experiment_id).info.run_id
    cache = server["dir"] / "regression"
    report = evaluate_all(EVAL, ModelConfig(base=models["base"]), reg, models["base"], models[candidate],
                               str(models["dir"] / f"test_{test}.jsonl"), 128, cache, log=lambda m: None)
    log_evaluation(run_id, report, server["dir"] / f"eval-{run_id}")
    v = registry.log_model(run_id, models[candidate], reg.model_name)
    registry.tag_version(reg.model_name, v.version, {TEST_SET_TAG: report.test_sha} | {
        f"ftpipe.metric.{k}": f"{x:.6g}" for k, x in report.candidate.metrics().items() if "." not in k})
    result = gate.gate_and_promote(reg, EVAL, run_id, v.version, report, {"data_gate": True}, 128, cache,
                                   log=lambda m: None)
    c.set_terminated(run_id)
    return result


def _rules(result):
    return {r.rule: r for r in result.decision.reasons}


def _cli(args, server, project):
    return subprocess.run([str(BIN / "ftpipe"), *args, "--project", str(project)], capture_output=True, text=True,
                          env=os.environ | {"MLFLOW_TRACKING_URI": server["uri"], "COLUMNS": "220"}, timeout=120)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A project folder whose params.yaml names the test model (for the CLI commands)."""
    import yaml

    p = tmp_path_factory.mktemp("gate-project")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["registry"] |= {"model_name": NAME, "experiment": "gates"}
    (p / "params.yaml").write_text(yaml.safe_dump(params))
    (p / "dvc.yaml").write_text((REPO / "dvc.yaml").read_text())
    return p


def test_gate_scenarios_on_a_postgres_backed_server(server, models, project):
    reg = _reg(server["uri"])
    # 1. the first model is promoted
    first = _run(server, models, "a1", "a", reg)
    assert first.decision.promote and first.champion_after == first.version
    assert "champion" in first.aliases and "challenger" in first.aliases
    assert _rules(first)["beats_champion"].detail == "no champion yet: first model"

    # 2. refused below an absolute threshold, with the threshold named; the alias stays
    strict = _reg(server["uri"], thresholds={"eval_loss": 0.01})
    refused = _run(server, models, "a2", "a", strict)
    assert not refused.decision.promote and refused.champion_after == first.version
    r = _rules(refused)["threshold:eval_loss"]
    assert not r.passed and "<= 0.01 fails" in r.detail
    assert _rules(refused)["beats_champion"].passed              # only the threshold refused it
    mv = registry.client().get_model_version(NAME, refused.version)
    assert mv.tags["ftpipe.decision"] == "refuse" and "<= 0.01 fails" in mv.description
    assert "champion" not in mv.aliases

    # 3. refused for forgetting: better on the new data (task B), worse on task A's test set
    forgot = _run(server, models, "b", "b", reg)
    assert _rules(forgot)["beats_champion"].passed                # it does beat the champion on B
    f = _rules(forgot)["forgetting"]
    assert not forgot.decision.promote and not f.passed
    assert f"on v{first.version}:" in f.detail and "> allowed 0.05" in f.detail
    assert forgot.champion_after == first.version
    assert float(registry.client().get_model_version(NAME, forgot.version).tags["ftpipe.forgetting"]) > 0.05

    # 4. a manual override, with its reason recorded
    out = _cli(["promote", forgot.version, "--reason", "B traffic only from today (ticket OPS-12)"], server, project)
    assert out.returncode == 0, out.stderr
    assert f"v{forgot.version} is champion (was v{first.version})" in out.stdout
    mv = registry.client().get_model_version(NAME, forgot.version)
    assert mv.tags["ftpipe.decision"] == "manual-promote" and mv.tags["ftpipe.gate_decision"] == "refuse"
    assert mv.tags["ftpipe.manual.reason"] == "B traffic only from today (ticket OPS-12)"
    assert "Manual promotion" in mv.description and "champion" in mv.aliases
    no_reason = _cli(["promote", first.version, "--reason", " "], server, project)
    assert no_reason.returncode != 0 and "needs --reason" in no_reason.stderr
    unknown = _cli(["promote", "999", "--reason", "x"], server, project)
    assert unknown.returncode != 0 and "has no version 999" in unknown.stderr

    # 5. rollback: back to the champion before, recorded
    out = _cli(["rollback", "--reason", "B launch postponed"], server, project)
    assert out.returncode == 0, out.stderr
    assert f"rolled back from v{forgot.version} to v{first.version}" in out.stdout
    assert registry.version_by_alias(NAME, "champion").version == first.version
    history = registry.champion_history(NAME)
    assert [(e["kind"], e["version"]) for e in history] == [
        ("gate", first.version), ("manual", forgot.version), ("rollback", first.version)]
    again = _cli(["rollback"], server, project)
    assert again.returncode != 0 and "no earlier champion" in again.stderr

    # 6. the table of versions
    out = _cli(["models", "--json"], server, project)
    assert out.returncode == 0, out.stderr
    table = {v["version"]: v for v in json.loads(out.stdout)["versions"]}
    assert table[first.version]["decision"] == "promote" and "champion" in table[first.version]["aliases"]
    assert table[refused.version]["decision"] == "refuse" and "<= 0.01 fails" in table[refused.version]["summary"]
    assert table[forgot.version]["summary"].startswith("manual: B traffic")
    out = _cli(["models"], server, project)
    assert out.returncode == 0 and "forgetting" in out.stdout and NAME in out.stdout

    # 7. the decision is an artifact of the run, and the test set is the next runs' regression set
    run = registry.client().get_model_version(NAME, refused.version).run_id
    local = registry.client().download_artifacts(run, "promotion/decision.json", str(server["dir"]))
    decision = json.loads(Path(local).read_text())
    assert decision["verdict"] == "refuse" and decision["champion_compared"] == first.version
    assert any(r["rule"] == "threshold:eval_loss" and not r["passed"] for r in decision["reasons"])


def test_two_flows_promoting_at_once_never_both_win_from_a_stale_comparison(server, models, tmp_path):
    """Both evaluate against the same champion, then race to the gate. The registry lock
    lets one through; the other finds the champion moved, scores the new champion and
    decides again."""
    reg = _reg(server["uri"], min_improvement=0.0, max_forgetting=None)
    champion = registry.version_by_alias(NAME, "champion")
    assert champion is not None
    procs, specs = [], []
    for label in ("a3", "a4"):
        spec = {"registry": reg.model_dump(mode="json"), "eval": EVAL.model_dump(mode="json"),
                "root": str(server["dir"]), "label": label, "base": models["base"], "candidate": models[label],
                "test": str(models["dir"] / "test_a.jsonl"), "ready": str(tmp_path / f"{label}.ready"),
                "go": str(tmp_path / "go"), "out": str(tmp_path / f"{label}.json")}
        (tmp_path / f"{label}.spec").write_text(json.dumps(spec))
        specs.append(spec)
        procs.append(subprocess.Popen([sys.executable, str(Path(__file__).with_name("_gate_worker.py")),
                                       str(tmp_path / f"{label}.spec")], cwd=REPO, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True,
                                      env=os.environ | {"PYTHONPATH": str(REPO)}))
    deadline = time.time() + 300
    while not all(Path(s["ready"]).exists() for s in specs):
        assert all(p.poll() is None for p in procs), [p.communicate()[0][-3000:] for p in procs]
        assert time.time() < deadline
        time.sleep(0.1)
    (tmp_path / "go").write_text("go")
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), logs
    res = [json.loads(Path(s["out"]).read_text()) for s in specs]
    # exactly one went through the gate against the old champion; the other decided again
    assert sorted(r["redecided"] for r in res) == [False, True], res
    first, second = sorted(res, key=lambda r: r["redecided"])
    assert first["compared"] == champion.version
    if first["promote"]:
        assert second["compared"] == first["version"]             # re-compared with the new champion
        assert "champion moved" in "\n".join(logs)
    best = min([r for r in res if r["promote"]] or [{"version": champion.version}],
               key=lambda r: r.get("eval_loss", 0))
    final = registry.version_by_alias(NAME, "champion").version
    assert final == (second["version"] if second["promote"] else first["version"] if first["promote"]
                     else champion.version)
    promoted = [e for e in registry.champion_history(NAME) if e["kind"] == "gate"]
    assert [e["version"] for e in promoted][-sum(r["promote"] for r in res):] == \
        [r["version"] for r in (first, second) if r["promote"]]
    assert best  # at least the champion stands
    # the lock is gone
    from mlflow.exceptions import MlflowException
    with pytest.raises(MlflowException):
        registry.client().get_registered_model(NAME + LOCK_SUFFIX)


def test_mlflow_models_serve_answers_with_the_champion(server, models):
    port = free_port()
    # as a user with the venv activated: its bin/ (uvicorn) on PATH
    env = os.environ | {"MLFLOW_TRACKING_URI": server["uri"], "PATH": f"{BIN}:{os.environ['PATH']}"}
    proc = subprocess.Popen([str(BIN / "mlflow"), "models", "serve", "-m", f"models:/{NAME}@champion",
                             "--env-manager", "local", "--host", "127.0.0.1", "-p", str(port)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        try:
            wait_http(f"http://127.0.0.1:{port}/ping", 180, proc)
        except RuntimeError:
            raise AssertionError(proc.communicate(timeout=10)[0][-4000:]) from None
        body = json.dumps({"dataframe_records": [{"instruction": "Convert 1991-03-13 to words.", "input": ""},
                                                 {"instruction": "Convert 2001-12-01 to words.", "input": ""}],
                           "params": {"max_new_tokens": 6}}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as resp:
            assert resp.status == 200
            answer = json.loads(resp.read())
        preds = answer["predictions"]
        assert len(preds) == 2 and all(isinstance(p, str) for p in preds)
        # the same answers as loading the champion in-process
        import mlflow
        import pandas as pd
        mlflow.set_tracking_uri(server["uri"])
        local = mlflow.pyfunc.load_model(f"models:/{NAME}@champion").predict(
            pd.DataFrame([{"instruction": "Convert 1991-03-13 to words.", "input": ""},
                          {"instruction": "Convert 2001-12-01 to words.", "input": ""}]),
            params={"max_new_tokens": 6})
        assert list(local) == preds
    finally:
        _stop(proc)
