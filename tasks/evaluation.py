"""Prefect task: score base, candidate and champion on the same current test set, and
candidate and champion on every earlier test set; log it all to the run."""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from ftpipe.config import EvalConfig, ModelConfig, RegistryConfig
from ftpipe.evaluation.compare import EvalReport, evaluate_all, log_evaluation


@task(name="check-suites", cache_policy=NO_CACHE)
def check_suites(cfg: EvalConfig, reg: RegistryConfig, root: str) -> int:
    """The behaviour suites read and checked before anything trains: a malformed case fails
    the run naming its file and line. Returns the number of cases."""
    from ftpipe.evaluation.behaviour import project_suites

    return sum(len(s.cases) for s in project_suites(cfg.behaviour_dir, reg.promotion.behaviour, Path(root)))


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate(cfg: EvalConfig, model: ModelConfig, reg: RegistryConfig, base_path: str, candidate_dir: str,
             test_path: str, max_seq_len: int, run_id: str, root: str, train_path: str | None = None) -> EvalReport:
    """train_path: the rows the candidate trained on, the source of the memorisation probes."""
    from ftpipe.evaluation.behaviour import memorisation_suite, project_suites

    suites = project_suites(cfg.behaviour_dir, reg.promotion.behaviour, Path(root))
    probes = memorisation_suite(Path(train_path), Path(root), cfg.memorisation_probes) \
        if train_path and cfg.memorisation_probes else None
    suites += [probes] if probes else []
    report = evaluate_all(cfg, model, reg, base_path, candidate_dir, test_path, max_seq_len,
                          Path(root) / "runs" / "regression", log=get_run_logger().info, suites=suites)
    log_evaluation(run_id, report, Path(root) / "runs" / f"eval-{run_id[:12]}")
    return report
