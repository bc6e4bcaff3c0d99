"""The promotion gate: a pure function from numbers and a policy to a decision with reasons.

    decide(candidate, champion, base, policy, checks) -> Decision

No I/O, no MLflow: the flow scores the candidate, the champion and the base on the same
test set, then asks this function. One reason per rule, pass or fail, so a refusal
always says which rule refused and by how much.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ftpipe.config import PromotionConfig

LOWER_IS_BETTER = frozenset({"eval_loss", "perplexity"})


@dataclass(frozen=True)
class RuleResult:
    rule: str
    passed: bool
    detail: str


@dataclass(frozen=True)
class Decision:
    promote: bool
    reasons: tuple[RuleResult, ...]

    @property
    def verdict(self) -> str:
        return "promote" if self.promote else "refuse"

    def summary(self) -> str:
        failed = [r for r in self.reasons if not r.passed]
        if not failed:
            return "promote: " + "; ".join(r.detail for r in self.reasons)
        return "refuse: " + "; ".join(r.detail for r in failed)

    def as_dict(self) -> dict:
        return {"promote": self.promote, "verdict": self.verdict, "summary": self.summary(),
                "reasons": [r.__dict__ for r in self.reasons]}


def improvement(metric: str, candidate: float, reference: float) -> float:
    """How much better the candidate is (positive = better), whatever the metric's direction."""
    return reference - candidate if metric in LOWER_IS_BETTER else candidate - reference


def decide(candidate: dict[str, float], champion: dict[str, float] | None,
           base: dict[str, float] | None, policy: PromotionConfig,
           checks: dict[str, bool] | None = None) -> Decision:
    checks = checks or {}
    m = policy.primary_metric
    reasons: list[RuleResult] = []

    bad = sorted(k for k, v in candidate.items() if v is None or not math.isfinite(v))
    reasons.append(RuleResult("finite_metrics", not bad,
                              f"non-finite metrics: {', '.join(bad)}" if bad
                              else "all candidate metrics are finite"))

    if policy.require_data_gate:
        ok = bool(checks.get("data_gate"))
        reasons.append(RuleResult("data_gate", ok, "data quality gate passed" if ok
                                  else "data quality gate did not pass"))
    for name, ok in sorted(checks.items()):
        if name != "data_gate":
            reasons.append(RuleResult(f"check:{name}", bool(ok), f"{name}: {'ok' if ok else 'FAILED'}"))

    for metric, limit in sorted(policy.thresholds.items()):
        value = candidate.get(metric)
        if value is None:
            reasons.append(RuleResult(f"threshold:{metric}", False,
                                      f"{metric} was not measured (threshold {limit})"))
            continue
        lower = metric in LOWER_IS_BETTER
        ok = value <= limit if lower else value >= limit
        reasons.append(RuleResult(f"threshold:{metric}", ok,
                                  f"{metric} {value:.4f} {'<=' if lower else '>='} {limit} "
                                  f"{'holds' if ok else 'fails'}"))

    if m not in candidate:
        reasons.append(RuleResult("primary_metric", False, f"primary metric {m} was not measured"))
        return Decision(False, tuple(reasons))

    if base is not None and m in base:
        gain = improvement(m, candidate[m], base[m])
        ok = gain >= policy.min_gain_over_base
        reasons.append(RuleResult("beats_base", ok,
                                  f"{m} {candidate[m]:.4f} vs base {base[m]:.4f}: gain {gain:+.4f} "
                                  f"{'>=' if ok else '<'} required {policy.min_gain_over_base}"))

    if champion is None or m not in champion:
        reasons.append(RuleResult("beats_champion", True, "no champion yet: first model"))
    else:
        gain = improvement(m, candidate[m], champion[m])
        ok = gain >= policy.min_improvement
        reasons.append(RuleResult("beats_champion", ok,
                                  f"{m} {candidate[m]:.4f} vs champion {champion[m]:.4f}: "
                                  f"improvement {gain:+.4f} {'>=' if ok else '<'} required "
                                  f"{policy.min_improvement}"))
    return Decision(all(r.passed for r in reasons), tuple(reasons))
