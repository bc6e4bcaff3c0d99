"""The training plan of a run: from scratch, from the champion's weights, or skip, and why.

What is new since the champion's data version is counted by row content hash; an incremental
run trains on the new training rows plus a replay sample of rows the champion already saw
(`plan`, pure). `plan_training` gathers what the champion saw from the registry and DVC and
returns the whole decision as one frozen TrainingPlan."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from ftpipe.config import IncrementalConfig, RegistryConfig, TrainConfig

if TYPE_CHECKING:
    from ftpipe.data.versions import DataVersion
    from ftpipe.training.recipe import TrainResult

SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class Increment:
    champion: str | None           # "NAME vN"
    champion_version: str | None
    new_rows: int                  # rows (any split) not in the champion's data version
    new_train_rows: int
    replay_rows: int
    start_from: str                # "champion" | "scratch"
    train_path: str | None         # the incremental training file; None: data/splits/train.jsonl
    reason: str
    train_rows: int = 0            # all rows of the current training split
    champion_data_missing: bool = False


def _hashes(lines: list[bytes]) -> list[str]:
    return [json.loads(x)["_hash"] for x in lines]


def plan(splits_dir: Path, champion: str | None, champion_version: str | None,
         champion_rows: set[str] | None, start_from: str, replay_ratio: float, seed: int,
         out_dir: Path, base_changed: str | None = None) -> Increment:
    """Count new rows against the champion's rows and, for an incremental run, write its
    training file to out_dir/train.jsonl (deterministic for the same data and seed).
    base_changed: why the champion's weights cannot be the start (another base model)."""
    lines = {n: [x for x in (splits_dir / f"{n}.jsonl").read_bytes().splitlines() if x.strip()] for n in SPLITS}
    if champion is None or champion_rows is None:
        total = sum(len(v) for v in lines.values())
        why = "no champion yet" if champion is None else f"the data of {champion} is in neither the DVC cache nor the remote"
        return Increment(champion, champion_version, total, len(lines["train"]), 0, "scratch", None,
                         f"{why}: training from the base model on all {len(lines['train'])} training rows",
                         len(lines["train"]), champion is not None)
    new = {n: [x for x, h in zip(v, _hashes(v)) if h not in champion_rows] for n, v in lines.items()}
    n_new = sum(len(v) for v in new.values())
    if start_from == "champion" and base_changed:
        return Increment(champion, champion_version, n_new, len(new["train"]), 0, "scratch", None,
                         f"{base_changed}: training from the new base model on all {len(lines['train'])} "
                         "training rows", len(lines["train"]))
    if start_from == "scratch":
        return Increment(champion, champion_version, n_new, len(new["train"]), 0, "scratch", None,
                         f"incremental.start_from is scratch: training from the base model on all "
                         f"{len(lines['train'])} training rows", len(lines["train"]))
    if not new["train"]:
        return Increment(champion, champion_version, n_new, 0, 0, "scratch", None,
                         f"no new training rows since {champion} (a run that goes on trains from the base "
                         "model on all rows)",
                         len(lines["train"]))
    old = [x for x, h in zip(lines["train"], _hashes(lines["train"])) if h in champion_rows]
    want = round(len(new["train"]) * replay_ratio / (1 - replay_ratio)) if replay_ratio else 0
    replay = random.Random(seed).sample(old, min(want, len(old)))
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = new["train"] + replay
    random.Random(seed + 1).shuffle(rows)
    path = out_dir / "train.jsonl"
    tmp = path.with_suffix(".part")
    tmp.write_bytes(b"".join(x + b"\n" for x in rows))
    tmp.replace(path)
    return Increment(champion, champion_version, n_new, len(new["train"]), len(replay), "champion", str(path),
                     f"from {champion}'s weights on {len(new['train'])} new training rows + {len(replay)} replayed",
                     len(lines["train"]))


def skip_reason(inc: Increment, min_new_rows: int, last_tried: str | None) -> str | None:
    """Why a scheduled / --if-new-data run should not train (None: it should)."""
    if inc.champion is None:
        return None
    if inc.champion_data_missing:
        return (f"skipped: the data of the champion ({inc.champion}) is in neither the DVC cache nor the "
                "remote, so what is new cannot be told (`dvc pull`, or run `ftpipe run` to retrain from scratch)")
    if inc.new_rows < min_new_rows:
        return f"skipped: {inc.new_rows} new rows < {min_new_rows}"
    if inc.new_train_rows == 0:
        return f"skipped: none of the {inc.new_rows} new rows is in the training split"
    if last_tried:
        return f"skipped: {last_tried} already trained on this data version with this config"
    return None


def scaled_steps(max_steps: int, inc: Increment) -> int:
    """train.max_steps scaled to the incremental set: as many epochs as a full run would make."""
    rows = inc.new_train_rows + inc.replay_rows
    return max(1, -(-max_steps * rows // max(1, inc.train_rows)))


@dataclass(frozen=True)
class TrainingPlan:
    """What a run trains, from which weights, on which rows — or why it trains nothing."""
    increment: Increment
    skip: str | None           # why this run trains nothing; None: it trains
    base_path: str             # the weights training starts from (model.base, or the champion's)
    splits: dict[str, str]     # train (an incremental run: new rows + replay), validation, test
    train: TrainConfig         # an incremental run: max_steps scaled to its set
    data_key: str              # the data version and the start: with the recipe, the training key
    start_from: str            # for the lineage: "scratch" or "champion models:/NAME/V: ..."
    base_source: str = ""      # what base_path is, as an adapter version pins it: model.base, or models:/NAME/V
    base_revision: str | None = None
    start_adapter: str | None = None   # an adapter champion's adapter, which training continues
    stages: tuple[TrainConfig, ...] = ()   # train.stages, each whole (an incremental run: steps scaled); (): one
    first_step: int = 0        # a stage's steps are logged after those of the stages before it


def stage_plan(plan: TrainingPlan, i: int, before: TrainResult | None) -> TrainingPlan:
    """Stage i (0-based) of a staged plan, trained as a plan of its own: the first from the
    plan's start weights, each later one from what the stage before it left (its adapter,
    trained on, or its full weights), keyed by that stage's training so a changed earlier
    stage trains every later one again."""
    one = replace(plan, train=plan.stages[i], stages=())
    if before is None:
        return one
    adapter = before.adapter_dir
    return replace(one, base_path=plan.base_path if adapter else before.model_dir, start_adapter=adapter,
                   data_key=f"{plan.data_key}:after:{Path(before.model_dir).parent.name}",
                   first_step=plan.first_step + before.steps)


def plan_training(data: DataVersion, reg: RegistryConfig, incremental: IncrementalConfig, train: TrainConfig,
                  min_new_rows: int, config_hash: str, root: Path, require_new_data: bool,
                  remote: str | None = None) -> TrainingPlan:
    """Scratch, from the champion, or skip, and why. From the champion: on the rows new since
    its data version (by content hash, read from DVC) plus a replay sample, unless the base
    model changed since it trained. Skip (scheduled / --if-new-data runs only): too few new
    rows, none in the training split, the champion's data unreadable, or this data version
    already tried with this config."""
    from ftpipe import names as t
    from ftpipe.data.versions import Store, split_rows
    from ftpipe.lineage.record import recorded_tags
    from ftpipe.registry import store

    champ = store.version_by_alias(reg.model_name, store.CHAMPION)
    rows, base_changed = None, None
    if champ is not None:
        facts = recorded_tags(store.client(), champ.name, champ.version)
        was = (facts.get(t.BASE_MODEL), facts.get(t.BASE_MODEL_REVISION))
        if was[0] is not None and was != (data.base.id, data.base.revision):
            base_changed = (f"the base model changed since {champ.name} v{champ.version} "
                            f"({was[0]}@{was[1]} -> {data.base.id}@{data.base.revision})")
        if facts.get(t.SPLITS):
            dvc = Store(root, remote)
            try:
                found = split_rows(dvc, facts[t.SPLITS])
            finally:
                dvc.close()
            rows = set(found) if found is not None else None
    out = root / "runs" / f"increment-{data.splits_md5.removesuffix('.dir')[:12]}-v{champ.version if champ else 0}"
    inc = plan(Path(data.splits["train"]).parent, f"{champ.name} v{champ.version}" if champ else None,
               champ.version if champ else None, rows, incremental.start_from, incremental.replay_ratio,
               train.seed, out, base_changed)
    skip = skip_reason(inc, min_new_rows, store.decided_on(reg.model_name, data.splits_md5, config_hash)) \
        if require_new_data else None
    if inc.start_from != "champion":
        return TrainingPlan(inc, skip, data.base.path, data.splits, train, f"{data.splits_md5}:scratch", "scratch",
                            data.base.id, data.base.revision, stages=tuple(train.stage_configs()))
    steps = lambda t: incremental.max_steps or scaled_steps(t.max_steps, inc)   # noqa: E731 - same epochs
    start = store.version_weights(reg.model_name, inc.champion_version, root) if not skip else None
    base_path, source, revision, adapter = "", "", None, None
    if start is not None and start.adapter_dir is None:     # a full champion: its weights are the base
        base_path, source = start.model_dir, f"models:/{reg.model_name}/{inc.champion_version}"
    elif start is not None and train.method == "full":      # an adapter champion, fully fine-tuned: merged
        from ftpipe.training.models import merged_copy

        base_path = merged_copy(start.model_dir, start.adapter_dir, Path(start.adapter_dir).parent / "merged")
        source = f"models:/{reg.model_name}/{inc.champion_version}"
    elif start is not None:                                 # an adapter champion: its adapter trains on
        base_path, source, revision, adapter = start.model_dir, data.base.id, data.base.revision, start.adapter_dir
    return TrainingPlan(
        inc, skip, base_path, data.splits | {"train": inc.train_path},
        train.model_copy(update={"max_steps": steps(train)}),
        f"{data.splits_md5}:champion:{inc.champion_version}",
        f"champion models:/{reg.model_name}/{inc.champion_version}: {inc.new_train_rows} new training rows + "
        f"{inc.replay_rows} replayed", source, revision, adapter,
        tuple(t.model_copy(update={"max_steps": steps(t)}) for t in train.stage_configs()))
