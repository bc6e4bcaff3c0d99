"""The MLflow run of one flow run: started with the whole config, metrics streamed during
training (never fatal), the training logged once the run goes on, a skip recorded, the run
finished or marked failed."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

from ftpipe import names as t
from ftpipe.config import PipelineConfig
from ftpipe.registry import store


def _flatten(d: dict, prefix: str = "") -> dict[str, str]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = json.dumps(v) if isinstance(v, (list, dict)) else str(v)
    return out


def start_run(cfg: PipelineConfig, root: Path, flow_run_id: str, kind: str = "retrain") -> str:
    """One MLflow run per flow run (kind: retrain or sweep), tagged with it; the whole config is
    logged once, here."""
    import yaml
    from mlflow.entities import Param


    exp_id = store.setup(cfg.registry, root)
    c = store.client()
    run = c.create_run(exp_id, run_name=f"{kind}-{flow_run_id[:8]}",
                       tags={t.PREFECT_FLOW_RUN: flow_run_id, t.CONFIG_HASH: cfg.hash()})
    doc = cfg.model_dump(mode="json")
    c.log_batch(run.info.run_id, params=[Param(k, v[:6000]) for k, v in _flatten(doc).items()])
    c.log_text(run.info.run_id, yaml.safe_dump(doc, sort_keys=False), "config/params.yaml")
    return run.info.run_id


def metrics_streamer(run_id: str, warn: Callable[[str], None]) -> Callable[[int, dict], None]:
    """on_metrics for training: each logging step's metrics to the run. Training never dies
    because MLflow does: after the first failure it stops trying (the history is in the
    result, and log_training copies what did not get through)."""
    client = store.client()
    failed: list[int] = []

    def on_metrics(step: int, metrics: dict) -> None:
        if failed:
            return
        try:
            for key, value in metrics.items():
                client.log_metric(run_id, key, value, step=step)
        except Exception as exc:   # noqa: BLE001
            failed.append(step)
            warn(f"MLflow did not take the metrics of step {step} ({type(exc).__name__}: {str(exc)[:200]}); "
                 "training goes on, the history is logged after training")
    return on_metrics


def plot_loss(result, path: Path) -> Path:
    """Train (and validation) loss against steps, log scale, the best step marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    stages = getattr(result, "stages", None) or []
    for i, stage in enumerate(stages):   # a staged run: each stage's curve in its own colour
        end = stages[i + 1]["first_step"] if i + 1 < len(stages) else float("inf")
        part = [(s, v) for s, v in result.loss_history if stage["first_step"] <= s < end]
        if part:
            ax.plot(*zip(*part), label=f"stage {stage['stage']}: {stage['objective']} train loss")
    if result.loss_history and not stages:
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


def log_training(run_id: str, result, log: Callable[[str], None] = print) -> None:
    """The training on the run: loss points it lacks (trained by an earlier flow run, or
    MLflow was away), time, tokens, validation loss, the loss curve and the result file."""
    from mlflow.entities import Metric

    c = store.client()
    out_dir = Path(result.model_dir).parent
    logged = {m.step for m in c.get_metric_history(run_id, "train_loss")}
    missing = [(step, loss) for step, loss in result.loss_history if step not in logged]
    if missing:
        log(f"{len(missing)} of {len(result.loss_history)} loss points of {out_dir.name} were not on this run "
            "(trained earlier, or MLflow was unreachable): logged now")
        now = int(time.time() * 1000)
        val_logged = {m.step for m in c.get_metric_history(run_id, "val_loss")}
        points = [Metric("train_loss", loss, now, step) for step, loss in missing]
        points += [Metric("val_loss", loss, now, step) for step, loss in result.val_history if step not in val_logged]
        for i in range(0, len(points), 1000):
            c.log_batch(run_id, metrics=points[i:i + 1000])
    c.log_metric(run_id, "train_seconds", result.seconds)
    c.log_metric(run_id, "train_tokens", result.tokens)
    if result.val_loss is not None:
        c.log_metric(run_id, "val_loss", result.val_loss)
    c.log_artifact(run_id, str(plot_loss(result, out_dir / "loss_curve.png")), "train")
    c.log_artifact(run_id, str(out_dir / "train_result.json"), "train")
    for stage in getattr(result, "stages", None) or []:   # a staged run (train.stages): each stage's own
        i = stage["stage"]
        c.log_batch(run_id, metrics=[Metric(f"stage{i}_{k}", float(stage[k]), int(time.time() * 1000), 0)
                                     for k in ("train_loss", "val_loss", "steps") if stage[k] is not None])
        c.log_artifact(run_id, str(Path(stage["dir"]) / "train_result.json"), f"train/stage{i}")
    if getattr(result, "stages", None):
        c.set_tag(run_id, t.RUN_STAGES, " -> ".join(
            f"{s['stage']}: {s['objective']} steps {s['first_step']}-{s['first_step'] + s['steps'] - 1}"
            for s in result.stages))


def record_skip(run_id: str, message: str, champion: str | None) -> str:
    """A run that trains nothing says why, on the run and its MLflow note; returns the line."""
    line = f"{message}" + (f" (champion: {champion})" if champion else "")
    c = store.client()
    c.set_tag(run_id, t.RUN_SKIPPED, message)
    c.set_tag(run_id, "mlflow.note.content", f"{line}; nothing trained")
    return f"{line}: nothing trained, no alias moved"


def finish_run(run_id: str, status: str = "FINISHED") -> None:
    store.client().set_terminated(run_id, status=status)


def runs_of_flow_run(flow_run_id: str) -> list[str]:
    """The MLflow runs (still RUNNING) that a flow run started, found by their tag."""

    c = store.client()
    exps = [e.experiment_id for e in c.search_experiments()]
    found = c.search_runs(exps, filter_string=f"tags.`{t.PREFECT_FLOW_RUN}` = '{flow_run_id}' "
                                              "and attributes.status = 'RUNNING'") if exps else []
    return [r.info.run_id for r in found]


def log_trial(parent_run_id: str, outcome: dict, study: str) -> str:
    """A sweep trial as a child run of the sweep's run: its parameters, loss curve, objective
    and state (complete, pruned, fail); returns the child run's id."""
    from mlflow.entities import Metric, Param, RunTag

    c = store.client()
    parent = c.get_run(parent_run_id)
    run = c.create_run(parent.info.experiment_id, run_name=f"trial-{outcome['number']}", tags={
        "mlflow.parentRunId": parent_run_id, t.SWEEP_STUDY: study, t.SWEEP_TRIAL: str(outcome["number"]),
        t.SWEEP_STATE: outcome["state"]})
    now = int(time.time() * 1000)
    points = [Metric(key, float(v), now, int(step)) for key in ("train_loss", "val_loss")
              for step, v in outcome.get("history", {}).get(key, [])]
    if outcome.get("value") is not None and outcome["state"] == "complete":   # a pruned trial's is a midway loss
        points.append(Metric(f"objective_{outcome['objective']}", float(outcome["value"]), now, 0))
    params = [Param(k, str(v)) for k, v in outcome.get("params", {}).items()]
    params += [Param("training_dir", Path(outcome.get("training_dir", "")).name)]
    tags = [RunTag("mlflow.note.content", outcome["message"])] if outcome.get("message") else []
    for i in range(0, max(len(points), 1), 1000):
        c.log_batch(run.info.run_id, metrics=points[i:i + 1000], params=params if i == 0 else [],
                    tags=tags if i == 0 else [])
    status = {"complete": "FINISHED", "pruned": "KILLED"}.get(outcome["state"], "FAILED")
    c.set_terminated(run.info.run_id, status=status)
    return run.info.run_id

