"""Prefect tasks of the data half: each a thin wrapper over one ftpipe function."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from ftpipe.config import DataConfig, ModelConfig, PromotionConfig, QualityConfig
from ftpipe.lineage.record import base_model_revision, read_manifest
from ftpipe.data.quality import REPORTS, QualityResult, gate_cleaned, gate_raw
from ftpipe.registry.store import log_dir, log_files
from ftpipe.data.sources import SqlExport, fetch_sql
from ftpipe.data.stages import BASE_MODEL_DIR, CLEANED, COLLECTED, SPLITS
from ftpipe.data.versions import PushResult, StageResult, push, reproduce


@dataclass(frozen=True)
class BaseModelRef:
    path: str           # what from_pretrained gets: a local dir or a hub id
    id: str             # as written in params.yaml
    revision: str
    built: bool | None  # None: not ours to build (hub id or external path)


@dataclass(frozen=True)
class DataVersion:
    snapshot: str
    manifest: dict
    stage: StageResult


def _log(msg: str) -> None:
    get_run_logger().info(msg)


@task(name="base-model", cache_policy=NO_CACHE)
def prepare_base_model(model: ModelConfig, root: str) -> BaseModelRef:
    """Build the tiny default through DVC when params.yaml points at it; else use as is."""
    root_p = Path(root)
    local = (root_p / model.base)
    if local.resolve() == (root_p / BASE_MODEL_DIR).resolve():
        st = reproduce(root_p, "base_model")
        _log(f"base model {model.base}: {'built' if st.ran else 'up to date, skipped'}")
        return BaseModelRef(str(local), model.base, base_model_revision(model.base, None, root_p), st.ran)
    from ftpipe.training.models import check_model

    path = check_model(model.base, root_p, model.revision, model.allow_pickle_weights)   # before any data work
    return BaseModelRef(path, model.base, base_model_revision(path, model.revision, root_p), None)


@task(name="preflight", cache_policy=NO_CACHE)
def check_inputs(data: DataConfig, model: ModelConfig, root: str) -> None:
    """Every source and the base model looked at before any slow work; all problems at once."""
    from ftpipe.data.preflight import require

    require(data, model, Path(root))


@task(name="check-slices", cache_policy=NO_CACHE)
def check_slices(promotion: PromotionConfig, root: str) -> None:
    """A promotion rule on a slice the test set does not have is a config error: say so now,
    not after training and registering."""
    import orjson

    from ftpipe.config import ConfigError
    from ftpipe.registry.promotion import unknown_slices

    with (Path(root) / SPLITS / "test.jsonl").open("rb") as f:
        slices = {s for line in f if line.strip() and (s := orjson.loads(line).get("slice"))}
    problems = unknown_slices(promotion, slices)
    if problems:
        raise ConfigError("\n".join(problems))


@task(name="fetch-sql", cache_policy=NO_CACHE)
def fetch_sql_sources(data: DataConfig, root: str) -> list[SqlExport]:
    """Export each SQL source's query to data/sources/sql/<name>.jsonl (DVC sees the change)."""
    out = []
    for src in data.sources:
        if src.type == "sql":
            exp = fetch_sql(Path(root), src)
            _log(f"sql source {src.name}: {exp.rows} rows -> {exp.path} "
                 f"({'changed' if exp.changed else 'unchanged'})")
            out.append(exp)
    return out


@task(name="collect", cache_policy=NO_CACHE)
def collect_data(root: str) -> DataVersion:
    st = reproduce(Path(root), "collect")
    manifest = read_manifest(Path(root) / COLLECTED / "manifest.json")
    _log(f"collect: {'ran' if st.ran else 'unchanged, skipped'}; {manifest.get('rows')} rows from "
         f"{len(manifest.get('files', []))} file(s), {manifest.get('parse_errors')} unparseable")
    for s in manifest.get("skipped", []):
        _log(f"collect: skipped {s['path']}: {s['why']}")
    return DataVersion(str(Path(root) / COLLECTED / "snapshot.jsonl"), manifest, st)


@task(name="validate-raw", cache_policy=NO_CACHE)
def validate_data(quality: QualityConfig, data: DataVersion, root: str, run_id: str) -> QualityResult:
    """GX suite on the raw snapshot; the flow stops here with the failure table."""
    reports = Path(root) / REPORTS
    try:
        result = gate_raw(Path(data.snapshot), quality, reports)
    finally:
        # The GX result and the manifest go on the run whether the gate passed or not.
        log_files(run_id, [reports / "raw_validation.json", Path(root) / COLLECTED / "manifest.json"], "data")
    _log(f"GX raw_snapshot passed: {result.evaluated} expectations on {result.rows} rows")
    return result


@task(name="validate-cleaned", cache_policy=NO_CACHE)
def validate_cleaned_data(quality: QualityConfig, data: DataConfig, root: str, run_id: str) -> QualityResult:
    """GX suite on the cleaned set (length bounds, uniqueness, PII, split proportions)."""
    reports = Path(root) / REPORTS
    try:
        result = gate_cleaned(Path(root) / CLEANED / "clean.jsonl", quality, data.clean, data.split, reports)
    finally:
        log_files(run_id, [reports / "cleaned_validation.json"], "data")
        docs = reports / "docs"
        if docs.is_dir():
            log_dir(run_id, docs, "data/docs")
    _log(f"GX cleaned passed: {result.evaluated} expectations on {result.rows} rows; "
         f"Data Docs: {result.docs}")
    return result


@task(name="push-data", cache_policy=NO_CACHE)
def push_data(data: DataConfig, root: str, stages: list[str]) -> PushResult | None:
    """Every data version trained on goes to the DVC remote, so an audit can restore it."""
    if not data.push:
        _log("push-data: data.push is false; the remote is not updated")
        return None
    res = push(Path(root), stages, data.remote)
    _log(f"push-data: {res.pushed} object(s) pushed to DVC remote '{res.remote}'")
    return res


@task(name="log-data-reports", cache_policy=NO_CACHE)
def log_data_reports(root: str, run_id: str) -> None:
    """Clean report, quarantine and split counts on the MLflow run, for reviewers."""
    log_files(run_id, [Path(root) / CLEANED / "report.json", Path(root) / CLEANED / "quarantine.jsonl",
                       Path(root) / SPLITS / "counts.json"], "data")


@task(name="clean", cache_policy=NO_CACHE)
def clean_data(root: str) -> StageResult:
    st = reproduce(Path(root), "clean")
    _log(f"clean: {'ran' if st.ran else 'unchanged, skipped'}")
    return st


@task(name="split", cache_policy=NO_CACHE)
def split_data(root: str) -> StageResult:
    st = reproduce(Path(root), "split")
    _log(f"split: {'ran' if st.ran else 'unchanged, skipped'}")
    return st


def split_paths(root: str) -> dict[str, str]:
    return {n: str(Path(root) / SPLITS / f"{n}.jsonl") for n in ("train", "validation", "test")}


def clean_report_path(root: str) -> Path:
    return Path(root) / CLEANED / "report.json"
