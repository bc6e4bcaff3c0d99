"""Sweep throughput on this machine: trials per hour on the embedded default (its params.yaml,
model and data), with one worker, then with two worker processes on one study (`ftpipe sweep`
plus `ftpipe sweep --join`, each given half the cores), pruning off so every trial trains to
the end.

    .venv/bin/python benchmarks/sweep_throughput.py                  # ~15 min on 2 cores
    .venv/bin/python benchmarks/sweep_throughput.py --steps 100 --trials 2   # a smoke run

Each trial is the default recipe cut to --steps optimizer steps (the default's 1,200 take
~4 min a trial here; the per-trial overhead is reported apart). Data stages, GX and the base
model run once, before the clock starts. Prints one JSON document (figures: benchmarks/RESULTS.md).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
BIN = Path(sys.executable).parent


def sweep_args(name: str, trials: int, steps: int, seed: int) -> list[str]:
    """Each measurement its own seed: the same recipes would reuse the other's finished trainings."""
    return [f"sweep.study={name}", f"sweep.trials={trials}", "sweep.pruner.enabled=false", "sweep.sampler=random",
            f"sweep.seed={seed}", f"train.max_steps={steps}", "train.checkpoint_every=0"]


def trial_times(study: str, project: Path) -> list[dict]:
    import optuna

    s = optuna.load_study(study_name=study, storage=f"sqlite:///{project / 'optuna' / 'optuna.db'}")
    return [{"trial": t.number, "state": t.state.name, "seconds": (t.datetime_complete - t.datetime_start).total_seconds(),
             "start": t.datetime_start.timestamp(), "end": t.datetime_complete.timestamp(),
             "worker": t.user_attrs.get("worker")} for t in s.trials if t.datetime_complete]


def figures(trials: list[dict], wall: float, n: int) -> dict:
    """Throughput over the trials' own span (first start to last end: the study's work, not the
    data check and the winner's evaluation around it), and end to end."""
    span = max(t["end"] for t in trials) - min(t["start"] for t in trials)
    return {"trials_per_hour": round(3600 * n / span, 1), "span_seconds": round(span, 1),
            "end_to_end_seconds": round(wall, 1), "trials_per_hour_end_to_end": round(3600 * n / wall, 1),
            "trial_seconds": [round(t["seconds"], 1) for t in trials]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=4)
    ap.add_argument("--steps", type=int, default=300)
    args = ap.parse_args()
    from tests.helpers import make_project

    os.environ.pop("FTPIPE_TEST_DVC_CACHE", None)
    project = make_project(Path(tempfile.mkdtemp(prefix="sweep-bench-")) / "proj", tiny=False)
    env = os.environ | {"COLUMNS": "200"}
    t0 = time.perf_counter()   # data stages, GX, the base model: once (a 1-step run, then its registry is dropped)
    done = subprocess.run([str(BIN / "ftpipe"), "run", "train.max_steps=1", "--project", str(project)], cwd=project,
                          env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    setup_s = time.perf_counter() - t0
    cores = os.cpu_count() or 1
    out: dict = {"device": f"CPU, {cores} cores", "steps_per_trial": args.steps, "trials": args.trials,
                 "setup_seconds": round(setup_s, 1)}

    # one worker: all the cores
    t0 = time.perf_counter()
    one = subprocess.run([str(BIN / "ftpipe"), "sweep", *sweep_args("one", args.trials, args.steps, 1),
                          "--project", str(project)], cwd=project, env=env, capture_output=True, text=True)
    assert one.returncode == 0, one.stdout[-3000:] + one.stderr[-3000:]
    wall = time.perf_counter() - t0
    trials = trial_times("one", project)
    out["one_worker"] = figures(trials, wall, args.trials)

    # two workers, half the cores each, on one study: the coordinator and a joined worker
    half = env | {"OMP_NUM_THREADS": str(max(1, cores // 2))}
    t0 = time.perf_counter()
    first = subprocess.Popen([str(BIN / "ftpipe"), "sweep", *sweep_args("two", args.trials, args.steps, 2),
                              "--project", str(project)], cwd=project, env=half, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    import optuna

    while "two" not in optuna.study.get_all_study_names(f"sqlite:///{project / 'optuna' / 'optuna.db'}"):
        assert first.poll() is None, first.stdout.read()[-3000:]
        time.sleep(0.5)
    second = subprocess.run([str(BIN / "ftpipe"), "sweep", "--join", "--study", "two",
                             *sweep_args("two", args.trials, args.steps, 2), "--project", str(project)],
                            cwd=project, env=half, capture_output=True, text=True)
    text, _ = first.communicate()
    assert first.returncode == 0 and second.returncode == 0, text[-3000:] + second.stdout[-3000:]
    wall = time.perf_counter() - t0
    trials = trial_times("two", project)
    mine = len(re.findall(r"trial \d+: complete val_loss", text))   # (each trial is a process of its own)
    out["two_workers"] = figures(trials, wall, args.trials) | {"trials_per_worker": [mine, args.trials - mine]}
    out["speedup_two_vs_one"] = round(out["two_workers"]["trials_per_hour"] / out["one_worker"]["trials_per_hour"], 2)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
