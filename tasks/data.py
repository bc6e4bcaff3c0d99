"""Prefect tasks of the data half: each a thin wrapper over one ftpipe function."""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from ftpipe.config import DataConfig, ModelConfig, PromotionConfig, QualityConfig, ServeConfig
from ftpipe.data.quality import REPORTS, QualityResult, gate_cleaned, gate_raw
from ftpipe.data.stages import CLEANED, COLLECTED, SPLITS
from ftpipe.data.versions import PushResult, StageResult, reproduce
from ftpipe.registry.store import log_dir, log_files
from ftpipe.training.models import BaseModelRef
from tasks.io import io_task


def _log(msg: str) -> None:
    get_run_logger().info(msg)


@task(name="preflight", cache_policy=NO_CACHE)
def check_inputs(data: DataConfig, model: ModelConfig, root: str) -> None:
    """Every source and the base model looked at before any slow work; all problems at once."""
    from ftpipe.data.preflight import require

    require(data, model, Path(root))


@io_task("export-feedback")
def export_feedback(serve: ServeConfig, pii_policy: str, root: str) -> None:
    """Scheduled runs: the feedback gathered since the last export lands in data/incoming first."""
    from ftpipe.serving.records import export_drop

    got = export_drop(serve.store, pii_policy, Path(root))
    if got is None:
        return
    paths, counts = got
    _log(f"feedback: {counts['corrections']} corrections, {counts['preferences']} preferences -> "
         + (", ".join(str(p.relative_to(Path(root))) for p in paths) or "nothing new"))


@io_task("fetch-sql")
def fetch_sql_sources(data: DataConfig, root: str) -> None:
    """Export each SQL source's query to data/sources/sql/<name>.jsonl (DVC sees the change)."""
    from ftpipe.data.sources import fetch_sql

    for src in (s for s in data.sources if s.type == "sql"):
        exp = fetch_sql(Path(root), src)
        _log(f"sql source {src.name}: {exp.rows} rows -> {exp.path} ({'changed' if exp.changed else 'unchanged'})")


@task(name="base-model", cache_policy=NO_CACHE)
def base_model(model: ModelConfig, root: str) -> BaseModelRef:
    """The tiny default built through DVC when params.yaml points at it; else model.base (checked by preflight)."""
    from ftpipe.training.models import resolve_base

    ref = resolve_base(model, Path(root))
    _log(f"base model {ref.id}: " + {True: "built", False: "up to date, skipped", None: f"@ {ref.revision}"}[ref.built])
    return ref


@task(name="collect", cache_policy=NO_CACHE)
def collect(root: str) -> StageResult:
    """The collect stage, and what it read: rows, unparseable rows, files skipped and why."""
    from ftpipe.files import read_json

    st = stage.fn("collect", root)
    manifest = read_json(Path(root) / COLLECTED / "manifest.json")
    _log(f"collect: {manifest.get('rows')} rows from {len(manifest.get('files', []))} file(s), "
         f"{manifest.get('parse_errors')} unparseable")
    for s in manifest.get("skipped", []):
        _log(f"collect: skipped {s['path']}: {s['why']}")
    return st


@task(name="dvc-stage", cache_policy=NO_CACHE)
def stage(name: str, root: str) -> StageResult:
    """Bring one DVC data stage up to date (skipped when its deps and params are unchanged)."""
    st = reproduce(Path(root), name)
    _log(f"{name}: {'ran' if st.ran else 'unchanged, skipped'}")
    return st


@io_task("validate-raw")
def validate_raw(quality: QualityConfig, root: str, run_id: str) -> QualityResult:
    """GX suite on the raw snapshot; the flow stops here with the failure table. The result
    and the manifest go on the run whether it passed or not."""
    reports = Path(root) / REPORTS
    try:
        result = gate_raw(Path(root) / COLLECTED / "snapshot.jsonl", quality, reports)
    finally:
        log_files(run_id, [reports / "raw_validation.json", Path(root) / COLLECTED / "manifest.json"], "data")
    _log(f"GX raw_snapshot passed: {result.evaluated} expectations on {result.rows} rows")
    return result


@io_task("validate-cleaned")
def validate_cleaned(quality: QualityConfig, data: DataConfig, root: str, run_id: str) -> QualityResult:
    """GX suite on the cleaned set (bounds, uniqueness, PII, split shares, per-source floor);
    the clean report, quarantine, split counts and Data Docs go on the run either way."""
    reports = Path(root) / REPORTS
    try:
        result = gate_cleaned(Path(root) / CLEANED / "clean.jsonl", quality, data.clean, data.split, reports)
    finally:
        log_files(run_id, [Path(root) / CLEANED / "report.json", Path(root) / CLEANED / "quarantine.jsonl",
                           Path(root) / SPLITS / "counts.json", reports / "cleaned_validation.json"], "data")
        if (reports / "docs").is_dir():
            # the run's copy renders offline without GX's tutorial GIFs and fonts (3.9 MB a run)
            log_dir(run_id, reports / "docs", "data/docs", skip=("*.gif", "fonts"))
    _log(f"GX cleaned passed: {result.evaluated} expectations on {result.rows} rows; Data Docs: {result.docs}")
    return result


@task(name="check-slices", cache_policy=NO_CACHE)
def check_slices(promotion: PromotionConfig, root: str) -> None:
    """A promotion rule on a slice the test set lacks is a config error, found before training."""
    from ftpipe.registry.promotion import check_slices as check

    check(promotion, Path(root) / SPLITS / "test.jsonl")


@io_task("push-data")
def push_data(data: DataConfig, root: str, stages: list[str]) -> PushResult | None:
    """Every data version trained on goes to the DVC remote, so an audit can restore it."""
    from ftpipe.data.versions import push

    if not data.push:
        _log("push-data: data.push is false; the remote is not updated")
        return None
    res = push(Path(root), stages, data.remote)
    _log(f"push-data: {res.pushed} object(s) pushed to DVC remote '{res.remote}'")
    return res
