"""Checks that take seconds and save minutes: before the data stages, the base model build
or Prefect start, every source and the base model are looked at, and every problem found is
reported at once (like the config's). Nothing is read in full, trained or written here."""

from __future__ import annotations

from pathlib import Path

from ftpipe.config import DataConfig, ModelConfig
from ftpipe.data.stages import BASE_MODEL_DIR


def preflight(data: DataConfig, model: ModelConfig, root: Path) -> list[str]:
    """One line per problem, naming the field or file: the base model (exists, loadable
    weights, a tokenizer), each file source (its path or glob, inside the project) and each
    SQL source (connects, and its query starts)."""
    from ftpipe.data.sources import SourceError, check_sql, locate
    from ftpipe.training.models import ModelRefError, check_model

    problems = []
    if (root / model.base).resolve() != (root / BASE_MODEL_DIR).resolve():   # that one DVC builds
        try:
            check_model(model.base, root, model.revision, model.allow_pickle_weights)
        except ModelRefError as exc:
            problems.append(str(exc))
    for i, src in enumerate(data.sources):
        try:
            check_sql(src) if src.type == "sql" else locate(root, src)
        except SourceError as exc:
            problems.append(f"data.sources.{i}: {exc}")
    return problems


class PreflightFailed(ValueError):
    """What preflight found; the message lists every problem, one per line."""


def require(data: DataConfig, model: ModelConfig, root: Path) -> None:
    problems = preflight(data, model, root)
    if problems:
        raise PreflightFailed("\n".join(problems))
