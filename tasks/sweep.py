"""Prefect tasks of a sweep: open its study, run one trial (a process of its own; its MLflow
child run), and publish the leaderboard and plots on the sweep's run."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from ftpipe import names as t
from ftpipe.config import PipelineConfig
from ftpipe.sweeps.study import SweepRef
from ftpipe.training.plan import TrainingPlan
from tasks.io import io_task


@io_task("open-study")
def open_sweep(cfg: PipelineConfig, plan: TrainingPlan, run_id: str, root: str) -> SweepRef:
    """The study of this sweep (created, or continued when the same sweep runs again) and the
    trial spec its workers share: the plan's start weights, training and validation files."""
    from ftpipe.registry.store import client
    from ftpipe.sweeps import study

    model = cfg.model.model_copy(update={"base": plan.base_path})
    template = {"model": model.model_dump(mode="json"), "lora": cfg.lora.model_dump(mode="json"),
                "train": plan.train.model_dump(mode="json"), "train_path": plan.splits["train"],
                "val_path": plan.splits["validation"], "data_key": plan.data_key,
                "eval": cfg.eval.model_dump(mode="json"), "max_seq_len": cfg.train.max_seq_len,
                "start_adapter": plan.start_adapter, "base_source": plan.base_source,
                "base_revision": plan.base_revision,
                "champion": None if plan.increment.start_from != "champion" else {
                    "name": cfg.registry.model_name, "version": plan.increment.champion_version,
                    "start": "adapter" if plan.start_adapter else "merged" if Path(plan.base_path).name == "merged"
                    else "full"}}
    name = cfg.sweep.study or study.default_name(cfg.registry.model_name, cfg.sweep, [
        template["model"], template["lora"], template["train"], plan.data_key, plan.start_adapter])
    ref = study.prepare(cfg.sweep, name, Path(root), run_id, template)
    url = study.storage_url(cfg.sweep, Path(root))
    c = client()
    c.set_tag(run_id, t.SWEEP_STUDY, name)
    c.set_tag(run_id, "ftpipe.sweep.storage", study.display(cfg.sweep, Path(root)))
    logger = get_run_logger()
    logger.info(f"study {name} ({study.display(cfg.sweep, Path(root))}): "
                f"{ref.budget} trials, {cfg.sweep.sampler} sampler, objective {cfg.sweep.objective}")
    if ref.previous_run and ref.previous_run != run_id:    # the same sweep again (after a kill, or more trials)
        c.set_tag(run_id, t.SWEEP_RESUMES, ref.previous_run)
        if c.get_run(ref.previous_run).info.status == "RUNNING":   # its process was killed
            c.set_terminated(ref.previous_run, status="KILLED")
        done, _ = study.counts(study.open_study(url, name, cfg.sweep, cfg.sweep.params(), create=False))
        logger.info(f"continuing study {name}: {done} of {cfg.sweep.trials} trials finished before "
                    f"(sweep run {ref.previous_run})")
    if ref.resumed:
        logger.warning(f"trials {', '.join(map(str, ref.resumed))} were running when their worker died: failed, "
                       "and each enqueued once more with the same parameters (it resumes from its checkpoints)")
    return ref


@task(name="trial", cache_policy=NO_CACHE, task_run_name="trial-{seq}")
def run_trial(ref: SweepRef, seq: int, env: dict[str, str]) -> dict:
    """One trial in its own process (forked warm: ftpipe.sweeps.starter); its outcome, logged as a
    child run of the sweep's run. A trial that fails is a failed trial, not a failed task."""
    logger = get_run_logger()
    import uuid

    from ftpipe.sweeps import starter

    spec = json.loads(Path(ref.spec).read_text())
    spec_path = Path(ref.spec).with_name(f"worker-{seq}-{uuid.uuid4().hex[:8]}.json")
    spec["result"] = str(spec_path.with_suffix(".result.json"))
    spec_path.write_text(json.dumps(spec, indent=2))

    def on_line(line: str) -> None:
        if line.strip() and not line.startswith("@@trial "):
            logger.info(line.rstrip())
    code = starter.run(spec_path, ref.root, dict(os.environ) | env, on_line)
    result = Path(spec["result"])
    if not result.is_file():
        logger.warning(f"the trial process exited with {code} before it recorded an outcome")
        return {"state": "crashed", "message": f"the trial process exited with {code}"}
    outcome = json.loads(result.read_text())
    if outcome.get("number") is not None and not outcome.get("over_budget") and ref.parent_run:
        try:
            from ftpipe.registry.runs import log_trial

            log_trial(ref.parent_run, outcome, ref.name)
        except Exception as exc:   # noqa: BLE001 - the trial is in the study; its MLflow copy is not vital
            logger.warning(f"trial {outcome['number']}'s MLflow run was not logged ({type(exc).__name__}: {exc})")
    if outcome.get("number") is not None:
        value = f"{outcome['objective']} {outcome['value']:.4f}" if outcome.get("value") is not None else ""
        logger.info(f"trial {outcome['number']}: {outcome['state']} {value} {outcome.get('message', '')}".rstrip())
    return {k: v for k, v in outcome.items() if k != "history"}


@dataclass(frozen=True)
class Board:
    """A sweep's outcome: the best complete trial, and how every trial ended."""
    study: str
    best: dict | None             # {"trial", "value", "params", ...} of the best complete trial
    counts: dict[str, int]        # state -> trials
    objective: str
    lineage: str                  # "study NAME trial N (OBJECTIVE=VALUE) in STORAGE"
    report: str                   # the HTML report's path
    first_failure: str = ""       # the message of the first failed trial


@io_task("publish-sweep")
def publish_sweep(ref: SweepRef, cfg: PipelineConfig, run_id: str) -> Board:
    """The leaderboard (CSV, HTML) and Optuna's plots on the sweep's run; the best trial."""
    from ftpipe.registry import store
    from ftpipe.sweeps import report, study

    url = study.storage_url(cfg.sweep, Path(ref.root))
    s = study.open_study(url, ref.name, cfg.sweep, cfg.sweep.params(), create=False)
    rows = study.leaderboard(s)
    where = study.display(cfg.sweep, Path(ref.root))
    best = next((r for r in rows if r["state"] == "complete"), None)
    out = Path(ref.root) / "runs" / "sweeps" / ref.name / "report"
    out.mkdir(parents=True, exist_ok=True)
    drawn = report.plots(s, out)
    files = [report.write_csv(rows, out / "leaderboard.csv"),
             report.write_html(ref.name, where, cfg.sweep.objective, rows, drawn, best, out / "sweep.html")]
    files += [p for p in drawn.values() if isinstance(p, Path)]
    store.log_files(run_id, files, "sweep")
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["state"]] = counts.get(r["state"], 0) + 1
    c = store.client()
    for state, n in counts.items():
        c.log_metric(run_id, f"sweep_trials_{state}", n)
    lineage = ""
    if best:
        c.log_metric(run_id, f"sweep_best_{cfg.sweep.objective}", best["value"])
        c.set_tag(run_id, "ftpipe.sweep.best_trial", str(best["trial"]))
        lineage = f"study {ref.name} trial {best['trial']} ({cfg.sweep.objective}={best['value']:.6g}) in {where}"
    get_run_logger().info(f"study {ref.name}: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
                          + (f"; best trial {best['trial']}: {cfg.sweep.objective} {best['value']:.4f} "
                             f"{best['params']}" if best else "; no trial completed"))
    fails = sorted((r for r in rows if r["state"] == "fail" and r.get("message")), key=lambda r: r["trial"])
    return Board(ref.name, best, counts, cfg.sweep.objective, lineage, str(out / "sweep.html"),
                 fails[0]["message"] if fails else "")


@io_task("log-winner-config")
def log_winner_config(run_id: str, cfg: PipelineConfig) -> None:
    """The run's config/params.yaml becomes the winner's (what the registered version trained
    with, which the lineage audit re-hashes); the sweep's own stays as config/sweep_params.yaml."""
    import yaml

    from ftpipe.registry.store import client

    c = client()
    if not any(a.path == "config/sweep_params.yaml" for a in c.list_artifacts(run_id, "config")):   # a retry
        first = c.download_artifacts(run_id, "config/params.yaml")
        c.log_text(run_id, Path(first).read_text(), "config/sweep_params.yaml")
    c.log_text(run_id, yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), "config/params.yaml")
