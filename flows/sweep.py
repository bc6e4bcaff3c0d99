"""The sweep flow: the data half of a retrain once (DVC stages, GX gates), then one Optuna
study of trials (each a Prefect task running one training in its own process, N at once),
then the best trial's recipe as one candidate through evaluation, registration and the
promotion gate, exactly as `ftpipe run` would. Wiring only: the study lives in
ftpipe.sweeps, the back half in flows.retrain.

    ftpipe sweep                     # the CLI way
    ftpipe sweep --join              # one more worker on the running study (another machine)
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from prefect import flow
from prefect.futures import as_completed
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner

from flows.retrain import RetrainResult, SkippedRun, candidate_steps, prepare_data
from flows.runtime import mark_run_failed, outcome
from ftpipe.config import PipelineConfig, SweepConfig, load_config
from ftpipe.runlock import project_lock
from ftpipe.sweeps.study import SweepRef
from tasks.io import io_tasks
from tasks.sweep import Board, open_sweep, publish_sweep, run_trial  # noqa: F401 - registers the I/O tasks


class NoTrialCompleted(RuntimeError):
    """Every trial of the sweep was pruned or failed: there is no recipe to register."""


@dataclass(frozen=True)
class SweepResult:
    board: Board
    result: RetrainResult | SkippedRun


def slots(cfg: SweepConfig, lane: str) -> list[dict[str, str]]:
    """One environment per trial slot: a GPU each (CUDA_VISIBLE_DEVICES), or a share of the
    cores; each slot a lane of its own (its trials' sampler seeds differ from the others')."""
    from ftpipe import cores

    try:
        import torch

        gpus = torch.cuda.device_count()
    except ImportError:   # pragma: no cover
        gpus = 0
    n = cfg.parallel if cfg.parallel != "auto" else max(1, gpus)
    if gpus:
        return [{"CUDA_VISIBLE_DEVICES": str(i % gpus), "FTPIPE_SWEEP_LANE": f"{lane}-{i}"} for i in range(n)]
    return [{"OMP_NUM_THREADS": str(max(1, cores.share() // n)), "FTPIPE_SWEEP_LANE": f"{lane}-{i}"}
            for i in range(n)]


MAX_FAILED_IN_A_ROW = 3   # trials that fail one after another (a recipe that cannot train here): stop


def run_trials(ref: SweepRef, cfg: SweepConfig, wait_for_others: bool = False) -> int:
    """Trials as tasks, one per free slot, until the study has its trials (counting those any
    other worker runs), sweep.timeout_s has passed, or trials keep failing; returns how many
    this worker started. wait_for_others: then wait until no other worker's trial runs."""
    from ftpipe.sweeps import study

    url = study.storage_url(cfg, Path(ref.root))
    s = study.open_study(url, ref.name, cfg, cfg.params(), create=False)
    deadline = time.monotonic() + cfg.timeout_s if cfg.timeout_s else None
    free, active, seq, failed = slots(cfg, ref.lane), {}, 0, 0
    while True:
        done, running = study.counts(s)
        room = ref.budget - done - max(running, len(active))
        while free and room > 0 and failed < MAX_FAILED_IN_A_ROW and (deadline is None or time.monotonic() < deadline):
            env = free.pop()
            active[run_trial.submit(ref, seq, env)] = env
            seq, room = seq + 1, room - 1
        if not active:
            break
        finished = next(as_completed(list(active)))
        free.append(active.pop(finished))
        state = finished.result().get("state")
        failed = failed + 1 if state in ("fail", "crashed") else 0 if state in ("complete", "pruned") else failed
        if state == "crashed":           # its trial stays RUNNING: fail it, retry once
            study.fail_dead_trials(s)
    if failed >= MAX_FAILED_IN_A_ROW:
        print(f"{failed} trials in a row failed: no more trials start here (see their messages in the leaderboard)")
    while wait_for_others and study.counts(s)[1]:   # another worker's trial: the winner waits for it
        time.sleep(5)
        study.fail_dead_trials(s)          # (a dead one is failed by its heartbeat, then retried elsewhere)
    return seq


def winner(cfg: PipelineConfig, plan, board: Board):
    """The config and plan of the best trial's recipe (the training key its trial used)."""
    from dataclasses import replace

    from ftpipe.sweeps.space import apply, with_eval_points

    lora, train = apply(board.best["params"], cfg.lora, plan.train)
    train = with_eval_points(train, cfg.sweep)
    return cfg.model_copy(update={"lora": lora, "train": train}), replace(plan, train=train)


@flow(name="sweep", log_prints=True, on_failure=[mark_run_failed], on_crashed=[mark_run_failed],
      task_runner=ThreadPoolTaskRunner(max_workers=64))
def sweep(cfg: PipelineConfig, root: str = ".") -> SweepResult:
    """Data once, the study's trials, then the winner through evaluation, registration and the gate."""
    root = str(Path(root).resolve())
    with project_lock(Path(root), log=print):              # the data under the trials does not move
        io = io_tasks(cfg.registry)
        flow_run_id = str(flow_run.get_id() or "local")
        run = io.start_run(cfg, root, flow_run_id, "sweep")
        data = prepare_data(cfg, root, run, io)            # DVC stages + both GX gates, once per sweep
        plan = io.plan_training(cfg, data, run, root, False)   # scratch / from the champion: the trials' start
        ref = io.open_sweep(cfg, plan, run, root)          # the study (continued if this sweep ran before)
        run_trials(ref, cfg.sweep, wait_for_others=True)   # trials as tasks, sweep.parallel at once
        board = io.publish_sweep(ref, cfg, run)            # leaderboard and plots on this run
        if board.best is None:
            raise NoTrialCompleted(f"no trial of study {ref.name} completed ({board.counts})"
                                   + (f"; the first failure: {board.first_failure}" if board.first_failure else "")
                                   + "; see `ftpipe sweep --report`")
        best_cfg, best_plan = winner(cfg, plan, board)
        io.log_winner_config(run, best_cfg)
        res = candidate_steps(best_cfg, root, run, data, best_plan, io, flow_run_id, board.lineage)
        return outcome(res, SweepResult(board, res))


@flow(name="sweep-trials", log_prints=True, task_runner=ThreadPoolTaskRunner(max_workers=64))
def sweep_trials(root: str = ".", config: str = "params.yaml", study: str | None = None,
                 overrides: list[str] | None = None) -> dict:
    """One more worker on a running study (another machine, or a Prefect work pool's worker):
    its trials until the study has them all. The coordinator (`ftpipe sweep`) registers the winner."""
    from ftpipe.sweeps.study import join

    root_path = Path(root).resolve()
    cfg = load_config(root_path / config if not Path(config).is_absolute() else config, overrides)
    ref, swept = join(cfg.sweep, study, root_path, cfg.registry)
    ran = run_trials(ref, swept.model_copy(update={"parallel": cfg.sweep.parallel, "timeout_s": cfg.sweep.timeout_s}))
    return {"study": ref.name, "trials_here": ran}


if __name__ == "__main__":
    print(sweep(load_config("params.yaml")))
