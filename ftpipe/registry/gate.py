"""Evaluation against the registry and the promotion gate, as plain functions over MLflow.

    report = evaluate_all(...)        # base, candidate, champion on the same test set, and
                                      # candidate + champion on every earlier test set
    log_evaluation(run_id, report)    # metrics, per-example table, plots, the test set
    result = gate_and_promote(...)    # under the registry lock: re-check the champion,
                                      # re-score a new one, decide, move the alias, record

The decision itself is ftpipe.registry.promotion.decide (pure). Every earlier data version's test
set is a regression set: each registered version's run carries its test set as the
artifact eval/test_set.jsonl and its sha256 as the version tag ftpipe.test_set.
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import json
import os
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

from ftpipe.registry import store as registry
from ftpipe.registry import tags as t
from ftpipe.config import EvalConfig, ModelConfig, RegistryConfig
from ftpipe.evaluation.scoring import ModelScores, evaluate_model
from ftpipe.registry.promotion import Decision, RuleResult, decide, forgetting

TEST_SET_ARTIFACT = "eval/test_set.jsonl"
TEST_SET_TAG = t.TEST_SET
KEY_METRICS = ("exact_match", "token_f1", "rouge_l", "eval_loss", "perplexity", "non_empty", "pii_outputs")


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class EvalReport:
    test_set: str
    test_sha: str
    base: ModelScores
    candidate: ModelScores
    champion: ModelScores | None
    champion_version: str | None
    candidate_regression: dict[str, ModelScores] = field(default_factory=dict)
    champion_regression: dict[str, ModelScores] = field(default_factory=dict)

    def forgetting(self, reg: RegistryConfig) -> dict[str, float] | None:
        """Drop of the primary metric vs the champion per earlier test set; None: no champion."""
        if self.champion is None:
            return None
        return forgetting({k: v.metrics() for k, v in self.candidate_regression.items()},
                          {k: v.metrics() for k, v in self.champion_regression.items()}, reg.promotion)


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

def test_set_index(name: str, cache_dir: Path) -> dict[str, list]:
    """{test-set sha256: [first version tested on it, its run id]} for every version of the
    model. A version's test-set tag is written with the version and never changes, so the
    index is kept in cache_dir and only versions newer than the last one seen are read:
    one indexed query instead of listing every version (0.7 s at 1,000 versions)."""
    import mlflow

    key = hashlib.sha256(f"{mlflow.get_registry_uri()}|{name}".encode()).hexdigest()[:16]
    path = cache_dir / f"test-sets-{key}.json"
    try:
        index = json.loads(path.read_text())
        seen, first = int(index["max_version"]), index["first"]
    except (OSError, ValueError, KeyError, TypeError):
        seen, first = 0, {}
    newer = registry.client().search_model_versions(
        f"name='{name}'" + (f" and version_number > {seen}" if seen else ""), max_results=1000,
        order_by=["version_number ASC"])
    while True:
        for mv in newer:
            sha = (mv.tags or {}).get(TEST_SET_TAG)
            if sha and (sha not in first or int(mv.version) < first[sha][0]):
                first[sha] = [int(mv.version), mv.run_id]
            seen = max(seen, int(mv.version))
        if not newer.token:
            break
        newer = registry.client().search_model_versions(
            f"name='{name}' and version_number > {seen}", max_results=1000, order_by=["version_number ASC"])
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"max_version": seen, "first": first}))
    tmp.replace(path)
    return first


def regression_sets(name: str, exclude_sha: str, cache_dir: Path, log: Callable[[str], None] = print
                    ) -> dict[str, list[dict]]:
    """{"v3:1a2b3c4d5e6f": rows} for every distinct earlier test set of the model's versions
    (named after the first version that was tested on it), downloaded once into cache_dir
    and checked against its sha256."""
    import mlflow

    cache_dir.mkdir(parents=True, exist_ok=True)
    first = {sha: tuple(v) for sha, v in test_set_index(name, cache_dir).items() if sha != exclude_sha}
    out: dict[str, list[dict]] = {}
    for sha, (version, run_id) in sorted(first.items(), key=lambda kv: kv[1][0]):
        cached = cache_dir / f"{sha}.jsonl"
        if not cached.is_file() or file_sha256(cached) != sha:
            tmp = Path(registry.scratch_dir("ftpipe-regression-"))
            try:
                got = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=TEST_SET_ARTIFACT,
                                                          dst_path=str(tmp))
                if file_sha256(got) != sha:
                    log(f"regression set of v{version}: artifact does not match its sha256 {sha[:12]}; skipped")
                    continue
                shutil.copyfile(got, cached)
            except Exception as exc:  # noqa: BLE001 - a lost artifact must not stop the gate
                log(f"regression set of v{version} ({sha[:12]}) could not be downloaded: {exc}; skipped")
                continue
            finally:
                registry.remove(tmp)
        out[f"v{version}:{sha[:12]}"] = _read_jsonl(cached)
    return out


# ------------------------------------------------------------------ scoring

def score_version(reg: RegistryConfig, version: str, rows: list[dict], regression: dict[str, list[dict]],
                  cfg: EvalConfig, max_seq_len: int) -> tuple[ModelScores, dict[str, ModelScores]]:
    tmp = registry.scratch_dir("ftpipe-champion-")
    try:
        path = registry.download_model(reg.model_name, version, tmp)
        return evaluate_model(path, rows, cfg, max_seq_len, name=f"champion v{version}", regression=regression)
    finally:
        registry.remove(tmp)


def evaluate_all(cfg: EvalConfig, model: ModelConfig, reg: RegistryConfig, base_path: str,
                 candidate_dir: str, test_path: str, max_seq_len: int, cache_dir: Path,
                 log: Callable[[str], None] = print) -> EvalReport:
    rows = _read_jsonl(Path(test_path))
    sha = file_sha256(test_path)
    regression = regression_sets(reg.model_name, sha, cache_dir, log)
    if regression:
        log(f"regression sets: {', '.join(f'{k} ({len(v)} rows)' for k, v in regression.items())}")
    base = evaluate_model(base_path, rows, cfg, max_seq_len, model.revision, model.trust_remote_code, name="base",
                         allow_pickle_weights=model.allow_pickle_weights)
    candidate, cand_reg = evaluate_model(candidate_dir, rows, cfg, max_seq_len, name="candidate",
                                         regression=regression)
    champ = registry.version_by_alias(reg.model_name, registry.CHAMPION)
    champion, champ_reg = (score_version(reg, champ.version, rows, regression, cfg, max_seq_len)
                           if champ else (None, {}))
    for label, s in (("base", base), ("candidate", candidate), ("champion", champion)):
        if s is not None:
            log(f"{label}: exact match {s.exact_match:.3f}, token F1 {s.token_f1:.3f}, ROUGE-L "
                f"{s.rouge_l:.3f}, eval loss {s.eval_loss:.4f} on {s.n_examples} test examples")
    return EvalReport(str(test_path), sha, base, candidate, champion, champ.version if champ else None,
                      cand_reg, champ_reg)


# ------------------------------------------------------------------ logging

def plot_comparison(report: EvalReport, path: Path) -> Path:
    """Base vs candidate vs champion, one panel per metric."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["exact_match", "token_f1", "rouge_l", "eval_loss"]
    models = [("base", report.base), ("candidate", report.candidate)]
    if report.champion is not None:
        models.append((f"champion v{report.champion_version}", report.champion))
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3.4))
    colors = ["#9e9e9e", "#1f77b4", "#ff7f0e"]
    for ax, metric in zip(axes, names):
        values = [s.metrics()[metric] for _, s in models]
        bars = ax.bar(range(len(models)), values, color=colors[: len(models)])
        ax.set_xticks(range(len(models)), [m for m, _ in models], rotation=20, fontsize=8)
        ax.set_title(metric + (" (lower is better)" if metric == "eval_loss" else ""), fontsize=9)
        for b, v in zip(bars, values):
            ax.annotate(f"{v:.3f}", (b.get_x() + b.get_width() / 2, v), ha="center", va="bottom", fontsize=7)
    fig.suptitle(f"Test set: {report.candidate.n_examples} examples", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def log_evaluation(run_id: str, report: EvalReport, out_dir: Path) -> None:
    """Metrics for every model and set, the per-example predictions table, the comparison
    plot, and the test set itself (the next runs' regression set)."""
    import mlflow
    from mlflow.entities import Metric

    c = registry.client()
    now = int(time.time() * 1000)
    metrics = []
    for label, s in (("base", report.base), ("candidate", report.candidate), ("champion", report.champion)):
        if s is not None:
            metrics += [Metric(f"{label}_{k}", float(v), now, 0) for k, v in s.metrics().items()]
    for label, sets in (("candidate", report.candidate_regression), ("champion", report.champion_regression)):
        for sid, s in sets.items():
            safe = sid.replace(":", "_")
            metrics += [Metric(f"regression.{safe}.{label}_{k}", float(v), now, 0)
                        for k, v in s.metrics().items() if not k.startswith("slice.")]
    for i in range(0, len(metrics), 900):
        c.log_batch(run_id, metrics=metrics[i: i + 900])
    preds = report.candidate.predictions
    mlflow.log_table({k: [p[k] for p in preds] for k in preds[0]}, artifact_file="eval/candidate_predictions.json",
                     run_id=run_id)
    out_dir.mkdir(parents=True, exist_ok=True)
    c.log_artifact(run_id, str(plot_comparison(report, out_dir / "metrics_comparison.png")), "eval")
    copy = out_dir / "test_set.jsonl"
    if Path(report.test_set).resolve() != copy.resolve():
        shutil.copyfile(report.test_set, copy)
    c.log_artifact(run_id, str(copy), "eval")
    c.set_tag(run_id, TEST_SET_TAG, report.test_sha)


# ------------------------------------------------------------------ the gate

def gate_and_promote(reg: RegistryConfig, cfg: EvalConfig, run_id: str, version: str, report: EvalReport,
                     checks: dict[str, bool], max_seq_len: int, cache_dir: Path,
                     log: Callable[[str], None] = print) -> PromotionResult:
    """Decide and, if the decision is to promote, move `champion`, all under the registry's
    promotion lock. If the champion changed since the evaluation (another flow promoted),
    the new champion is scored on the same test sets and the decision is taken again."""
    name = reg.model_name
    redecided = False
    with registry.PromotionLock(name, holder=f"run {run_id} (v{version})",
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
                champ, champ_reg = score_version(reg, current_version, _read_jsonl(Path(report.test_set)),
                                                 regression, cfg, max_seq_len)
                report = replace(report, champion=champ, champion_version=current_version,
                                 champion_regression=champ_reg)
        decision = decide(report.candidate.metrics(), report.champion.metrics() if report.champion else None,
                          report.base.metrics(), reg.promotion, checks, report.forgetting(reg))
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
        c.set_tag(run_id, "ftpipe.decision", decision.verdict)
        c.set_tag(run_id, "ftpipe.decision.summary", decision.summary()[:5000])
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

def manual_promote(reg: RegistryConfig, version: str, reason: str, by: str | None = None,
                   log: Callable[[str], None] = print) -> dict:
    """`ftpipe promote VERSION --reason`: an override of the gate, recorded with its reason
    (history tag, version tags and description, and a record in the version's run)."""
    if not reason or not reason.strip():
        raise registry.RegistryError("a manual promotion needs --reason \"...\" (it is recorded)")
    c = registry.client()
    mv = _get_version(reg.model_name, version)
    with registry.PromotionLock(reg.model_name, holder=f"manual promote of v{version}",
                                timeout_s=reg.promotion.lock_timeout_s, log=log):
        current = registry.version_by_alias(reg.model_name, registry.CHAMPION)
        previous = current.version if current else None
        if previous == str(version):
            raise registry.RegistryError(f"{reg.model_name} v{version} is already champion")
        event = registry.record_champion(reg.model_name, str(version), "manual", reason.strip(), previous, by)
    gate_said = (mv.tags or {}).get(t.DECISION, "none")
    registry.tag_version(reg.model_name, str(version), {
        t.DECISION: "manual-promote", t.MANUAL_REASON: reason.strip(),
        "ftpipe.manual.by": event["by"], "ftpipe.manual.at": event["at"], "ftpipe.gate_decision": gate_said},
        description=f"Manual promotion by {event['by']} at {event['at']}: {reason.strip()} "
                    f"(gate had said: {gate_said}). " + (mv.description or ""))
    if mv.run_id:
        registry.log_dict_artifact(mv.run_id, event | {"gate_decision": gate_said},
                                   f"promotion/manual-{event['at'].replace(':', '')}.json")
    return event


def rollback(reg: RegistryConfig, reason: str = "", by: str | None = None,
             log: Callable[[str], None] = print) -> dict:
    """`ftpipe rollback`: the champion goes back to the one before it, recorded."""
    with registry.PromotionLock(reg.model_name, holder="rollback", timeout_s=reg.promotion.lock_timeout_s, log=log):
        current = registry.version_by_alias(reg.model_name, registry.CHAMPION)
        if current is None:
            raise registry.RegistryError(f"{reg.model_name} has no champion to roll back")
        stack = registry.champion_stack(registry.champion_history(reg.model_name))
        if stack and stack[-1] == current.version:
            stack = stack[:-1]
        stack = [v for v in stack if v != current.version]
        if not stack:
            raise registry.RegistryError(f"{reg.model_name}: v{current.version} is champion and there is "
                                         "no earlier champion to roll back to")
        target = stack[-1]
        event = registry.record_champion(reg.model_name, target, "rollback",
                                         reason.strip() or f"rollback from v{current.version}",
                                         current.version, by)
    registry.tag_version(reg.model_name, current.version, {"ftpipe.rolled_back": event["at"]})
    return event


def _get_version(name: str, version: str):
    from mlflow.exceptions import MlflowException

    try:
        return registry.client().get_model_version(name, str(version))
    except MlflowException:
        known = sorted(int(v.version) for v in registry.versions(name))   # int from SQLite, str over REST
        listed = ("…, " if len(known) > 20 else "") + ", ".join(map(str, known[-20:]))
        raise registry.RegistryError(f"{name} has no version {version} (versions: {listed or 'none yet'})") from None


def list_models(reg: RegistryConfig, limit: int | None = None) -> list[dict]:
    """The newest `limit` versions (all when None), newest first: aliases, the primary metric
    on the named test set it was scored on beside the champion's on the same set, the gate's
    decision and the rule that decided (registry_rest.version_row)."""
    from mlflow.exceptions import MlflowException

    m = reg.promotion.primary_metric
    # search results carry no aliases: the registered model has them all
    try:
        alias_map = registry.client().get_registered_model(reg.model_name).aliases or {}
    except MlflowException:
        return []
    by_version: dict[str, list[str]] = {}
    for alias, v in alias_map.items():
        by_version.setdefault(str(v), []).append(alias)
    from ftpipe.registry.rest import name_test_sets, version_row

    rows = [version_row(mv.version, mv.creation_timestamp, mv.tags or {}, by_version.get(str(mv.version), []),
                        mv.run_id, m)
            for mv in (registry.newest_versions(reg.model_name, limit) if limit else registry.versions(reg.model_name))]
    return name_test_sets(rows, lambda sha: min(int(v.version) for v in registry.versions_tagged(
        reg.model_name, {t.TEST_SET: sha})))
