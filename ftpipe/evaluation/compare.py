"""Base, candidate and champion compared on the same test sets, against the registry.

    report = evaluate_all(...)        # base, candidate, champion on the current test set, and
                                      # candidate + champion on every earlier test set
    log_evaluation(run_id, report)    # metrics, per-example table, plot, the test set itself

Every earlier data version's test set is a regression set: each registered version's run
carries its test set as the artifact eval/test_set.jsonl and its sha256 as the version tag
ftpipe.test_set (found through an index kept in a cache folder).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

from ftpipe.config import EvalConfig, ModelConfig, RegistryConfig
from ftpipe.evaluation.metrics import ModelScores, preference_metrics
from ftpipe.evaluation.scoring import evaluate_model
from ftpipe.files import read_jsonl, sha256_path
from ftpipe.names import PREFERENCE_METRICS, SLICE_METRICS
from ftpipe.names import TEST_SET as TEST_SET_TAG
from ftpipe.registry import store as registry
from ftpipe.registry.promotion import forgetting

TEST_SET_ARTIFACT = "eval/test_set.jsonl"


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
    suites: list = field(default_factory=list)       # behaviour.Suite run on candidate and champion

    def behaviour(self) -> tuple[list, list | None] | None:
        """(candidate's case results, champion's or None) for the gate; None: no suite."""
        if not self.suites:
            return None
        return self.candidate.behaviour, self.champion.behaviour if self.champion else None

    def forgetting(self, reg: RegistryConfig) -> dict[str, float] | None:
        """Drop of the primary metric vs the champion per earlier test set; None: no champion."""
        if self.champion is None:
            return None
        return forgetting({k: v.metrics() for k, v in self.candidate_regression.items()},
                          {k: v.metrics() for k, v in self.champion_regression.items()}, reg.promotion)


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
        if not cached.is_file() or sha256_path(cached) != sha:
            tmp = Path(registry.scratch_dir("ftpipe-regression-"))
            try:
                got = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=TEST_SET_ARTIFACT,
                                                          dst_path=str(tmp))
                if sha256_path(got) != sha:
                    log(f"regression set of v{version}: artifact does not match its sha256 {sha[:12]}; skipped")
                    continue
                shutil.copyfile(got, cached)
            except Exception as exc:  # noqa: BLE001 - a lost artifact must not stop the gate
                log(f"regression set of v{version} ({sha[:12]}) could not be downloaded: {exc}; skipped")
                continue
            finally:
                registry.remove(tmp)
        out[f"v{version}:{sha[:12]}"] = read_jsonl(cached)
    return out


def score_version(reg: RegistryConfig, version: str, rows: list[dict], regression: dict[str, list[dict]],
                  cfg: EvalConfig, max_seq_len: int, suites: list | None = None
                  ) -> tuple[ModelScores, dict[str, ModelScores]]:
    tmp = registry.scratch_dir("ftpipe-champion-")
    try:
        local = registry.download_model(reg.model_name, version, tmp)
        return evaluate_model(local.model_dir, rows, cfg, max_seq_len, name=f"champion v{version}",
                              regression=regression, adapter=local.adapter_dir, suites=suites)
    finally:
        registry.remove(tmp)


def evaluate_all(cfg: EvalConfig, model: ModelConfig, reg: RegistryConfig, base_path: str,
                 candidate_dir: str, test_path: str, max_seq_len: int, cache_dir: Path,
                 log: Callable[[str], None] = print, suites: list | None = None) -> EvalReport:
    """suites: behaviour suites run on the candidate and the champion."""
    rows = read_jsonl(Path(test_path))
    sha = sha256_path(test_path)
    regression = regression_sets(reg.model_name, sha, cache_dir, log)
    if regression:
        log(f"regression sets: {', '.join(f'{k} ({len(v)} rows)' for k, v in regression.items())}")
    base = evaluate_model(base_path, rows, cfg, max_seq_len, model.revision, model.trust_remote_code, name="base",
                         allow_pickle_weights=model.allow_pickle_weights)
    candidate, cand_reg = evaluate_model(candidate_dir, rows, cfg, max_seq_len, name="candidate",
                                         regression=regression, suites=suites)
    champ = registry.version_by_alias(reg.model_name, registry.CHAMPION)
    champion, champ_reg = (score_version(reg, champ.version, rows, regression, cfg, max_seq_len, suites)
                           if champ else (None, {}))
    if candidate.pair_logratios:     # preference pairs: rewards relative to the base, the candidate vs the champion
        candidate = replace(candidate, relative=preference_metrics(
            candidate.pair_logratios, base.pair_logratios, champion.pair_logratios if champion else None))
        if champion is not None:
            champion = replace(champion, relative=preference_metrics(champion.pair_logratios, base.pair_logratios))
    for label, s in (("base", base), ("candidate", candidate), ("champion", champion)):
        if s is not None:
            prefs = "".join(f", {k.replace('_', ' ')} {v:.3f}" for k, v in s.metrics().items()
                            if k in PREFERENCE_METRICS)
            log(f"{label}: exact match {s.exact_match:.3f}, token F1 {s.token_f1:.3f}, ROUGE-L "
                f"{s.rouge_l:.3f}, eval loss {s.eval_loss:.4f}{prefs} on {s.n_examples} test examples"
                + (f" ({len(s.pair_logratios)} preference pairs)" if s.pair_logratios else ""))
    if suites:
        from ftpipe.evaluation.behaviour import pass_rates

        for label, s in (("candidate", candidate), ("champion", champion)):
            if s is not None:
                rates = pass_rates(s.behaviour)
                log(f"{label} behaviour: {sum(r.passed for r in s.behaviour)}/{len(s.behaviour)} cases pass ("
                    + ", ".join(f"{t} {v:.0%}" for t, v in rates.items() if t != "all") + ")")
    return EvalReport(str(test_path), sha, base, candidate, champion, champ.version if champ else None,
                      cand_reg, champ_reg, list(suites or []))


def plot_comparison(report: EvalReport, path: Path) -> Path:
    """Base vs candidate vs champion, one panel per metric."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(SLICE_METRICS)
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
    from mlflow.entities import Metric

    import mlflow

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
    if report.suites:
        from ftpipe.evaluation.behaviour import pass_rates

        for label, s in (("candidate", report.candidate), ("champion", report.champion)):
            if s is not None:
                metrics += [Metric(f"{label}_behaviour_pass_rate" if tag == "all" else f"behaviour.{tag}.{label}_pass_rate",
                                   float(v), now, 0) for tag, v in pass_rates(s.behaviour).items()]
    for i in range(0, len(metrics), 900):
        c.log_batch(run_id, metrics=metrics[i: i + 900])
    preds = report.candidate.predictions
    mlflow.log_table({k: [p[k] for p in preds] for k in preds[0]}, artifact_file="eval/candidate_predictions.json",
                     run_id=run_id)
    out_dir.mkdir(parents=True, exist_ok=True)
    if report.suites:   # per case: what each model said and why it failed; and the suites themselves
        champ = {r.case: r for r in (report.champion.behaviour if report.champion else [])}
        cases = report.candidate.behaviour
        mlflow.log_table({"case": [r.case for r in cases], "tags": [",".join(r.tags) for r in cases],
                          "passed": [r.passed for r in cases], "answer": [r.answer for r in cases],
                          "failures": ["; ".join(r.failures) for r in cases],
                          "champion_passed": [champ[r.case].passed if r.case in champ else None for r in cases]},
                         artifact_file="eval/behaviour.json", run_id=run_id)
        doc = {"suites": [{"name": s.name, "file": s.file, "sha256": s.sha256, "cases": len(s.cases)}
                          for s in report.suites],
               "candidate": [r.as_dict() for r in cases],
               "champion": [r.as_dict() for r in champ.values()] if report.champion else None}
        (out_dir / "behaviour_results.json").write_text(json.dumps(doc, indent=2))
        c.log_artifact(run_id, str(out_dir / "behaviour_results.json"), "eval")
    c.log_artifact(run_id, str(plot_comparison(report, out_dir / "metrics_comparison.png")), "eval")
    copy = out_dir / "test_set.jsonl"
    if Path(report.test_set).resolve() != copy.resolve():
        shutil.copyfile(report.test_set, copy)
    c.log_artifact(run_id, str(copy), "eval")
    c.set_tag(run_id, TEST_SET_TAG, report.test_sha)
