"""One trial of a sweep, in its own process (a crash, an out-of-memory or a GPU stays its own):

    python -m ftpipe.sweeps.trial SPEC.json

It asks the study for a trial (the next sampled recipe, or a dead trial's enqueued retry),
trains that recipe on the training split, reports the validation loss at each evaluation
point (the pruner stops a trial worse than the median of earlier ones there), scores the
objective on the validation split, and writes what happened to the spec's `result` file.
The test split is not in the spec: no trial ever reads it.

Importable without prefect or mlflow: the Prefect task that starts it logs the MLflow run."""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
from pathlib import Path

import optuna
from filelock import FileLock

from ftpipe.config import EvalConfig, LoraConfig, ModelConfig, SweepConfig, TrainConfig
from ftpipe.sweeps.space import apply, suggest, with_eval_points
from ftpipe.sweeps.study import (OVER_BUDGET, WORKER, direction, needed, open_study, over_budget, trial_seed,
                                 worker_id)
from ftpipe.sweeps.study import budget as budget_of

TRIAL = "@@trial "     # the last line a trial process prints: its result as JSON


class OverBudget(RuntimeError):
    """Another worker started the study's last trial at the same moment."""


def objective_value(objective: str, result, val_path: str, spec: dict, cfg: SweepConfig) -> float:
    """The trial's score: its exported weights' validation loss, or a metric of generations on
    the first `objective_examples` validation rows."""
    if objective == "val_loss":
        return float(result.val_loss)
    from ftpipe.evaluation.scoring import evaluate_model
    from ftpipe.files import read_jsonl

    rows = read_jsonl(Path(val_path))[: cfg.objective_examples]
    eval_cfg = EvalConfig.model_validate(spec["eval"]).model_copy(update={"max_examples": None})
    model = ModelConfig.model_validate(spec["model"])
    scores = evaluate_model(result.model_dir, rows, eval_cfg, spec["max_seq_len"], model.revision,
                            model.trust_remote_code, "trial", allow_pickle_weights=model.allow_pickle_weights)
    return float(scores.metrics()[objective])


def run_trial(spec: dict) -> dict:
    """Run one trial of the study (or none, when the study has all it needs); its outcome."""
    from ftpipe.training.launch import train as train_recipe
    from ftpipe.training.recipe import training_dir

    cfg = SweepConfig.model_validate(spec["sweep"])
    space = cfg.params()
    url = os.path.expandvars(spec["storage"])
    lane = os.environ.get("FTPIPE_SWEEP_LANE", "main-0")      # this trial's slot (tasks/sweep.run_trial)
    study = open_study(url, spec["study"], cfg, space, create=False, seed=trial_seed(url, spec["study"], cfg, lane))
    budget = budget_of(cfg)
    if needed(study, budget) <= 0:
        return {"state": "not-needed", "message": f"the study has its {budget} trials"}
    model, lora0, train0 = (ModelConfig.model_validate(spec["model"]), LoraConfig.model_validate(spec["lora"]),
                            TrainConfig.model_validate(spec["train"]))
    minimize = direction(cfg.objective) == "minimize"
    out: dict = {"history": {"train_loss": [], "val_loss": []}}

    def objective(trial: optuna.Trial) -> float:
        out["number"] = trial.number
        trial.set_user_attr(WORKER, worker_id())
        trial.set_user_attr("message", "")          # a retried trial inherits its failed original's attrs
        if over_budget(study, trial.number, budget):
            trial.set_user_attr(OVER_BUDGET, True)
            raise OverBudget(f"trial {trial.number} is one more than the study's {budget}: another worker "
                             "took the last one")
        params = suggest(trial, space)
        out["params"] = params
        lora, train = apply(params, lora0, train0)
        train = with_eval_points(train, cfg)
        where = training_dir(spec["root"], model, lora, train, spec["data_key"], spec.get("base_source", ""),
                             spec.get("base_revision"))
        out["training_dir"] = str(where)
        trial.set_user_attr("training_dir", where.name)
        print(f"trial {trial.number}: " + ", ".join(f"{k}={v}" for k, v in params.items()), flush=True)

        def on_metrics(step: int, metrics: dict) -> None:
            for key in ("train_loss", "val_loss"):
                if key in metrics:
                    out["history"][key].append((step, metrics[key]))
            if "val_loss" in metrics:
                loss = metrics["val_loss"]
                trial.report(loss if minimize else -loss, step)   # a maximised metric: its median is of -loss
                if trial.should_prune():
                    raise optuna.TrialPruned(f"pruned at step {step}: validation loss {loss:.4f}, worse than "
                                             "the median of earlier trials there")

        try:
            # two trials of one recipe (a grid point drawn twice by two workers): one trains, the other reuses
            with FileLock(str(where) + ".lock"):
                result = train_recipe(model, lora, train, spec["train_path"], spec["val_path"], where, log=print,
                                      on_metrics=on_metrics,
                                      val_batch_size=EvalConfig.model_validate(spec["eval"]).batch_size,
                                      start_adapter=spec.get("start_adapter"))
        except optuna.TrialPruned as exc:
            trial.set_user_attr("message", str(exc))
            if not (where / "train_result.json").is_file():
                shutil.rmtree(where, ignore_errors=True)   # a pruned recipe's checkpoints are not resumed
            raise
        except Exception as exc:
            trial.set_user_attr("message", f"{type(exc).__name__}: {str(exc)[:500]}")
            raise
        if not out["history"]["train_loss"]:            # a finished training reused: its own history
            out["history"] = {"train_loss": [list(h) for h in result.loss_history],
                              "val_loss": [list(h) for h in result.val_history]}
        out.update(steps=result.steps, seconds=result.seconds, train_loss=result.train_loss, val_loss=result.val_loss)
        value = objective_value(cfg.objective, result, spec["val_path"], spec, cfg)
        if not math.isfinite(value):
            raise ValueError(f"the objective {cfg.objective} is {value}")
        return value

    study.optimize(objective, n_trials=1, catch=(Exception,), gc_after_trial=False)
    if "number" not in out:
        return {"state": "not-needed", "message": "no trial was started"}
    frozen = study._storage.get_trial(study._storage.get_trial_id_from_study_id_trial_number(
        study._study_id, out["number"]))
    return out | {"state": frozen.state.name.lower(), "value": frozen.value, "objective": cfg.objective,
                  "message": frozen.user_attrs.get("message", ""), "over_budget": bool(frozen.user_attrs.get(OVER_BUDGET)),
                  "retry_of": frozen.system_attrs.get("failed_trial")}


def main(argv: list[str]) -> int:
    from ftpipe.training.launch import die_with_parent

    die_with_parent()
    spec_path = Path(argv[0])
    spec = json.loads(spec_path.read_text())
    outcome = run_trial(spec)
    Path(spec["result"]).write_text(json.dumps(outcome, indent=2, default=str))
    print(TRIAL + json.dumps({k: v for k, v in outcome.items() if k != "history"}, default=str), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
