"""Prefect task: score base, candidate and champion on the same current test set."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from ftpipe import registry
from ftpipe.config import EvalConfig, ModelConfig, RegistryConfig
from ftpipe.evaluation import ModelScores, evaluate_model
from ftpipe.training import read_jsonl


@dataclass(frozen=True)
class EvalReport:
    test_set: str
    base: ModelScores
    candidate: ModelScores
    champion: ModelScores | None
    champion_version: str | None


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate_all(cfg: EvalConfig, model: ModelConfig, reg: RegistryConfig, base_path: str,
                 candidate_dir: str, test_path: str, max_seq_len: int, run_id: str) -> EvalReport:
    logger = get_run_logger()
    rows = read_jsonl(test_path)
    base = evaluate_model(base_path, rows, cfg, max_seq_len, model.revision,
                          model.trust_remote_code, name="base")
    candidate = evaluate_model(candidate_dir, rows, cfg, max_seq_len, name="candidate")
    champ = registry.version_by_alias(reg.model_name, registry.CHAMPION)
    champion = None
    if champ is not None:
        tmp = registry.scratch_dir("ftpipe-champion-")
        try:
            champion = evaluate_model(registry.download_model(reg.model_name, champ.version, tmp),
                                      rows, cfg, max_seq_len, name=f"champion v{champ.version}")
        finally:
            registry.remove(tmp)
    c = registry.client()
    for label, scores in (("base", base), ("candidate", candidate), ("champion", champion)):
        if scores is None:
            continue
        for key, value in scores.metrics().items():
            c.log_metric(run_id, f"{label}_{key}", value)
        logger.info(f"{label}: exact match {scores.exact_match:.3f}, eval loss "
                    f"{scores.eval_loss:.4f} on {scores.n_examples} test examples")
    import mlflow
    mlflow.log_table({k: [p[k] for p in candidate.predictions] for k in
                      ("prompt", "expected", "prediction", "correct")},
                     artifact_file="eval/candidate_predictions.json", run_id=run_id)
    return EvalReport(str(Path(test_path)), base, candidate, champion,
                      champ.version if champ else None)
