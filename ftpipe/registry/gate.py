"""The promotion gate against the registry: under the registry-wide lock, re-check the
champion (score a new one on the same test sets if another flow moved it), decide with
ftpipe.registry.promotion.decide (pure), move the alias, and record the decision on the run
and the version.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

from ftpipe import names as t
from ftpipe.config import EvalConfig, RegistryConfig
from ftpipe.evaluation.compare import EvalReport, regression_sets, score_version
from ftpipe.files import read_jsonl
from ftpipe.registry import store as registry
from ftpipe.registry.lock import PromotionLock
from ftpipe.registry.promotion import Decision, RuleResult, decide

TEST_SET_TAG = t.TEST_SET




@dataclass(frozen=True)
class PromotionResult:
    version: str
    decision: Decision
    champion_before: str | None
    champion_after: str | None
    aliases: tuple[str, ...]
    redecided: bool = False
    report: EvalReport | None = None


# ------------------------------------------------------------------ regression sets


# ------------------------------------------------------------------ scoring


# ------------------------------------------------------------------ logging


# ------------------------------------------------------------------ the gate

def gate_and_promote(reg: RegistryConfig, cfg: EvalConfig, run_id: str, version: str, report: EvalReport,
                     checks: dict[str, bool], max_seq_len: int, cache_dir: Path,
                     log: Callable[[str], None] = print) -> PromotionResult:
    """Decide and, if the decision is to promote, move `champion`, all under the registry's
    promotion lock. If the champion changed since the evaluation (another flow promoted),
    the new champion is scored on the same test sets and the decision is taken again."""
    name = reg.model_name
    redecided = False
    with PromotionLock(name, holder=f"run {run_id} (v{version})",
                                timeout_s=reg.promotion.lock_timeout_s, log=log):
        current = registry.version_by_alias(name, registry.CHAMPION)
        current_version = current.version if current else None
        evaluated_against = report.champion_version
        if current_version != evaluated_against:
            log(f"champion moved from v{report.champion_version} to v{current_version} since this run "
                "evaluated: scoring the new champion on the same test sets and deciding again")
            redecided = True
            if current is None:
                report = replace(report, champion=None, champion_version=None, champion_regression={})
            else:
                regression = regression_sets(name, report.test_sha, cache_dir, log)
                regression = {k: v for k, v in regression.items() if k in report.candidate_regression}
                champ, champ_reg = score_version(reg, current_version, read_jsonl(Path(report.test_set)),
                                                 regression, cfg, max_seq_len, report.suites)
                report = replace(report, champion=champ, champion_version=current_version,
                                 champion_regression=champ_reg)
        decision = decide(report.candidate.metrics(), report.champion.metrics() if report.champion else None,
                          report.base.metrics(), reg.promotion, checks, report.forgetting(reg),
                          report.behaviour())
        if redecided:
            decision = Decision(decision.promote, decision.reasons + (RuleResult(
                "champion_rechecked", True,
                f"champion moved from {'v' + evaluated_against if evaluated_against else 'none'} to "
                f"{'v' + current_version if current_version else 'none'} during this run: decided "
                "again against the new one"),))
        record = decision.as_dict() | {"version": version, "champion_compared": current_version,
                                       "redecided": redecided, "forgetting": report.forgetting(reg),
                                       "policy": reg.promotion.model_dump(mode="json")}
        registry.log_dict_artifact(run_id, record, "promotion/decision.json")
        m = reg.promotion.primary_metric
        champion_score = report.champion.metrics().get(m) if report.champion else None
        registry.tag_version(name, version, {   # the whole summary: the description and decision.json
            t.DECISION: decision.verdict,
            t.DECISION_REASONS: json.dumps([r.__dict__ for r in decision.reasons]),
            t.CHAMPION_COMPARED: current_version or "none",
            **({t.CHAMPION_METRIC + m: f"{champion_score:.6g}"} if champion_score is not None else {}),
            **({t.FORGETTING: f"{max(report.forgetting(reg).values()):.6g}"} if report.forgetting(reg) else {}),
        }, description=f"Gate decision: {decision.summary()}")
        c = registry.client()
        c.set_tag(run_id, t.DECISION, decision.verdict)
        c.set_tag(run_id, t.DECISION_SUMMARY, decision.summary()[:5000])
        if decision.promote:
            registry.record_champion(name, version, "gate", decision.why(), current_version)   # the history keeps 500 chars
            log(f"version {version} is now champion: {decision.summary()}")
        else:
            log(f"version {version} stays challenger: {decision.summary()}")
        after = registry.version_by_alias(name, registry.CHAMPION)
    mine = c.get_model_version(name, version)
    return PromotionResult(version, decision, current_version, after.version if after else None,
                           tuple(mine.aliases or ()), redecided, report)


# ------------------------------------------------------------------ manual operations


