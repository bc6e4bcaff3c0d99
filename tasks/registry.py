"""Prefect tasks that talk to MLflow: the run, the model version, the gate and the alias."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from ftpipe.registry import gate as gate

from ftpipe.registry import store as registry
from ftpipe.registry import tags as t
from ftpipe.lineage.audit import recorded_tags, write_record
from ftpipe.config import EvalConfig, PipelineConfig, RegistryConfig
from ftpipe.lineage.record import Lineage


def _flatten(d: dict, prefix: str = "") -> dict[str, str]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = json.dumps(v) if isinstance(v, (list, dict)) else str(v)
    return out


@task(name="start-run", cache_policy=NO_CACHE)
def start_run(cfg: PipelineConfig, root: str, flow_run_id: str) -> str:
    """One MLflow run per flow run; the whole config is logged once, here."""
    exp_id = registry.setup(cfg.registry, Path(root))
    c = registry.client()
    run = c.create_run(exp_id, run_name=f"retrain-{flow_run_id[:8]}",
                       tags={"ftpipe.prefect_flow_run": flow_run_id,
                             "ftpipe.config_hash": cfg.hash()})
    c.log_batch(run.info.run_id, params=[
        __import__("mlflow").entities.Param(k, v[:6000])
        for k, v in _flatten(cfg.model_dump(mode="json")).items()])
    c.log_text(run.info.run_id, yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False),
               "config/params.yaml")
    return run.info.run_id


@task(name="find-registered", cache_policy=NO_CACHE)
def registered_candidate(reg: RegistryConfig, model_dir: str, run_id: str) -> tuple[registry.VersionInfo, str] | None:
    """The version that already holds these weights (same training key: same recipe, same
    data), with its gate decision ('' when a crashed run registered it but never decided):
    a run started again never registers the same candidate twice."""
    key = Path(model_dir).parent.name
    for mv in registry.versions_tagged(reg.model_name, {t.CANDIDATE: key})[:1]:
        tags = mv.tags or {}
        if tags.get(t.CANDIDATE) == key:
            decision = tags.get(t.DECISION, "")
            c = registry.client()
            c.set_tag(run_id, "ftpipe.model_version", str(mv.version))
            c.set_tag(run_id, "ftpipe.reused_version", f"{reg.model_name} v{mv.version}")
            get_run_logger().info(
                f"{reg.model_name} version {mv.version} (run {mv.run_id}) already holds these weights ({key}): "
                + (f"decided '{decision}'; nothing registered" if decision else
                   "registered by a run that stopped before the gate; the gate decides on it now"))
            return registry.VersionInfo(mv.name, str(mv.version), mv.run_id, tuple(mv.aliases or ())), decision
    return None


@task(name="register", cache_policy=NO_CACHE)
def register_candidate(reg: RegistryConfig, run_id: str, model_dir: str, lineage: Lineage,
                       metrics: dict[str, float], method: str, test_sha: str) -> registry.VersionInfo:
    key = Path(model_dir).parent.name
    facts = lineage.tags() | {t.METHOD: method, t.TEST_SET: test_sha, t.CANDIDATE: key}
    facts |= {t.METRIC + k: f"{v:.6g}" for k, v in metrics.items() if not k.startswith("slice.")}
    # every fact in the immutable record; the few people filter on also as version tags
    # (`ftpipe lineage` names any of them edited later)
    tags = t.version_tags(facts, reg.promotion.primary_metric)
    write_record(registry.client(), run_id, facts, tags)
    version = registry.log_model(run_id, model_dir, reg.model_name, tags)
    registry.client().set_tag(run_id, "ftpipe.model_version", version.version)
    get_run_logger().info(f"registered {reg.model_name} version {version.version} as challenger")
    return version


@task(name="promotion-gate", cache_policy=NO_CACHE)
def promote_candidate(reg: RegistryConfig, eval_cfg: EvalConfig, run_id: str, version: str,
                      report: gate.EvalReport, checks: dict[str, bool], max_seq_len: int,
                      root: str) -> gate.PromotionResult:
    return gate.gate_and_promote(reg, eval_cfg, run_id, version, report, checks, max_seq_len,
                                 Path(root) / "runs" / "regression", log=get_run_logger().info)


@task(name="publish-reports", cache_policy=NO_CACHE)
def publish_reports(cfg: PipelineConfig, run_id: str, version: str, result: gate.PromotionResult,
                    loss_png: str | None, root: str) -> dict[str, str]:
    """The model card (into the version's own artifacts and the run's) and the run's HTML report."""
    from ftpipe.evaluation.reports import html_report, model_card

    out = Path(root) / "runs" / f"eval-{run_id[:12]}"
    out.mkdir(parents=True, exist_ok=True)
    report = result.report
    tags = recorded_tags(registry.client(), cfg.registry.model_name, version)   # tags + the record
    card = model_card(cfg, version, run_id, tags, report, result)
    (out / "model_card.md").write_text(card, encoding="utf-8")
    registry.log_model_file(cfg.registry.model_name, version, out / "model_card.md")
    registry.log_files(run_id, [out / "model_card.md"], "model_card")
    page = html_report(cfg, run_id, version, report, result, Path(loss_png) if loss_png else None,
                       out / "metrics_comparison.png", card)
    (out / "report.html").write_text(page, encoding="utf-8")
    registry.log_files(run_id, [out / "report.html"], "report")
    get_run_logger().info(f"model card and report: {out / 'report.html'}")
    return {"model_card": str(out / "model_card.md"), "report": str(out / "report.html")}


@task(name="finish-run", cache_policy=NO_CACHE)
def finish_run(run_id: str, status: str) -> None:
    registry.client().set_terminated(run_id, status=status)
