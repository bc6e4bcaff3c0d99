"""Prefect task: fine-tune (ftpipe.training.launch.train: in-process, or torchrun for several
devices), streaming metrics to MLflow and logging the loss curve."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from dataclasses import dataclass

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE, CachePolicy

from ftpipe.config import LoraConfig, ModelConfig, TrainConfig
from ftpipe.training.launch import train
from ftpipe.registry.store import client
from ftpipe.training.recipe import TrainResult


def training_dir(root: str, model: ModelConfig, lora: LoraConfig, train_cfg: TrainConfig,
                 data_hash: str) -> Path:
    """Where a training run keeps its checkpoints: keyed by the recipe and the data, so a
    crashed `ftpipe run` started again finds and resumes its own checkpoints."""
    key = json.dumps([model.model_dump(mode="json"), lora.model_dump(mode="json"),
                      train_cfg.model_dump(mode="json"), data_hash], sort_keys=True)
    return Path(root) / "runs" / f"train-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def plot_loss(result: TrainResult, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    if result.loss_history:
        ax.plot(*zip(*result.loss_history), label="train loss")
    if result.val_history:
        ax.plot(*zip(*result.val_history), "o-", label="validation loss")
    if result.best_step:
        ax.axvline(result.best_step, color="grey", linestyle=":", label=f"best (step {result.best_step})")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (completion tokens)")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title(f"{result.method}: {result.steps} steps, {result.tokens:,} tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


@dataclass
class TrainingCache(CachePolicy):
    """A training's cache key is its recipe and its data (training_dir's key), never the run:
    a flow run started again after a crash past training gets the finished result back from
    the project's result store instead of training again (checkpoints cover a crash during)."""

    def compute_key(self, task_ctx, inputs, flow_parameters, **kwargs) -> str:
        model = inputs["model"].model_copy(update={"base": inputs["base_path"]})
        return training_dir(inputs["root"], model, inputs["lora"], inputs["train_cfg"], inputs["data_hash"]).name


def result_store(root: str) -> Path:
    """Where Prefect persists cached task results: inside the project, so a CLI run and a
    served deployment's run of the same project share them (JSON, never pickle)."""
    path = Path(root) / "runs" / "prefect-results"
    path.mkdir(parents=True, exist_ok=True)
    return path


@task(name="fine-tune", cache_policy=TrainingCache(), persist_result=True, result_serializer="json")
def fine_tune(model: ModelConfig, lora: LoraConfig, train_cfg: TrainConfig, base_path: str,
              splits: dict[str, str], run_id: str, root: str, data_hash: str) -> TrainResult:
    """Train (or resume from the last checkpoint); metrics stream to the run that trains."""
    logger = get_run_logger()
    mlflow_client = client()

    unreachable = []

    def on_metrics(step: int, metrics: dict) -> None:
        # Training never dies because MLflow does: the history is in the result, and
        # log-training copies what did not get through once MLflow answers again.
        if unreachable:
            return
        try:
            for key, value in metrics.items():
                mlflow_client.log_metric(run_id, key, value, step=step)
        except Exception as exc:   # noqa: BLE001
            unreachable.append(step)
            logger.warning(f"MLflow did not take the metrics of step {step} ({type(exc).__name__}: "
                           f"{str(exc)[:200]}); training goes on, the history is logged after training")

    model = model.model_copy(update={"base": base_path})
    out_dir = training_dir(root, model, lora, train_cfg, data_hash)
    result = train(model, lora, train_cfg, splits["train"], splits["validation"], out_dir,
                   log=logger.info, on_metrics=on_metrics)
    if result.resumed_from:
        logger.info(f"resumed from the checkpoint at step {result.resumed_from}")
    return result


def train_candidate(model: ModelConfig, lora: LoraConfig, train_cfg: TrainConfig, base_path: str,
                    splits: dict[str, str], run_id: str, root: str, data_hash: str) -> TrainResult:
    """The candidate of this flow run: trained, resumed, or (same recipe and data, weights
    still on disk) the cached result of an earlier run. log_training puts it on the run once
    the flow knows the run goes on (a run that ends skipped carries no reused metrics)."""
    args = (model, lora, train_cfg, base_path, splits, run_id, root, data_hash)
    cached = fine_tune.with_options(result_storage=result_store(root))
    result = cached(*args)
    if not (Path(result.model_dir) / "config.json").is_file():   # cached, but the weights are gone
        get_run_logger().warning(f"the cached training's weights are gone ({result.model_dir}): training again")
        result = cached.with_options(refresh_cache=True)(*args)
    return result


@task(name="log-training", cache_policy=NO_CACHE)
def log_training(run_id: str, result: TrainResult) -> TrainResult:
    mlflow_client = client()
    out_dir = Path(result.model_dir).parent
    logged = {m.step for m in mlflow_client.get_metric_history(run_id, "train_loss")}
    missing = [(step, loss) for step, loss in result.loss_history if step not in logged]
    if missing:   # trained by an earlier flow run, or MLflow was away while training
        get_run_logger().info(f"{len(missing)} of {len(result.loss_history)} loss points of {out_dir.name} "
                              "were not on this run (trained earlier, or MLflow was unreachable): logged now")
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        points = [Metric("train_loss", loss, now, step) for step, loss in missing]
        val_logged = {m.step for m in mlflow_client.get_metric_history(run_id, "val_loss")}
        points += [Metric("val_loss", loss, now, step) for step, loss in result.val_history
                   if step not in val_logged]
        for i in range(0, len(points), 1000):
            mlflow_client.log_batch(run_id, metrics=points[i:i + 1000])
    mlflow_client.log_metric(run_id, "train_seconds", result.seconds)
    mlflow_client.log_metric(run_id, "train_tokens", result.tokens)
    if result.val_loss is not None:
        mlflow_client.log_metric(run_id, "val_loss", result.val_loss)
    mlflow_client.log_artifact(run_id, str(plot_loss(result, out_dir / "loss_curve.png")), "train")
    mlflow_client.log_artifact(run_id, str(out_dir / "train_result.json"), "train")
    return result
