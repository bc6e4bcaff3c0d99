"""The retrain flow: collect -> validate -> clean -> split -> plan -> fine-tune -> evaluate ->
register -> promotion gate. Wiring only: each step is a task over one ftpipe function, and
the decisions (the training plan, the skip, the gate) live in ftpipe.

    ftpipe run                      # the CLI way (prints the summary)
    python -m flows.retrain         # the same flow, straight from Prefect
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from prefect import flow
from prefect.runtime import flow_run

from flows.runtime import mark_run_failed, outcome
from ftpipe.config import PipelineConfig, load_config
from ftpipe.data.versions import DataVersion, data_version
from ftpipe.evaluation.compare import EvalReport
from ftpipe.lineage.record import lineage_of
from ftpipe.registry.gate import PromotionResult
from ftpipe.runlock import project_lock
from ftpipe.training.plan import TrainingPlan
from ftpipe.training.recipe import TrainResult
from tasks.data import base_model, check_inputs, check_slices, collect, stage
from tasks.evaluation import check_suites, evaluate
from tasks.io import io_tasks
from tasks.training import train_candidate


@dataclass(frozen=True)
class SkippedRun:
    """A run that trained nothing, and why (too little new data, or these weights decided)."""
    run_id: str
    message: str
    champion: str | None
    tracking_uri: str
    experiment: str


@dataclass(frozen=True)
class RetrainResult:
    run_id: str
    tracking_uri: str
    cfg: PipelineConfig
    data: DataVersion
    plan: TrainingPlan
    candidate: TrainResult
    report: EvalReport
    promotion: PromotionResult


@flow(name="retrain", log_prints=True, on_failure=[mark_run_failed], on_crashed=[mark_run_failed])
def retrain(cfg: PipelineConfig, root: str = ".", require_new_data: bool = False) -> RetrainResult | SkippedRun:
    """require_new_data (scheduled runs, `ftpipe run --if-new-data`): with a champion and
    fewer than schedule.min_new_rows new rows, end as skipped before training."""
    return outcome(retrain_steps(cfg, str(Path(root).resolve()), require_new_data))


def retrain_steps(cfg: PipelineConfig, root: str, require_new_data: bool) -> RetrainResult | SkippedRun:
    """The steps of a retrain, one call each (both flows run them, as their own tasks)."""
    with project_lock(Path(root), log=print):                 # one retrain at a time per project
        io = io_tasks(cfg.registry)                           # retries of every I/O task, bound once
        flow_run_id = str(flow_run.get_id() or "local")
        run = io.start_run(cfg, root, flow_run_id)
        if require_new_data and cfg.serve.capture:             # scheduled: served feedback becomes a drop first
            io.export_feedback(cfg.serve, cfg.data.clean.pii, root)
        data = prepare_data(cfg, root, run, io)               # sources, base model, DVC stages, GX gates, push
        plan = io.plan_training(cfg, data, run, root, require_new_data)   # scratch / champion / skip, and why
        if plan.skip:
            return skipped(run, plan.skip, plan, cfg, root, io)
        return candidate_steps(cfg, root, run, data, plan, io, flow_run_id)


def candidate_steps(cfg: PipelineConfig, root: str, run: str, data: DataVersion, plan: TrainingPlan, io,
                    flow_run_id: str, sweep: str = "") -> RetrainResult | SkippedRun:
    """Train (or reuse) the plan's candidate, evaluate, register, gate: the same for a retrain
    and a sweep's winner (sweep: its study and trial, for the lineage)."""
    candidate = train_candidate(cfg.model, cfg.lora, plan, run, root, cfg.eval.batch_size)   # or cached
    known = io.find_registered(cfg.registry, candidate.model_dir, run)
    decided = known and known.skip(cfg.registry.model_name)   # these weights were decided already
    if decided:
        return skipped(run, decided, plan, cfg, root, io)
    io.log_training(run, candidate)
    report = evaluate(cfg.eval, cfg.model, cfg.registry, data.base.path, candidate.model_dir,
                      data.splits["test"], cfg.train.max_seq_len, run, root, plan.splits["train"])
    version = known.version if known else io.register(
        cfg.registry, run, candidate.model_dir, lineage_of(data, plan, cfg.hash(), Path(root), flow_run_id, sweep, report.suites),
        report.candidate.metrics() | {"train_loss": candidate.train_loss}, cfg.train.method, report.test_sha,
        candidate.adapter_dir, (plan.base_path, plan.base_source, plan.base_revision))
    checks = {"data_gate": data.passed, "train_loss_finite": math.isfinite(candidate.train_loss)}
    promotion = io.promote(cfg.registry, cfg.eval, run, version.version, report, checks, cfg.train.max_seq_len,
                           root)
    io.publish_reports(cfg, run, promotion, str(Path(candidate.model_dir).parent / "loss_curve.png"), root)
    io.finish_run(run)
    return RetrainResult(run, _tracking_uri(cfg, root), cfg, data, plan, candidate, promotion.report, promotion)


def prepare_data(cfg: PipelineConfig, root: str, run: str, io) -> DataVersion:
    """The data half: inputs checked in seconds, SQL sources exported (before the base model's
    minutes), the DVC stages with both GX gates, and the data version pushed to the remote."""
    check_inputs(cfg.data, cfg.model, root)
    check_suites(cfg.eval, cfg.registry, root)                # behaviour suites: a bad case fails here, not after training
    io.fetch_sql_sources(cfg.data, root)
    base = base_model(cfg.model, root)
    collected = collect(root)
    raw = io.validate_raw(cfg.quality, root, run)
    cleaned, split = stage("clean", root), stage("split", root)
    checked = io.validate_cleaned(cfg.quality, cfg.data, root, run)
    check_slices(cfg.registry.promotion, root)
    pushed = io.push_data(cfg.data, root, ["collect", "clean", "split"] + (["base_model"] if base.built is not None
                                                                          else []))
    return data_version(Path(root), collected.hashes | cleaned.hashes | split.hashes, raw, checked, base,
                        pushed.remote if pushed else None)


def skipped(run: str, message: str, plan: TrainingPlan, cfg: PipelineConfig, root: str, io):
    """A run that ends without training or registering: the reason on the run, the run finished."""
    io.record_skip(run, message, plan.increment.champion)
    io.finish_run(run)
    return SkippedRun(run, message, plan.increment.champion, _tracking_uri(cfg, root), cfg.registry.experiment)


def _tracking_uri(cfg: PipelineConfig, root: str) -> str:
    from ftpipe.registry.store import tracking_uri

    return tracking_uri(cfg.registry, Path(root))


@flow(name="scheduled-retrain", log_prints=True, on_failure=[mark_run_failed], on_crashed=[mark_run_failed])
def scheduled_retrain(root: str = ".", config: str = "params.yaml") -> dict:
    """What `ftpipe schedule` serves: the retrain flow on the project's params.yaml, skipping
    when fewer than schedule.min_new_rows rows are new since the champion's data."""
    root_path = Path(root).resolve()
    cfg_path = Path(config) if Path(config).is_absolute() else root_path / config
    res = retrain_steps(load_config(cfg_path), str(root_path), require_new_data=True)   # this run's tasks
    if isinstance(res, SkippedRun):
        return outcome(res, {"status": "skipped", "message": res.message, "run_id": res.run_id})
    p = res.promotion
    return outcome(res, {"status": "promoted" if p.decision.promote else "refused", "version": p.version,
                         "message": p.decision.summary(), "run_id": res.run_id})


if __name__ == "__main__":
    print(retrain(load_config("params.yaml")))
