"""Prefect tasks that talk to MLflow: the run, the model version, the gate and the alias."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import yaml
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from ftpipe import registry
from ftpipe.config import PipelineConfig, RegistryConfig
from ftpipe.lineage import Lineage
from ftpipe.promotion import Decision, decide


@dataclass(frozen=True)
class PromotionResult:
    version: str
    decision: Decision
    champion_before: str | None
    champion_after: str | None
    aliases: tuple[str, ...]


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


@task(name="register", cache_policy=NO_CACHE)
def register_candidate(reg: RegistryConfig, run_id: str, model_dir: str, lineage: Lineage,
                       metrics: dict[str, float], method: str) -> registry.VersionInfo:
    version = registry.log_model(run_id, model_dir, reg.model_name)
    tags = lineage.tags() | {"ftpipe.method": method, "ftpipe.run_id": run_id}
    tags |= {f"ftpipe.metric.{k}": f"{v:.6g}" for k, v in metrics.items()}
    registry.tag_version(reg.model_name, version.version, tags)
    registry.client().set_tag(run_id, "ftpipe.model_version", version.version)
    get_run_logger().info(f"registered {reg.model_name} version {version.version} as challenger")
    return version


@task(name="promotion-gate", cache_policy=NO_CACHE)
def promote_candidate(reg: RegistryConfig, run_id: str, version: str,
                      candidate: dict[str, float], champion: dict[str, float] | None,
                      champion_version: str | None, base: dict[str, float],
                      checks: dict[str, bool]) -> PromotionResult:
    logger = get_run_logger()
    decision = decide(candidate, champion, base, reg.promotion, checks)
    # Never promote from a stale comparison: the champion we scored must still be champion.
    current = registry.version_by_alias(reg.model_name, registry.CHAMPION)
    current_version = current.version if current else None
    if decision.promote and current_version != champion_version:
        from ftpipe.promotion import RuleResult
        decision = Decision(False, decision.reasons + (RuleResult(
            "champion_unchanged", False,
            f"champion moved from v{champion_version} to v{current_version} during this run; "
            "re-run to compare against the new champion"),))
    record = decision.as_dict() | {"version": version, "champion_compared": champion_version}
    registry.log_dict_artifact(run_id, record, "promotion/decision.json")
    registry.tag_version(reg.model_name, version, {
        "ftpipe.decision": decision.verdict,
        "ftpipe.decision.reasons": json.dumps([r.__dict__ for r in decision.reasons]),
    }, description=f"Gate decision: {decision.summary()}")
    c = registry.client()
    c.set_tag(run_id, "ftpipe.decision", decision.verdict)
    c.set_tag(run_id, "ftpipe.decision.summary", decision.summary()[:5000])
    if decision.promote:
        registry.move_champion(reg.model_name, version)
        logger.info(f"version {version} is now champion: {decision.summary()}")
    else:
        logger.info(f"version {version} stays challenger: {decision.summary()}")
    after = registry.version_by_alias(reg.model_name, registry.CHAMPION)
    mine = registry.client().get_model_version(reg.model_name, version)
    return PromotionResult(version, decision, current_version, after.version if after else None,
                           tuple(mine.aliases or ()))


@task(name="finish-run", cache_policy=NO_CACHE)
def finish_run(run_id: str, status: str) -> None:
    registry.client().set_terminated(run_id, status=status)
