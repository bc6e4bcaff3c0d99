"""Prefect tasks of training: the plan, the fine-tune (cached by recipe and data, so a run
started again after a crash past training gets the result back; checkpoints cover a crash
during it), and putting the training on the run."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import CachePolicy

from ftpipe.config import LoraConfig, ModelConfig, PipelineConfig
from ftpipe.data.versions import DataVersion
from ftpipe.registry import runs
from ftpipe.training.plan import TrainingPlan, stage_plan
from ftpipe.training.recipe import TrainResult, training_dir
from tasks.io import io_task
from ftpipe import names as t


@io_task("plan-training")
def plan_training(cfg: PipelineConfig, data: DataVersion, run_id: str, root: str,
                  require_new_data: bool) -> TrainingPlan:
    """Scratch, from the champion, or skip, and why (ftpipe.training.plan); what is new goes
    on the run, and an incremental run's training file with it (the lineage pins its sha256)."""
    from ftpipe.lineage.record import TRAIN_FILE_ARTIFACT
    from ftpipe.registry.store import client
    from ftpipe.training.plan import plan_training as decide

    plan = decide(data, cfg.registry, cfg.incremental, cfg.train, cfg.schedule.min_new_rows, cfg.hash(),
                  Path(root), require_new_data, cfg.data.remote)
    inc = plan.increment
    client().set_tag(run_id, t.RUN_NEW_ROWS, str(inc.new_rows))
    get_run_logger().info(f"new rows since {inc.champion or 'no champion'}: {inc.new_rows}; {inc.reason}"
                          + (f"; {plan.skip}" if plan.skip else ""))
    if inc.train_path:
        client().log_artifact(run_id, inc.train_path, str(Path(TRAIN_FILE_ARTIFACT).parent))
    return plan


@dataclass
class TrainingCache(CachePolicy):
    """A training's cache key is its recipe and its data (training_dir's key), never the run."""

    def compute_key(self, task_ctx, inputs, flow_parameters, **kwargs) -> str:
        return _training_dir(inputs["model"], inputs["lora"], inputs["plan"], inputs["root"]).name


def _training_dir(model: ModelConfig, lora: LoraConfig, plan: TrainingPlan, root: str) -> Path:
    """runs/train-KEY of this plan: the recipe (from the plan's start weights) and the data."""
    return training_dir(root, model.model_copy(update={"base": plan.base_path}), lora, plan.train, plan.data_key,
                        plan.base_source, plan.base_revision)


def result_store(root: str) -> Path:
    """Where Prefect persists cached task results: inside the project, so a CLI run and a
    served deployment's run of the same project share them (JSON, never pickle)."""
    path = Path(root) / "runs" / "prefect-results"
    path.mkdir(parents=True, exist_ok=True)
    return path


@task(name="fine-tune", cache_policy=TrainingCache(), persist_result=True, result_serializer="json")
def fine_tune(model: ModelConfig, lora: LoraConfig, plan: TrainingPlan, run_id: str, root: str,
              val_batch_size: int = 64) -> TrainResult:
    """Train (or resume from the last checkpoint); metrics stream to the run that trains."""
    from ftpipe.training.launch import train

    logger = get_run_logger()
    stream = runs.metrics_streamer(run_id, logger.warning)
    result = train(model.model_copy(update={"base": plan.base_path}), lora, plan.train, plan.splits["train"],
                   plan.splits["validation"], _training_dir(model, lora, plan, root), log=logger.info,
                   on_metrics=lambda step, metrics: stream(plan.first_step + step, metrics),
                   val_batch_size=val_batch_size, start_adapter=plan.start_adapter)
    if result.resumed_from:
        logger.info(f"resumed from the checkpoint at step {result.resumed_from}")
    return result


def train_candidate(model: ModelConfig, lora: LoraConfig, plan: TrainingPlan, run_id: str, root: str,
                    val_batch_size: int = 64) -> TrainResult:
    """The candidate of this flow run: trained, resumed, or (same recipe and data, weights
    still on disk) the cached result of an earlier run. val_batch_size: eval.batch_size.
    A staged plan (train.stages) trains each stage so, in order, from the one before it."""
    if not plan.stages:
        return _train_once(model, lora, plan, run_id, root, val_batch_size)
    results: list[TrainResult] = []
    for i, train in enumerate(plan.stages):
        get_run_logger().info(f"stage {i + 1}/{len(plan.stages)}: {train.objective}, {train.max_steps} steps"
                              + (f", from stage {i}'s weights" if results else ""))
        results.append(_train_once(model, lora, stage_plan(plan, i, results[-1] if results else None), run_id,
                                   root, val_batch_size))
    return TrainResult.chained(results, [t.objective for t in plan.stages])


def _train_once(model: ModelConfig, lora: LoraConfig, plan: TrainingPlan, run_id: str, root: str,
                val_batch_size: int) -> TrainResult:
    cached = fine_tune.with_options(result_storage=result_store(root))
    result = cached(model, lora, plan, run_id, root, val_batch_size)
    gone = not (Path(result.model_dir) / "config.json").is_file()
    if gone:
        get_run_logger().warning(f"the cached training's weights are gone ({result.model_dir}): training again")
    # gone, or cached where a copy of this project was: this project's own folder (found there, or trained)
    if gone or Path(result.model_dir).resolve().parent != _training_dir(model, lora, plan, root).resolve():
        result = cached.with_options(refresh_cache=True)(model, lora, plan, run_id, root, val_batch_size)
    return result


@io_task("log-training")
def log_training(run_id: str, result: TrainResult) -> None:
    """The training on this run, once the run goes on (a run that ends skipped carries none)."""
    runs.log_training(run_id, result, get_run_logger().info)
