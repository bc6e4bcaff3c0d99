"""The Optuna study of a sweep: its storage (SQLite in the project, or PostgreSQL for a team),
sampler and pruner, how many trials it still needs, trials whose worker died, the leaderboard.

Every worker process, on this machine or another, opens the same study through the storage;
Optuna's RDB storage hands each trial to one worker. A trial whose worker stops beating its
heartbeat (another machine), or whose process is gone (this machine), is failed and enqueued
once more with the same parameters (it resumes from its checkpoints: the training directory
is keyed by the recipe)."""

from __future__ import annotations

import os
import socket
import warnings
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from ftpipe.config import ParamRange, SweepConfig
from ftpipe.sweeps.space import grid

optuna.logging.set_verbosity(optuna.logging.WARNING)
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
OVER_BUDGET = "over_budget"     # user attr of a trial another worker's trial made one too many
WORKER = "worker"               # user attr: "host:pid" of the process that runs the trial


def direction(objective: str) -> str:
    return "minimize" if objective == "val_loss" else "maximize"


def storage_url(cfg: SweepConfig, root: Path) -> str:
    """sweep.storage (${VARS} expanded), else SQLite in the project's optuna/ folder."""
    if cfg.storage:
        url = os.path.expandvars(cfg.storage)
        if "$" in url:
            raise ValueError(f"sweep.storage {cfg.storage}: a variable in it is not set in this environment")
        return url
    folder = Path(root) / "optuna"
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(folder / 'optuna.db').resolve()}"


def storage(url: str, heartbeat_s: int) -> optuna.storages.RDBStorage:
    """The RDB storage with heartbeats: a trial silent for 4 heartbeats is failed and retried once."""
    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    return optuna.storages.RDBStorage(
        url, engine_kwargs=engine, heartbeat_interval=heartbeat_s, grace_period=4 * heartbeat_s,
        heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(
            max_retry=1, inherit_intermediate_values=True))


def sampler(cfg: SweepConfig, space: dict[str, list[Any] | ParamRange]) -> optuna.samplers.BaseSampler:
    if cfg.sampler == "grid":
        return optuna.samplers.GridSampler(grid(space), seed=cfg.seed)
    if cfg.sampler == "random":
        return optuna.samplers.RandomSampler(seed=cfg.seed)
    return optuna.samplers.TPESampler(seed=cfg.seed)   # Optuna 5: multivariate, constant liar (parallel trials)


def pruner(cfg: SweepConfig) -> optuna.pruners.BasePruner:
    if not cfg.pruner.enabled:
        return optuna.pruners.NopPruner()
    return optuna.pruners.MedianPruner(n_startup_trials=cfg.pruner.startup_trials,
                                       n_warmup_steps=cfg.pruner.warmup_steps)


def open_study(url: str, name: str, cfg: SweepConfig, space: dict, create: bool = True,
               seed: int | None = None) -> optuna.Study:
    """seed: the sampler's (each trial's process opens the study anew: seeded alike, every
    process would draw the same recipe; trial_seed gives each trial its own)."""
    st = storage(url, cfg.heartbeat_s)
    cfg = cfg if seed is None else cfg.model_copy(update={"seed": seed})
    if create:
        return optuna.create_study(storage=st, study_name=name, sampler=sampler(cfg, space), pruner=pruner(cfg),
                                   direction=direction(cfg.objective), load_if_exists=True)
    return optuna.load_study(study_name=name, storage=st, sampler=sampler(cfg, space), pruner=pruner(cfg))


def trial_seed(url: str, name: str, cfg: SweepConfig, lane: str) -> int:
    """The sampler seed of the study's next trial: sweep.seed, how many trials the study holds
    and the lane (the trial slot of this worker), so one worker draws the same recipes every
    time it runs and trials started side by side draw different ones. The grid sampler keeps
    sweep.seed: every process must shuffle the grid alike (a trial's number picks its point)."""
    from ftpipe.config import digest

    if cfg.sampler == "grid":
        return cfg.seed
    n = len(optuna.load_study(study_name=name, storage=storage(url, cfg.heartbeat_s)).get_trials(deepcopy=False))
    return int(digest([cfg.seed, n, lane], 8), 16)


def counts(study: optuna.Study) -> tuple[int, int]:
    """(finished: complete or pruned, running) trials."""
    trials = study.get_trials(deepcopy=False, states=FINISHED + (TrialState.RUNNING,))
    done = sum(t.state in FINISHED for t in trials)
    return done, len(trials) - done


def needed(study: optuna.Study, budget: int) -> int:
    """Trials still to start for `budget` finished ones (those running count as started)."""
    done, running = counts(study)
    return max(0, budget - done - running)


def over_budget(study: optuna.Study, number: int, budget: int) -> bool:
    """Whether trial `number` is one too many: two workers asked for the last one at once."""
    before = study.get_trials(deepcopy=False, states=FINISHED + (TrialState.RUNNING,))
    return sum(1 for t in before if t.number < number and not t.user_attrs.get(OVER_BUDGET)) >= budget


def _machine() -> str:
    """This machine and PID namespace (containers may share a hostname, not their processes)."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()[:8]
        ns = os.stat("/proc/self/ns/pid").st_ino
        return f"{socket.gethostname()}/{boot}.{ns}"
    except OSError:
        return socket.gethostname()


def worker_id() -> str:
    return f"{_machine()}:{os.getpid()}"


def _alive(pid: int) -> bool:
    """Whether process `pid` still runs here. A zombie does not: it has ended and only waits for its
    parent (or, orphaned, the machine's init, which may take seconds) to read its exit status."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):   # it ended just now, or there is no /proc (not Linux): kill() said it runs
        return not Path("/proc").is_dir()


def fail_dead_trials(study: optuna.Study) -> list[int]:
    """Trials still RUNNING whose worker process on this machine is gone (a killed sweep):
    failed now and enqueued once more with the same parameters. Other machines' dead
    workers are found by their heartbeat (optuna.storages.fail_stale_trials)."""
    optuna.storages.fail_stale_trials(study)
    host, failed = _machine(), []
    retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1, inherit_intermediate_values=True)
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        where, _, pid = str(t.user_attrs.get(WORKER, "")).rpartition(":")
        if where == host and pid.isdigit() and not _alive(int(pid)):
            try:
                study._storage.set_trial_user_attr(t._trial_id, "message", "its worker process died")
                if not study._storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL):
                    continue
            except optuna.exceptions.UpdateFinishedTrialError:   # another worker failed it first
                continue
            retry(study, study._storage.get_trial(t._trial_id))
            failed.append(t.number)
    return failed


def retried_from(t: FrozenTrial) -> int | None:
    return t.system_attrs.get("failed_trial")


def leaderboard(study: optuna.Study) -> list[dict]:
    """Every trial, best first: complete by value, then pruned, then failed; one dict each."""
    minimize = study.direction == optuna.study.StudyDirection.MINIMIZE
    rows = []
    for t in study.get_trials(deepcopy=False):
        if t.user_attrs.get(OVER_BUDGET):
            continue
        rows.append({"trial": t.number, "state": t.state.name.lower(), "value": t.value,
                     "shown": t.value if t.state == TrialState.COMPLETE else None,   # a pruned one's is a midway loss
                     "last_step": max(t.intermediate_values) if t.intermediate_values else None,
                     "params": dict(t.params), "seconds": (t.datetime_complete - t.datetime_start).total_seconds()
                     if t.datetime_complete and t.datetime_start else None,
                     "worker": t.user_attrs.get(WORKER, ""), "retry_of": retried_from(t),
                     "message": t.user_attrs.get("message", "")})
    order = {"complete": 0, "pruned": 1, "running": 2, "waiting": 3, "fail": 4}

    def key(r):
        v = r["value"] if r["value"] is not None else float("inf")
        return (order.get(r["state"], 5), v if minimize else -v, r["trial"])
    return sorted(rows, key=key)


def best(study: optuna.Study) -> FrozenTrial | None:
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        return None
    return min(complete, key=lambda t: t.value if study.direction == optuna.study.StudyDirection.MINIMIZE
               else -t.value)


# ------------------------------------------------------------------ a sweep's study, as the flows see it

from dataclasses import dataclass   # noqa: E402


@dataclass(frozen=True)
class SweepRef:
    """What the tasks of a sweep pass around: the study, where it is stored (as configured:
    a ${VAR} in the URL is expanded only where the storage is opened), the trial spec."""
    name: str
    storage: str            # sweep.storage as written, or the project's SQLite URL
    spec: str               # the trial spec template (ftpipe.sweeps.trial) of this worker
    root: str
    parent_run: str         # the MLflow run whose children the trials are
    budget: int
    resumed: tuple[int, ...] = ()   # trials of a killed worker failed now, each enqueued once more
    previous_run: str = ""          # the parent run of this study's earlier (killed or finished) sweep
    lane: str = "main"              # this worker's trial slots are lanes "<lane>-<slot>" (sampler seeds)


def shown(url: str) -> str:
    """A storage URL fit for logs and lineage: any password replaced."""
    import re

    from ftpipe.secrets import redact

    return redact(re.sub(r"(://[^:/@]+:).*@", r"\1***@", url))


def display(cfg: SweepConfig, root: Path) -> str:
    """The storage as a person reads it: sweep.storage as written (a ${VAR} stays a name), or
    the project's SQLite file."""
    return shown(cfg.storage) if cfg.storage else storage_url(cfg, root)


def default_name(model_name: str, cfg: SweepConfig, recipe: list) -> str:
    """<model_name>-sweep-HASH of the space, sampler, objective and recipe (data and start
    included): the same sweep started again continues its study; a changed one starts anew."""
    from ftpipe.config import digest

    return f"{model_name}-sweep-" + digest([cfg.space, cfg.sampler, cfg.objective, cfg.seed, cfg.eval_points,
                                            recipe], 8)


def relative(path: str, root: Path) -> str:
    p = Path(path)
    try:
        return str(p.resolve().relative_to(root.resolve()))
    except ValueError:
        return str(p)


def budget(cfg: SweepConfig) -> int:
    """sweep.trials, at most the grid's points for the grid sampler."""
    from ftpipe.sweeps.space import grid_size

    return min(cfg.trials, grid_size(cfg.params())) if cfg.sampler == "grid" else cfg.trials


# what a study's trials must agree on; a worker's budget and time limit may differ
SAME = ("model", "lora", "train", "data_key", "eval", "max_seq_len", "start_adapter", "train_path_sha256",
        "val_path_sha256")


def prepare(cfg: SweepConfig, name: str, root: Path, parent_run: str, template: dict) -> SweepRef:
    """Open (or create) the study, record the trial spec its workers share (paths relative to
    the project) and the parent run, fail the trials of a killed worker here (each retried once)."""
    from ftpipe.files import sha256_path

    url = storage_url(cfg, root)
    study = open_study(url, name, cfg, cfg.params())
    for key in ("train_path", "val_path"):
        template[key + "_sha256"] = sha256_path(Path(template[key]))
        template[key] = relative(template[key], root)
    base = template["model"]["base"]
    if Path(base).exists():           # a local folder (under the project: relative), not a hub id
        template["model"] = template["model"] | {"base": relative(base, root)}
        template["base_in_project"] = not Path(template["model"]["base"]).is_absolute()
    template["sweep"] = cfg.model_dump(mode="json")
    stored = study.user_attrs.get("spec")
    if stored and ({k: stored.get(k) for k in SAME} != {k: template.get(k) for k in SAME}
                   or stored["sweep"]["space"] != template["sweep"]["space"]):
        raise ValueError(f"study {name} in {display(cfg, root)} holds trials of another recipe, space or data: "
                         "set sweep.study to a new name (or leave it null: each sweep gets its own)")
    study.set_user_attr("spec", template)          # this run's budget and settings for workers that join
    study.set_user_attr("objective", cfg.objective)
    previous = study.user_attrs.get("parent_run", "")
    if previous == parent_run:                     # this same run, its task retried
        previous = study.user_attrs.get("previous_run", "")
    else:
        study.set_user_attr("previous_run", previous)
    study.set_user_attr("parent_run", parent_run)
    resumed = tuple(fail_dead_trials(study))
    return SweepRef(name, cfg.storage or url, str(write_spec(root, name, template, cfg, url)), str(root), parent_run,
                    budget(cfg), resumed, previous)


def newest(url: str, heartbeat_s: int) -> str | None:
    """The study created last in this storage."""
    studies = storage(url, heartbeat_s).get_all_studies()
    return max(studies, key=lambda s: s._study_id).study_name if studies else None


def champion_start(spec: dict, root: Path, registry) -> dict:
    """On a machine that joins a sweep starting from the champion: its incremental training
    file (the first worker's run artifact) and the champion's weights (the registry; an adapter
    version's base from this machine's base cache), put where this machine's trials read them."""
    import shutil
    import tempfile

    from ftpipe.files import sha256_path
    from ftpipe.lineage.record import TRAIN_FILE_ARTIFACT
    from ftpipe.registry import store

    store.setup(registry, root)
    champ, spec = spec["champion"], dict(spec)
    train = root / spec["train_path"]
    if not train.is_file() or sha256_path(train) != spec["train_path_sha256"]:
        with tempfile.TemporaryDirectory() as tmp:
            got = store.client().download_artifacts(spec["parent_run"], TRAIN_FILE_ARTIFACT, tmp)
            train.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(got, train)
    local = store.version_weights(champ["name"], champ["version"], root)
    if champ["start"] == "adapter":      # the adapter trains on, on its pinned base
        spec["model"] = spec["model"] | {"base": local.model_dir}
        spec["start_adapter"] = local.adapter_dir
    elif champ["start"] == "merged":     # a full fine-tune of an adapter champion: its merged weights
        from ftpipe.training.models import merged_copy

        spec["model"] = spec["model"] | {"base": merged_copy(local.model_dir, local.adapter_dir,
                                                             Path(local.adapter_dir).parent / "merged")}
    else:
        spec["model"] = spec["model"] | {"base": local.model_dir}
    spec["base_in_project"] = False
    return spec


def join(cfg: SweepConfig, name: str | None, root: Path, registry=None) -> tuple[SweepRef, SweepConfig]:
    """A second worker (another machine, or another process here) on an existing study: its
    trial spec from the study (a champion start fetched here: champion_start), the data files
    checked against the study's sha256. registry: this project's RegistryConfig (the MLflow
    the first worker logs to)."""
    from ftpipe.files import sha256_path

    url = storage_url(cfg, root)
    name = name or newest(url, cfg.heartbeat_s)
    if name is None:
        raise ValueError(f"no study in {display(cfg, root)} to join: start one with `ftpipe sweep`")
    try:
        study = open_study(url, name, cfg, cfg.params(), create=False)
    except KeyError:
        raise ValueError(f"no study {name!r} in {display(cfg, root)} (`ftpipe sweep --report` names the newest)") \
            from None
    spec = study.user_attrs.get("spec")
    if not spec:
        raise ValueError(f"study {name} in {display(cfg, root)} was not started by `ftpipe sweep` (no trial spec)")
    if spec.get("champion") and registry is not None:
        spec = champion_start(spec | {"parent_run": study.user_attrs.get("parent_run", "")}, root, registry)
    for key in ("train_path", "val_path"):
        path = root / spec[key] if not Path(spec[key]).is_absolute() else Path(spec[key])
        if not path.is_file() or sha256_path(path) != spec[key + "_sha256"]:
            how = "`git pull && dvc pull` this project first"
            raise ValueError(f"{path}: not the {key.split('_')[0]} file study {name} trains on "
                             f"(sha256 {spec[key + '_sha256'][:12]}): {how}")
    if spec.get("base_in_project") and not (root / spec["model"]["base"]).exists():
        raise ValueError(f"{root / spec['model']['base']}: the start weights of study {name} are not on this "
                         f"machine ({spec.get('base_source') or 'the base model'}): run `dvc pull` (the tiny "
                         "base) or point model.base at the same model")
    fail_dead_trials(study)
    swept = SweepConfig.model_validate(spec["sweep"]).model_copy(update={"storage": cfg.storage})
    lane = f"join-{worker_id()}"
    return SweepRef(name, cfg.storage or url, str(write_spec(root, name, spec, swept, url, lane)), str(root),
                    study.user_attrs.get("parent_run", ""), budget(swept), lane=lane), swept


def write_spec(root: Path, name: str, template: dict, cfg: SweepConfig, url: str, lane: str = "main") -> Path:
    """This worker's copy of the trial spec: paths made absolute here, the sweep's settings
    and storage (as configured; the trial expands ${VARS})."""
    import json

    doc = dict(template)
    for key in ("train_path", "val_path"):
        doc[key] = str(root / doc[key]) if not Path(doc[key]).is_absolute() else doc[key]
    if doc.get("base_in_project"):
        doc["model"] = doc["model"] | {"base": str(root / doc["model"]["base"])}
    doc.update(root=str(root), study=name, storage=cfg.storage or url, sweep=cfg.model_dump(mode="json"))
    folder = root / "runs" / "sweeps" / name
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / (f"spec-{lane.replace(':', '-').replace('/', '-')}.json" if lane != "main" else "spec.json")
    path.write_text(json.dumps(doc, indent=2))
    return path


def audit_trial(fact: str, candidate: str) -> tuple[bool | None, str]:
    """The sweep link of a version's lineage (its `ftpipe.sweep` fact): the study and trial
    read back from the storage, COMPLETE, with the version's training and objective value.
    (ok, detail); ok None: the storage cannot be reached from here (unverified)."""
    import re

    m = re.fullmatch(r"study (\S+) trial (\d+) \((\w+)=([^)]+)\) in (.+)", fact)
    if not m:
        return False, f"sweep: cannot read the lineage fact {fact!r}"
    name, number, objective, value, where = m.groups()
    url = os.path.expandvars(where)
    if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).is_file():
        return None, f"sweep: study {name}'s storage {where} is not on this machine"
    try:
        s = optuna.load_study(study_name=name, storage=url)
        trial = next((t for t in s.get_trials(deepcopy=False) if t.number == int(number)), None)
    except Exception as exc:   # noqa: BLE001 - an unreachable database is unverified, not broken
        return None, f"sweep: study {name} in {where} not reachable ({type(exc).__name__})"
    if trial is None:
        return False, f"sweep: study {name} in {where} has no trial {number}"
    problems = []
    if trial.state != TrialState.COMPLETE:
        problems.append(f"trial {number} is {trial.state.name.lower()}, not complete")
    if trial.user_attrs.get("training_dir") != candidate:
        problems.append(f"trial {number} trained {trial.user_attrs.get('training_dir')}, the version holds {candidate}")
    if trial.value is None or f"{trial.value:.6g}" != value:
        problems.append(f"trial {number}'s {objective} is {trial.value}, the lineage says {value}")
    return not problems, f"sweep: study {name} trial {number} " + (
        f"complete, {objective} {value}, its training is the version's" if not problems else "; ".join(problems))
