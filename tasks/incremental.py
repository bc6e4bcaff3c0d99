"""Prefect tasks of incremental learning: what is new since the champion, its weights, and
the record of a skipped run."""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from ftpipe.registry import store as registry
from ftpipe.registry import tags as t
from ftpipe.config import PipelineConfig, RegistryConfig
from ftpipe.training.plan import Increment, plan


@task(name="plan-increment", cache_policy=NO_CACHE)
def plan_increment(cfg: PipelineConfig, root: str, splits_md5: str, run_id: str,
                   base_id: str, base_revision: str) -> Increment:
    """New rows (by content hash) since the champion's data version, and for an incremental
    run its training file: the new training rows plus incremental.replay_ratio of replay.
    A champion fine-tuned from another base model (id or revision) is never the start."""
    from ftpipe.lineage.audit import TRAIN_FILE_ARTIFACT, Store, split_rows

    champ = registry.version_by_alias(cfg.registry.model_name, registry.CHAMPION)
    rows, base_changed = None, None
    if champ is not None:
        tags = registry.client().get_model_version(champ.name, champ.version).tags or {}
        was = (tags.get(t.BASE_MODEL), tags.get(t.BASE_MODEL_REVISION))
        if was[0] is not None and was != (base_id, base_revision):
            base_changed = (f"the base model changed since {champ.name} v{champ.version} "
                            f"({was[0]}@{was[1]} -> {base_id}@{base_revision})")
        md5 = tags.get(t.SPLITS)
        if md5:
            store = Store(Path(root), cfg.data.remote)
            try:
                found = split_rows(store, md5)
            finally:
                store.close()
            rows = set(found) if found is not None else None
    out = Path(root) / "runs" / f"increment-{splits_md5.removesuffix('.dir')[:12]}-v{champ.version if champ else 0}"
    inc = plan(Path(root) / "data/splits", f"{champ.name} v{champ.version}" if champ else None,
               champ.version if champ else None, rows, cfg.incremental.start_from,
               cfg.incremental.replay_ratio, cfg.train.seed, out, base_changed)
    registry.client().set_tag(run_id, "ftpipe.new_rows", str(inc.new_rows))
    get_run_logger().info(f"new rows since {inc.champion or 'no champion'}: {inc.new_rows}; {inc.reason}")
    if inc.train_path:   # what the candidate trains on, with the run; its sha256 goes into the lineage
        # record (ftpipe.train_file): the audit re-hashes it, reverse queries by row read it
        registry.client().log_artifact(run_id, inc.train_path, str(Path(TRAIN_FILE_ARTIFACT).parent))
    return inc


@task(name="last-tried", cache_policy=NO_CACHE)
def last_tried(cfg: PipelineConfig, splits_md5: str) -> str | None:
    """'NAME vN (decision)' when a version was already trained on this data version with this
    config: a scheduled run then does not train and register the same candidate again."""
    for mv in registry.versions_tagged(cfg.registry.model_name, {t.SPLITS: splits_md5, t.CONFIG_HASH: cfg.hash()}):
        tags = mv.tags or {}
        # undecided: a run crashed between registering and the gate; the next run finishes it
        if tags.get(t.DECISION):
            return f"{cfg.registry.model_name} v{mv.version} ({tags[t.DECISION]})"
    return None


@task(name="champion-weights", cache_policy=NO_CACHE)
def champion_weights(reg: RegistryConfig, version: str, root: str) -> str:
    """The champion's merged checkpoint, downloaded once per model and version under runs/."""
    dst = Path(root) / "runs" / f"champion-{reg.model_name}-v{version}"
    done = dst / ".complete"
    if done.is_file() and Path(done.read_text()).is_dir():
        hf = done.read_text()
    else:
        hf = registry.download_model(reg.model_name, version, dst)
        done.write_text(hf)
    get_run_logger().info(f"training from {reg.model_name} v{version}'s weights ({hf})")
    return hf


@task(name="record-skip", cache_policy=NO_CACHE)
def record_skip(run_id: str, message: str, inc: Increment) -> None:
    c = registry.client()
    c.set_tag(run_id, "ftpipe.skipped", message)
    champ = f" (champion: {inc.champion})" if inc.champion else ""
    c.set_tag(run_id, "mlflow.note.content", f"{message}{champ}; nothing trained")
    get_run_logger().info(f"{message}{champ}: nothing trained, no alias moved")
