"""The promotion gate: a pure function from numbers and a policy to a decision with reasons.

    decide(candidate, champion, base, policy, checks, forgetting) -> Decision

No I/O, no MLflow: the flow scores the candidate, the champion and the base on the same
test set (and candidate and champion on every earlier test set), then asks this function.
One reason per rule, pass or fail, so a refusal always says which rule refused and by how
much.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from ftpipe.config import PromotionConfig


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

    def why(self) -> str:
        """The rule(s) that decided, without the rules every candidate passes: a refusal's
        failed rules; a promotion's comparison with the champion (or "first model")."""
        decisive = ([r for r in self.reasons if not r.passed]
                    or [r for r in self.reasons if r.rule == "beats_champion"])
        return "; ".join(r.detail for r in decisive) or self.summary()

    def as_dict(self) -> dict:
        return {"promote": self.promote, "verdict": self.verdict, "summary": self.summary(), "why": self.why(),
                "reasons": [r.__dict__ for r in self.reasons]}

    @classmethod
    def from_dict(cls, d: dict) -> "Decision":
        return cls(bool(d["promote"]), tuple(RuleResult(**r) for r in d["reasons"]))


def unknown_slices(policy: PromotionConfig, slices: set[str]) -> list[str]:
    """Problems, one per policy field naming a slice the test set does not have
    (`slice.NAME.METRIC` as primary metric or threshold): a config error, found before
    training rather than after registration."""
    fields = [("registry.promotion.primary_metric", policy.primary_metric)] + [
        (f"registry.promotion.thresholds.{m}", m) for m in policy.thresholds]
    have = ", ".join(sorted(slices)) or "none (no row has a slice)"
    return [f"{where}: {metric} names slice {metric.split('.')[1]!r}, which the test set does not have "
            f"(its slices: {have})" for where, metric in fields
            if metric.startswith("slice.") and metric.split(".")[1] not in slices]


def check_slices(policy: PromotionConfig, test_path: Path) -> None:
    """Raise ConfigError naming every policy field on a slice the test set lacks."""
    from ftpipe.config import ConfigError
    from ftpipe.files import iter_jsonl

    problems = unknown_slices(policy, {s for row in iter_jsonl(test_path) if (s := row.get("slice"))})
    if problems:
        raise ConfigError("\n".join(problems))


def improvement(metric: str, candidate: float, reference: float, policy: PromotionConfig | None = None) -> float:
    """How much better the candidate is (positive = better), whatever the metric's direction."""
    higher = (policy or PromotionConfig()).higher_is_better(metric)
    return candidate - reference if higher else reference - candidate


def forgetting(candidate: dict[str, dict[str, float]], champion: dict[str, dict[str, float]],
               policy: PromotionConfig) -> dict[str, float]:
    """Per regression set, how much worse the candidate is than the champion on the forgetting
    metric (the primary one unless forgetting_metric says; positive = forgot; 0 when it did as
    well or better)."""
    m = policy.forgetting_on
    out = {}
    for sid, scores in sorted(candidate.items()):
        if sid in champion and m in scores and m in champion[sid]:
            out[sid] = max(0.0, -improvement(m, scores[m], champion[sid][m], policy))
    return out


def _check(name: str, policy: PromotionConfig, ok: bool, detail: str) -> RuleResult:
    required = name in policy.required_checks
    return RuleResult(f"check:{name}", ok or not required, detail + ("" if required else " (not required)"))


def _said(r) -> str:
    answer = r.answer if len(r.answer) <= 80 else r.answer[:77] + "..."
    return f"{r.case} said {answer!r} ({'; '.join(r.failures)})"


def behaviour_rules(results: list | None, champion: list | None, rules) -> list[RuleResult]:
    """One rule per tag with a minimum pass rate, one per must_not_regress tag. results /
    champion: the candidate's and the champion's CaseResults (None: no suite ran / no champion)."""
    out = []
    if not rules.min_pass_rate and not rules.must_not_regress:
        return out
    results = results or []
    for tag, need in sorted(rules.min_pass_rate.items()):
        tagged = [r for r in results if tag == "all" or tag in r.tags]
        if not tagged:
            out.append(RuleResult(f"behaviour:{tag}", False, f"no behaviour case is tagged {tag} "
                                  f"(required pass rate {need:.0%})"))
            continue
        rate = sum(r.passed for r in tagged) / len(tagged)
        failed = [r for r in tagged if not r.passed]
        ok = rate >= need
        out.append(RuleResult(f"behaviour:{tag}", ok, f"{tag}: {len(tagged) - len(failed)}/{len(tagged)} cases "
                              f"pass ({rate:.0%}) {'>=' if ok else '<'} required {need:.0%}"
                              + ("" if ok or not failed else ": " + "; ".join(_said(r) for r in failed[:3])
                                 + (f"; and {len(failed) - 3} more" if len(failed) > 3 else ""))))
    passed_before = {r.case for r in champion or [] if r.passed}
    for tag in rules.must_not_regress:
        if champion is None:
            out.append(RuleResult(f"behaviour_regression:{tag}", True, f"{tag}: no champion to regress from"))
            continue
        broke = [r for r in results if tag in r.tags and not r.passed and r.case in passed_before]
        out.append(RuleResult(f"behaviour_regression:{tag}", not broke,
                              f"{tag}: no case the champion passes is failed" if not broke else
                              f"{tag}: {len(broke)} case(s) the champion passes now fail: "
                              + "; ".join(_said(r) for r in broke[:3])))
    return out


def slice_rules(candidate: dict[str, float], champion: dict[str, float] | None,
                policy: PromotionConfig) -> list[RuleResult]:
    """Fairness across the test set's slices on the primary metric: the gap between the
    candidate's best and worst slice, and its worst slice against the champion's worst."""
    m = policy.primary_metric
    out = []

    def per_slice(metrics: dict[str, float]) -> dict[str, float]:
        return {k.split(".")[1]: v for k, v in metrics.items()
                if k.startswith("slice.") and k.split(".", 2)[2] == m}

    mine = per_slice(candidate)
    if policy.max_slice_gap is None and policy.max_worst_slice_drop is None:
        return out
    if len(mine) < 2:
        return [RuleResult("slices", False, f"slice rules set, but the test set has {len(mine)} slice(s) with {m}: "
                           "fairness across slices needs at least 2")]
    higher = policy.higher_is_better(m)
    ranked = sorted(mine, key=lambda k: mine[k], reverse=higher)      # best first
    best, worst = ranked[0], ranked[-1]
    if policy.max_slice_gap is not None:
        gap = abs(mine[best] - mine[worst])
        ok = gap <= policy.max_slice_gap
        out.append(RuleResult("max_slice_gap", ok, f"{m} gap between slices: {gap:.4f} ({best} {mine[best]:.4f}, "
                              f"{worst} {mine[worst]:.4f}) {'<=' if ok else '>'} allowed {policy.max_slice_gap}"))
    if policy.max_worst_slice_drop is not None:
        theirs = per_slice(champion or {})
        if not theirs:
            out.append(RuleResult("worst_slice", True, "no champion slices to compare the worst slice with"))
        else:
            their_worst = sorted(theirs, key=lambda k: theirs[k], reverse=higher)[-1]
            drop = max(0.0, -improvement(m, mine[worst], theirs[their_worst], policy))
            ok = drop <= policy.max_worst_slice_drop
            out.append(RuleResult("worst_slice", ok, f"worst slice {m}: {worst} {mine[worst]:.4f} vs the champion's "
                                  f"{their_worst} {theirs[their_worst]:.4f}: drop {drop:.4f} "
                                  f"{'<=' if ok else '>'} allowed {policy.max_worst_slice_drop}"))
    return out


def decide(candidate: dict[str, float], champion: dict[str, float] | None,
           base: dict[str, float] | None, policy: PromotionConfig,
           checks: dict[str, bool] | None = None,
           forgotten: dict[str, float] | None = None,
           behaviour: tuple[list, list | None] | None = None) -> Decision:
    """behaviour: (the candidate's behaviour case results, the champion's or None)."""
    checks = dict(checks or {})
    m = policy.primary_metric
    reasons: list[RuleResult] = []

    bad = sorted(k for k, v in candidate.items() if v is None or not math.isfinite(v))
    bad += sorted(k for k, v in checks.items() if k not in ("data_gate",) and not v)
    reasons.append(_check("finite_metrics", policy, not bad,
                          f"not finite or failed: {', '.join(bad)}" if bad
                          else "all metrics finite, training converged"))
    gate = bool(checks.get("data_gate"))
    reasons.append(_check("data_gate", policy, gate, "data quality gates passed" if gate
                          else "data quality gates did not pass"))
    share = candidate.get("non_empty")
    ok = share is not None and share >= policy.min_non_empty
    reasons.append(_check("non_empty_outputs", policy, ok,
                          "non-empty generations not measured" if share is None else
                          f"{share:.1%} of generations non-empty (required {policy.min_non_empty:.0%})"))
    leaks = candidate.get("pii_outputs")
    ok = leaks is not None and leaks == 0
    reasons.append(_check("no_pii_in_outputs", policy, ok,
                          "PII in generations not measured" if leaks is None else
                          f"{int(leaks)} generations hold PII their prompt did not"))

    for metric, limit in sorted(policy.thresholds.items()):
        value = candidate.get(metric)
        if value is None:
            reasons.append(RuleResult(f"threshold:{metric}", False,
                                      f"{metric} was not measured (threshold {limit})"))
            continue
        higher = policy.higher_is_better(metric)
        ok = value >= limit if higher else value <= limit
        reasons.append(RuleResult(f"threshold:{metric}", ok,
                                  f"{metric} {value:.4f} {'>=' if higher else '<='} {limit} "
                                  f"{'holds' if ok else 'fails'}"))

    if m not in candidate:
        reasons.append(RuleResult("primary_metric", False, f"primary metric {m} was not measured"))
        return Decision(False, tuple(reasons))

    if base is not None and m in base:
        gain = improvement(m, candidate[m], base[m], policy)
        ok = gain >= policy.min_gain_over_base
        reasons.append(RuleResult("beats_base", ok,
                                  f"{m} {candidate[m]:.4f} vs base {base[m]:.4f}: gain {gain:+.4f} "
                                  f"{'>=' if ok else '<'} required {policy.min_gain_over_base}"))

    if champion is None or m not in champion:
        reasons.append(RuleResult("beats_champion", True, "no champion yet: first model"))
    else:
        gain = improvement(m, candidate[m], champion[m], policy)
        ok = gain >= policy.min_improvement
        reasons.append(RuleResult("beats_champion", ok,
                                  f"{m} {candidate[m]:.4f} vs champion {champion[m]:.4f}: "
                                  f"improvement {gain:+.4f} {'>=' if ok else '<'} required "
                                  f"{policy.min_improvement}"))

    if policy.min_win_rate is not None:
        rate = candidate.get("win_rate")
        if champion is None:
            reasons.append(RuleResult("win_rate", True, "no champion yet: no preference win rate to check"))
        elif rate is None:
            reasons.append(RuleResult("win_rate", False, "win_rate was not measured: the test set holds no "
                                      f"preference pairs (required {policy.min_win_rate})"))
        else:
            ok = rate >= policy.min_win_rate
            reasons.append(RuleResult("win_rate", ok, f"the candidate's chosen-over-rejected log-ratio beats the "
                                      f"champion's on {rate:.1%} of preference pairs {'>=' if ok else '<'} "
                                      f"required {policy.min_win_rate:.0%}"))

    if policy.max_forgetting is not None:
        if not forgotten:
            reasons.append(RuleResult("forgetting", True, "no earlier test set to forget"
                                      if forgotten is not None else "no champion to compare earlier test sets with"))
        else:
            worst = max(forgotten, key=forgotten.get)
            ok = forgotten[worst] <= policy.max_forgetting
            reasons.append(RuleResult("forgetting", ok,
                                      f"largest {policy.forgetting_on} drop vs champion on an earlier test set: "
                                      f"{forgotten[worst]:.4f} on {worst} ({len(forgotten)} sets) "
                                      f"{'<=' if ok else '>'} allowed {policy.max_forgetting}"))
    reasons += slice_rules(candidate, champion, policy)
    reasons += behaviour_rules(behaviour[0] if behaviour else None, behaviour[1] if behaviour else None,
                               policy.behaviour)
    return Decision(all(r.passed for r in reasons), tuple(reasons))
