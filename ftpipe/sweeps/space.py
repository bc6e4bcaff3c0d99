"""The search space of a sweep (params.yaml `sweep.space`): dotted recipe keys, each a list of
values (a grid, or categorical choices) or a range {low, high, log, step}; what a trial's
values make of the recipe."""

from __future__ import annotations

import math
from typing import Any

from ftpipe.config import LoraConfig, ParamRange, SweepConfig, TrainConfig


def suggest(trial, space: dict[str, list[Any] | ParamRange]) -> dict[str, Any]:
    """One value per key, from the trial's sampler (or the values a retried trial was enqueued with)."""
    params = {}
    for key, spec in space.items():
        if isinstance(spec, list):
            params[key] = trial.suggest_categorical(key, spec)
        elif spec.is_int:
            params[key] = trial.suggest_int(key, spec.low, spec.high, step=spec.step or 1, log=spec.log)
        else:
            params[key] = trial.suggest_float(key, spec.low, spec.high, step=spec.step, log=spec.log)
    return params


def grid(space: dict[str, list[Any] | ParamRange]) -> dict[str, list[Any]]:
    """The grid sampler's search space (sampler: grid takes lists only: checked by the config)."""
    return {k: list(v) for k, v in space.items() if isinstance(v, list)}


def grid_size(space: dict[str, list[Any] | ParamRange]) -> int:
    return math.prod(len(v) for v in grid(space).values())


def apply(params: dict[str, Any], lora: LoraConfig, train: TrainConfig) -> tuple[LoraConfig, TrainConfig]:
    """The recipe with a trial's values (validated: a value the sections refuse raises)."""
    lora_update = {k.split(".", 1)[1]: v for k, v in params.items() if k.startswith("lora.")}
    train_update = {k.split(".", 1)[1]: v for k, v in params.items() if k.startswith("train.")}
    return (LoraConfig.model_validate(lora.model_dump() | lora_update),
            TrainConfig.model_validate(train.model_dump() | train_update))


def with_eval_points(train: TrainConfig, cfg: SweepConfig) -> TrainConfig:
    """A trial's recipe validates `sweep.eval_points` times (its pruning points) unless the
    recipe already sets train.eval_every; the best validated weights are the trial's."""
    if train.eval_every:
        return train
    return train.model_copy(update={"eval_every": max(1, train.max_steps // cfg.eval_points)})
