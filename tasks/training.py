"""Prefect task: fine-tune (wraps ftpipe.training.fine_tune, streams metrics to MLflow)."""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from ftpipe.config import LoraConfig, ModelConfig, TrainConfig
from ftpipe.registry import client
from ftpipe.training import TrainResult, fine_tune


@task(name="fine-tune", cache_policy=NO_CACHE)
def train_candidate(model: ModelConfig, lora: LoraConfig, train: TrainConfig, base_path: str,
                    splits: dict[str, str], run_id: str, out_dir: str) -> TrainResult:
    logger = get_run_logger()
    mlflow_client = client()

    def on_metrics(step: int, metrics: dict) -> None:
        for key, value in metrics.items():
            mlflow_client.log_metric(run_id, key, value, step=step)

    result = fine_tune(model.model_copy(update={"base": base_path}), lora, train,
                       splits["train"], splits["validation"], Path(out_dir),
                       log=logger.info, on_metrics=on_metrics)
    mlflow_client.log_metric(run_id, "train_seconds", result.seconds)
    if result.val_loss is not None:
        mlflow_client.log_metric(run_id, "val_loss", result.val_loss)
    return result
