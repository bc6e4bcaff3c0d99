"""Retries for the tasks that do I/O (MLflow, DVC remotes, the artifact store, a database):
Prefect retries them with exponential back-off when the failure is transient (ftpipe.retry),
and never when it is deterministic. Training, cleaning and evaluation are never retried whole.

Such a task is declared with @io_task; a flow binds the retries of all of them once, from
registry.io_retries and registry.io_retry_delay_s: `io = io_tasks(cfg.registry)`, then
`io.start_run(...)`."""

from __future__ import annotations

import os
from types import SimpleNamespace

from prefect import task
from prefect.cache_policies import NO_CACHE

from ftpipe.config import RegistryConfig
from ftpipe.retry import is_transient

# MLflow's own HTTP client retries up to 7 times with back-off (minutes against a stopped
# server) before a task even sees the failure: Prefect owns retries here, so MLflow makes one.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")

IO_TASKS: dict = {}


def io_task(name: str):
    """A Prefect task (no cache) that talks to MLflow, a DVC remote or a database."""
    def wrap(fn):
        t = task(name=name, cache_policy=NO_CACHE)(fn)
        IO_TASKS[fn.__name__] = t
        return t
    return wrap


def transient_failure(task, task_run, state) -> bool:
    exc = state.data if isinstance(state.data, BaseException) else None
    if exc is None:
        try:
            state.result(raise_on_failure=True)
        except BaseException as e:   # noqa: BLE001 - classified, not swallowed
            exc = e
    return exc is not None and is_transient(exc)


def io(task, reg: RegistryConfig):
    """The task with registry.io_retries retries, delays io_retry_delay_s x 1, 2, 4, ...;
    io_retries: 0 means none."""
    n = reg.io_retries
    if not n:
        return task.with_options(retries=0)
    return task.with_options(retries=n, retry_delay_seconds=[reg.io_retry_delay_s * 2 ** i for i in range(n)],
                             retry_condition_fn=transient_failure)


def io_tasks(reg: RegistryConfig) -> SimpleNamespace:
    """Every @io_task, its retries bound from the config: once per flow run."""
    import tasks.data
    import tasks.evaluation
    import tasks.registry
    import tasks.training  # noqa: F401 - each module declares its I/O tasks

    return SimpleNamespace(**{name: io(t, reg) for name, t in IO_TASKS.items()})
