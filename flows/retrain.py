"""The retrain flow: collect -> validate -> clean -> split -> fine-tune -> evaluate ->
register -> promotion gate. Wiring only; every step is a task over one ftpipe function.

    ftpipe run                      # the CLI way (prints the summary)
    python -m flows.retrain         # the same flow, straight from Prefect
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from prefect import flow
from prefect.runtime import flow_run

from ftpipe.config import PipelineConfig, load_config
from ftpipe.lineage.record import Lineage, file_pin, git_commit
from ftpipe.data.quality import QualityResult
from ftpipe.runlock import project_lock
from tasks.data import (DataVersion, check_inputs, check_slices, clean_data, clean_report_path, collect_data,
                        fetch_sql_sources, log_data_reports, prepare_base_model, push_data,
                        split_data, split_paths, validate_cleaned_data, validate_data)
from ftpipe.registry.gate import EvalReport, PromotionResult
from tasks.evaluation import evaluate_all
from tasks.incremental import champion_weights, last_tried, plan_increment, record_skip
from ftpipe.training.plan import Increment, scaled_steps, skip_reason
from tasks.registry import (finish_run, promote_candidate, publish_reports, register_candidate,
                            registered_candidate, start_run)
from tasks.io import io
from tasks.training import log_training, train_candidate


@dataclass(frozen=True)
class SkippedRun:
    """A scheduled / --if-new-data run that found too little new data: nothing trained."""
    run_id: str
    message: str
    new_rows: int
    min_new_rows: int
    champion: str | None
    tracking_uri: str
    experiment: str


@dataclass(frozen=True)
class RetrainResult:
    run_id: str
    experiment: str
    tracking_uri: str
    model_name: str
    primary_metric: str
    data: DataVersion
    data_hashes: dict[str, str]
    clean: dict
    quality: QualityResult
    cleaned_quality: QualityResult
    split_counts: dict
    pushed: str | None
    train_loss: float
    val_loss: float | None
    train_seconds: float
    report: EvalReport
    promotion: PromotionResult
    increment: Increment | None = None


def lineage_of(cfg: PipelineConfig, root: Path, base_id: str, base_revision: str,
               data: DataVersion, hashes: dict[str, str], quality: str,
               flow_run_id: str, start_from: str = "scratch", train_file: str | None = None) -> Lineage:
    commit, dirty = git_commit(root)
    return Lineage(git_commit=commit, git_dirty=dirty, config_hash=cfg.hash(),
                   base_model=base_id, base_model_revision=base_revision, data_hashes=hashes,
                   gx_verdict=quality, manifest=data.manifest, prefect_flow_run=flow_run_id,
                   start_from=start_from, train_file=file_pin(train_file) if train_file else "")


@flow(name="retrain", log_prints=True)
def retrain(cfg: PipelineConfig, root: str = ".", require_new_data: bool = False) -> RetrainResult | SkippedRun:
    """require_new_data (scheduled runs, `ftpipe run --if-new-data`): with a champion and
    fewer than schedule.min_new_rows new rows, end as skipped before training."""
    return outcome(_locked_retrain(cfg, root, require_new_data))


def _locked_retrain(cfg: PipelineConfig, root: str, require_new_data: bool) -> RetrainResult | SkippedRun:
    root = str(Path(root).resolve())
    with project_lock(Path(root), log=print):   # one retrain at a time per project
        return _retrain(cfg, root, require_new_data)


def outcome(res: RetrainResult | SkippedRun, data=None):
    """The flow run's final state: Completed, or Completed named "Skipped" for a run that
    trained nothing, with what happened as its message and as a markdown artifact, so the
    Prefect UI tells a skipped run from a promotion or a refusal at a glance."""
    from prefect.artifacts import create_markdown_artifact
    from prefect.states import Completed

    if isinstance(res, SkippedRun):
        name, message = "Skipped", f"{res.message} (champion: {res.champion or 'none'}); nothing trained"
        rows = [("outcome", "skipped: nothing trained, no alias moved"), ("why", res.message)]
    else:
        p = res.promotion
        name, message = "Completed", f"{p.decision.verdict} {res.model_name} v{p.version}: {p.decision.summary()}"
        rows = [("outcome", f"{p.decision.verdict.upper()} {res.model_name} v{p.version}"),
                ("aliases", ", ".join(p.aliases) or "—"),
                ("champion", f"v{p.champion_after or '—'} (was v{p.champion_before or '—'})")]
        rows += [(r.rule, ("passed: " if r.passed else "FAILED: ") + r.detail) for r in p.decision.reasons]
    rows.append(("MLflow run", f"{res.run_id} (experiment {res.experiment})"))
    cell = lambda text: str(text).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    create_markdown_artifact(key="retrain-outcome", description=message[:500],
                             markdown="| | |\n|---|---|\n" + "\n".join(f"| {cell(k)} | {cell(v)} |" for k, v in rows))
    return Completed(name=name, message=message[:1000], data=res if data is None else data)


def _retrain(cfg: PipelineConfig, root: str, require_new_data: bool) -> RetrainResult | SkippedRun:
    from ftpipe.registry import store as registry

    flow_run_id = str(flow_run.get_id() or "local")
    run_id = io(start_run, cfg.registry)(cfg, root, flow_run_id)

    def skip(message: str, inc: Increment) -> SkippedRun:   # recorded on the run; nothing registered
        io(record_skip, cfg.registry)(run_id, message, inc)
        io(finish_run, cfg.registry)(run_id, "FINISHED")
        return SkippedRun(run_id, message, inc.new_rows, cfg.schedule.min_new_rows, inc.champion,
                          registry.tracking_uri(cfg.registry, Path(root)), cfg.registry.experiment)
    try:
        check_inputs(cfg.data, cfg.model, root)           # seconds: every source and the base model
        io(fetch_sql_sources, cfg.registry)(cfg.data, root)   # before the base model's minutes
        base = prepare_base_model(cfg.model, root)
        data = collect_data(root)
        checked = io(validate_data, cfg.registry)(cfg.quality, data, root, run_id)
        cleaned = clean_data(root)
        split = split_data(root)
        io(log_data_reports, cfg.registry)(root, run_id)
        checked_clean = io(validate_cleaned_data, cfg.registry)(cfg.quality, cfg.data, root, run_id)
        pushed = io(push_data, cfg.registry)(cfg.data, root, ["collect", "clean", "split"]
                                             + (["base_model"] if base.built is not None else []))
        check_slices(cfg.registry.promotion, root)
        splits = split_paths(root)
        splits_md5 = split.hashes.get("split:data/splits", "")
        inc = io(plan_increment, cfg.registry)(cfg, root, splits_md5, run_id, base.id, base.revision)
        message = skip_reason(inc, cfg.schedule.min_new_rows, io(last_tried, cfg.registry)(cfg, splits_md5)) \
            if require_new_data else None
        if message:
            return skip(message, inc)
        train_cfg, train_base, train_splits = cfg.train, base.path, splits
        if inc.start_from == "champion":
            train_base = io(champion_weights, cfg.registry)(cfg.registry, inc.champion_version, root)
            train_splits = splits | {"train": inc.train_path}
            train_cfg = train_cfg.model_copy(update={"max_steps": cfg.incremental.max_steps
                                                     or scaled_steps(cfg.train.max_steps, inc)})
        start_key = "scratch" if inc.start_from == "scratch" else f"champion:{inc.champion_version}"
        candidate = train_candidate(cfg.model, cfg.lora, train_cfg, train_base, train_splits, run_id,
                                    root, f"{splits_md5}:{start_key}")
        prior = io(registered_candidate, cfg.registry)(cfg.registry, candidate.model_dir, run_id)
        if prior is not None and prior[1]:   # these weights are registered and decided already
            message = (f"skipped: {cfg.registry.model_name} v{prior[0].version} already holds these weights "
                       f"(same recipe, same data; decided '{prior[1]}'), nothing registered")
            return skip(message, inc)
        io(log_training, cfg.registry)(run_id, candidate)
        report = evaluate_all(cfg.eval, cfg.model, cfg.registry, base.path, candidate.model_dir,
                              splits["test"], cfg.train.max_seq_len, run_id, root)
        hashes = data.stage.hashes | cleaned.hashes | split.hashes
        verdict = (f"passed (raw_snapshot {checked.evaluated} + cleaned {checked_clean.evaluated} "
                   "expectations)")
        start = "scratch" if inc.start_from == "scratch" else (
            f"champion models:/{cfg.registry.model_name}/{inc.champion_version}: {inc.new_train_rows} new "
            f"training rows + {inc.replay_rows} replayed")
        lineage = lineage_of(cfg, Path(root), base.id, base.revision, data, hashes, verdict,
                             flow_run_id, start, inc.train_path)
        metrics = report.candidate.metrics() | {"train_loss": candidate.train_loss}
        version = prior[0] if prior is not None else io(register_candidate, cfg.registry)(
            cfg.registry, run_id, candidate.model_dir, lineage, metrics, cfg.train.method, report.test_sha)
        checks = {"data_gate": checked.success and checked_clean.success,
                  "train_loss_finite": math.isfinite(candidate.train_loss)}
        promotion = io(promote_candidate, cfg.registry)(cfg.registry, cfg.eval, run_id, version.version,
                                                        report, checks, cfg.train.max_seq_len, root)
        report = promotion.report
        io(publish_reports, cfg.registry)(cfg, run_id, version.version, promotion,
                                          str(Path(candidate.model_dir).parent / "loss_curve.png"), root)
    except BaseException as exc:
        try:   # a failed run is marked so; when MLflow itself is what failed, the error says it
            finish_run(run_id, "FAILED")
        except Exception as also:   # noqa: BLE001
            print(f"(could not mark MLflow run {run_id} FAILED: {type(also).__name__}: {also})")
        raise exc
    io(finish_run, cfg.registry)(run_id, "FINISHED")
    clean_report = json.loads(clean_report_path(root).read_text())
    return RetrainResult(
        run_id=run_id, experiment=cfg.registry.experiment,
        tracking_uri=registry.tracking_uri(cfg.registry, Path(root)),
        model_name=cfg.registry.model_name, primary_metric=cfg.registry.promotion.primary_metric, data=data, data_hashes=hashes, clean=clean_report,
        quality=checked, cleaned_quality=checked_clean,
        split_counts=json.loads((Path(root) / "data/splits/counts.json").read_text()),
        pushed=pushed.remote if pushed else None, train_loss=candidate.train_loss, val_loss=candidate.val_loss,
        train_seconds=candidate.seconds, report=report, promotion=promotion, increment=inc)


@flow(name="scheduled-retrain", log_prints=True)
def scheduled_retrain(root: str = ".", config: str = "params.yaml") -> dict:
    """What `ftpipe schedule` serves: the retrain flow on the project's params.yaml, skipping
    when fewer than schedule.min_new_rows rows are new since the champion's data."""
    root_path = Path(root).resolve()
    cfg_path = Path(config) if Path(config).is_absolute() else root_path / config
    # the retrain body runs inside this flow run (its tasks are this run's tasks)
    res = _locked_retrain(load_config(cfg_path), str(root_path), require_new_data=True)
    if isinstance(res, SkippedRun):
        return outcome(res, {"status": "skipped", "message": res.message, "run_id": res.run_id})
    p = res.promotion
    return outcome(res, {"status": "promoted" if p.decision.promote else "refused", "version": p.version,
                         "message": p.decision.summary(), "run_id": res.run_id})


if __name__ == "__main__":
    print(retrain(load_config("params.yaml")))
