"""Registry under load: MLflow on PostgreSQL with 1,000 model versions (each with the tags a
real ftpipe version carries) and 100,000 metric points; times `ftpipe models` and the
registry work of a promotion check.

    .venv/bin/python benchmarks/registry_load.py            # PostgreSQL on 127.0.0.1:5432
    .venv/bin/python benchmarks/registry_load.py --versions 1000 --points 100000 --repeat 5

Populating takes a few minutes; the database (ftpipe_load_<pid>) is dropped at the end
unless --keep. Prints one JSON document (the figures go to benchmarks/RESULTS.md).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from ftpipe.registry.lock import PromotionLock

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
PG = "postgresql://postgres@127.0.0.1:5432"
NAME = "ftpipe-dates"


def sql(statement: str) -> None:
    import psycopg

    with psycopg.connect(f"{PG}/postgres", autocommit=True) as con:
        con.execute(statement)


# Ten test sets (ten data versions over the registry's life): (sha256, bytes). The gate
# evaluates on every earlier one; their files sit in the gate's local cache, as after the
# first promotion that downloaded them.
TEST_SETS = [(hashlib.sha256(b).hexdigest(), b) for b in
             (json.dumps({"instruction": f"Convert 20{i:02d}-01-01 to words.", "output": "x"}).encode() + b"\n"
              for i in range(10))]
REGRESSION_CACHE = Path(tempfile.gettempdir()) / "ftpipe-load-regression"


def populate(uri: str, n_versions: int, n_points: int, n_runs: int) -> dict:
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    c = MlflowClient(tracking_uri=uri, registry_uri=uri)
    exp = c.create_experiment("ftpipe", artifact_location=Path(tempfile.mkdtemp()).as_uri())
    c.create_registered_model(NAME)
    t0 = time.perf_counter()
    runs = [c.create_run(exp, run_name=f"retrain-{i}").info.run_id for i in range(n_runs)]
    per_run = n_points // n_runs
    now = int(time.time() * 1000)
    for i, run in enumerate(runs):   # a loss curve per run: train_loss / val_loss / learning_rate
        pts = [Metric(("train_loss", "val_loss", "learning_rate")[k % 3], 3.0 / (1 + k), now + k, k)
               for k in range(per_run)]
        for j in range(0, len(pts), 1000):
            c.log_batch(run, metrics=pts[j:j + 1000])
    t_metrics = time.perf_counter() - t0
    t0 = time.perf_counter()
    for v in range(1, n_versions + 1):
        run = runs[v % n_runs]
        sha = TEST_SETS[(v - 1) * len(TEST_SETS) // n_versions][0]   # a new data version every 100 versions
        tags = {  # what tasks/registry.register_candidate and the gate put on a version
            "ftpipe.git_commit": f"{v:040x}", "ftpipe.git_dirty": "false", "ftpipe.config_hash": f"{v:064x}",
            "ftpipe.base_model": "models/base", "ftpipe.base_model_revision": "b" * 32,
            "ftpipe.gx_verdict": "passed (raw_snapshot 9 + cleaned 8 expectations)",
            "ftpipe.prefect_flow_run": f"{v:032x}", "ftpipe.start_from": "scratch",
            "ftpipe.dvc.collect:data/collected": f"{v:032x}.dir", "ftpipe.dvc.clean:data/cleaned": f"{v:032x}.dir",
            "ftpipe.dvc.split:data/splits": f"{v:032x}.dir",
            "ftpipe.source.data/sources/dates.jsonl": f"sha256:{'c' * 64} rows:3000",
            "ftpipe.method": "lora", "ftpipe.run_id": run, "ftpipe.test_set": sha,
            "ftpipe.candidate": f"train-{v:012x}", "ftpipe.metric.exact_match": "0.9",
            "ftpipe.metric.eval_loss": "0.5", "ftpipe.metric.token_f1": "0.95",
            "ftpipe.decision": "refuse", "ftpipe.decision.summary": "refuse: does not beat the champion",
            "ftpipe.decision.reasons": json.dumps([{"rule": r, "passed": True, "detail": "x" * 80}
                                                   for r in ("beats_champion", "forgetting", "thresholds")]),
            "ftpipe.champion_compared": str(max(1, v - 1))}
        c.create_model_version(NAME, f"{c.get_experiment(exp).artifact_location}/{run}/artifacts/model", run_id=run,
                               tags=tags)
    c.set_registered_model_alias(NAME, "champion", str(n_versions // 2))
    shutil.rmtree(REGRESSION_CACHE, ignore_errors=True)   # no index from an earlier run
    REGRESSION_CACHE.mkdir(parents=True, exist_ok=True)
    for sha, data in TEST_SETS:
        (REGRESSION_CACHE / f"{sha}.jsonl").write_bytes(data)
    # what PostgreSQL's autovacuum does on its own after bulk inserts; without fresh planner
    # statistics a bulk-loaded registry is timed in a state no long-lived database is in
    import psycopg

    with psycopg.connect(uri, autocommit=True) as con:
        con.execute("ANALYZE")
    return {"seconds_metrics": round(t_metrics, 1), "seconds_versions": round(time.perf_counter() - t0, 1)}


def time_cli(uri: str, project: Path, repeat: int) -> dict:
    env = os.environ | {"MLFLOW_TRACKING_URI": uri, "COLUMNS": "200"}
    ftpipe = str(Path(sys.executable).parent / "ftpipe")
    walls = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = subprocess.run([ftpipe, "models", "--project", str(project)], env=env, capture_output=True, text=True)
        walls.append(time.perf_counter() - t0)
        assert out.returncode == 0, out.stderr[-2000:]
    t0 = time.perf_counter()
    subprocess.run([ftpipe, "--help"], env=env, capture_output=True, text=True, check=True)
    help_s = time.perf_counter() - t0
    return {"models_cli_wall_s": round(statistics.median(walls), 3), "cli_startup_wall_s": round(help_s, 3),
            "models_line": out.stdout.splitlines()[0] if out.stdout else ""}


def time_in_process(uri: str, repeat: int) -> dict:
    os.environ["MLFLOW_TRACKING_URI"] = uri
    from ftpipe.registry import store as registry
    from ftpipe.config import load_config
    from ftpipe.registry.manual import list_models
    from ftpipe.evaluation.compare import regression_sets
    from ftpipe.registry.promotion import decide

    reg = load_config(REPO / "params.yaml").registry
    registry.setup(reg, REPO)

    def models():   # what `ftpipe models` does (its default --limit 50)
        return list_models(reg, 50)

    def promotion_check():
        """The registry work of a retrain's promotion path, in order: is this candidate already
        registered (scan), was this data+config already tried (scan), the regression sets (scan),
        the champion and its scores, the decision, the promotion lock, the tags and the alias."""
        assert not registry.versions_tagged(NAME, {"ftpipe.candidate": "train-new"})        # registered_candidate
        assert not registry.versions_tagged(NAME, {"ftpipe.dvc.split:data/splits": "new.dir",  # last_tried
                                                   "ftpipe.config_hash": "new"})
        sets = regression_sets(NAME, TEST_SETS[-1][0], REGRESSION_CACHE, log=lambda m: None)
        assert len(sets) == len(TEST_SETS) - 1, sets.keys()
        champ = registry.version_by_alias(NAME, registry.CHAMPION)
        tags = registry.client().get_model_version(NAME, champ.version).tags
        m = {"exact_match": float(tags["ftpipe.metric.exact_match"]), "eval_loss": 0.5}
        d = decide({"exact_match": 0.95, "eval_loss": 0.4}, m, {"exact_match": 0.0, "eval_loss": 3.0},
                   reg.promotion, {"data_gate": True}, {})
        with PromotionLock(NAME, holder="benchmark"):
            registry.tag_version(NAME, champ.version, {"ftpipe.benchmark": d.verdict})
            registry.client().set_registered_model_alias(NAME, registry.CHALLENGER, champ.version)
        return d

    out = {}
    for label, fn in (("models_in_process_s", models), ("promotion_check_s", promotion_check)):
        t0 = time.perf_counter()
        fn()   # the first call: imports, connection pool, and the gate's test-set index built
        out[label.replace("_s", "_first_s")] = round(time.perf_counter() - t0, 3)
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        out[label] = round(statistics.median(times), 3)
        out[label.replace("_s", "_max_s")] = round(max(times), 3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--versions", type=int, default=1000)
    ap.add_argument("--points", type=int, default=100_000)
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    db = f"ftpipe_load_{os.getpid()}"
    sql(f"CREATE DATABASE {db}")
    uri = f"postgresql://postgres@127.0.0.1:5432/{db}"
    try:
        result = {"date": time.strftime("%Y-%m-%d"), "store": "PostgreSQL 15 (MLflow SQLAlchemy store)",
                  "versions": args.versions, "metric_points": args.points}
        result |= populate(uri, args.versions, args.points, args.runs)
        with tempfile.TemporaryDirectory() as tmp:
            project = Path(tmp)
            (project / "params.yaml").write_text((REPO / "params.yaml").read_text())
            result |= time_cli(uri, project, args.repeat)
            # the recommended setup: a tracking server on that database (mlflow/launch.py)
            port = 5123
            server = subprocess.Popen([sys.executable, str(REPO / "mlflow/launch.py"), "--backend", uri,
                                       "--artifacts", str(project / "artifacts"), "--port", str(port)],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
            try:
                import urllib.request

                for _ in range(240):
                    try:
                        urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                        break
                    except OSError:
                        time.sleep(0.5)
                via = time_cli(f"http://127.0.0.1:{port}", project, args.repeat)
                result |= {"models_cli_via_server_wall_s": via["models_cli_wall_s"],
                           "models_via_server_line": via["models_line"]}
            finally:
                os.killpg(server.pid, 15)
                server.wait(30)
        result |= time_in_process(uri, args.repeat)
        print(json.dumps(result, indent=2))
    finally:
        if not args.keep:
            sql(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")


if __name__ == "__main__":
    main()
