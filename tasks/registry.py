"""Prefect tasks that talk to MLflow: the run, the model version, the gate and the alias,
the reports. Each a thin wrapper over one ftpipe function."""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger

from ftpipe.config import EvalConfig, PipelineConfig, RegistryConfig
from ftpipe.evaluation.compare import EvalReport
from ftpipe.lineage.record import Lineage
from ftpipe.registry import candidates, runs
from ftpipe.registry.gate import PromotionResult
from ftpipe.registry.store import VersionInfo
from tasks.io import io_task


@io_task("start-run")
def start_run(cfg: PipelineConfig, root: str, flow_run_id: str, kind: str = "retrain") -> str:
    """One MLflow run per flow run; the whole config is logged once, here."""
    return runs.start_run(cfg, Path(root), flow_run_id, kind)


@io_task("find-registered")
def find_registered(reg: RegistryConfig, model_dir: str, run_id: str) -> candidates.Registered | None:
    """The version that already holds these weights, if any (never registered twice)."""
    found = candidates.find_registered(reg, model_dir, run_id)
    if found:
        v = found.version
        get_run_logger().info(f"{reg.model_name} version {v.version} (run {v.run_id}) already holds these weights: "
                              + (f"decided '{found.decision}'; nothing registered" if found.decision else
                                 "registered by a run that stopped before the gate; the gate decides on it now"))
    return found


@io_task("register")
def register(reg: RegistryConfig, run_id: str, model_dir: str, lineage: Lineage, metrics: dict[str, float],
             method: str, test_sha: str, adapter_dir: str | None = None,
             base: tuple[str, str, str | None] | None = None) -> VersionInfo:
    """Full weights, or (adapter_dir, base: folder, source, revision) an adapter version."""
    import time

    from ftpipe.files import folder_bytes

    log = get_run_logger().info
    start = time.perf_counter()
    version = candidates.register(reg, run_id, model_dir, lineage, metrics, method, test_sha, adapter_dir, base, log)
    what = f"adapter {folder_bytes(adapter_dir) / 1e6:,.1f} MB" if adapter_dir else \
        f"weights {folder_bytes(model_dir) / 1e6:,.1f} MB"
    log(f"registered {reg.model_name} version {version.version} as challenger ({what}) in "
        f"{time.perf_counter() - start:.1f} s")
    return version


@io_task("promotion-gate")
def promote(reg: RegistryConfig, eval_cfg: EvalConfig, run_id: str, version: str, report: EvalReport,
            checks: dict[str, bool], max_seq_len: int, root: str) -> PromotionResult:
    from ftpipe.registry.gate import gate_and_promote

    return gate_and_promote(reg, eval_cfg, run_id, version, report, checks, max_seq_len,
                            Path(root) / "runs" / "regression", log=get_run_logger().info)


@io_task("publish-reports")
def publish_reports(cfg: PipelineConfig, run_id: str, result: PromotionResult, loss_png: str, root: str) -> None:
    """The model card (into the version's own artifacts and the run's) and the run's HTML report."""
    from ftpipe.evaluation.reports import publish

    page = publish(cfg, run_id, result, Path(loss_png), Path(root) / "runs" / f"eval-{run_id[:12]}")
    get_run_logger().info(f"model card and report: {page}")


@io_task("record-skip")
def record_skip(run_id: str, message: str, champion: str | None) -> None:
    get_run_logger().info(runs.record_skip(run_id, message, champion))


@io_task("finish-run")
def finish_run(run_id: str) -> None:
    runs.finish_run(run_id)
