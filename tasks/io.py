"""Retries for the tasks that do I/O (MLflow, DVC remotes, the artifact store): Prefect
retries them with exponential back-off when the failure is transient (ftpipe.retry), and
never when it is deterministic. Training, cleaning and evaluation are never retried whole."""

from __future__ import annotations

import os

from ftpipe.config import RegistryConfig
from ftpipe.retry import is_transient

# MLflow's own HTTP client retries up to 7 times with back-off (minutes against a stopped
# server) before a task even sees the failure: Prefect owns retries here, so MLflow makes one.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")


def transient_failure(task, task_run, state) -> bool:
    exc = state.data if isinstance(state.data, BaseException) else None
    if exc is None:
        try:
            state.result(raise_on_failure=True)
        except BaseException as e:   # noqa: BLE001 - classified, not swallowed
            exc = e
    return exc is not None and is_transient(exc)


def io(task, reg: RegistryConfig):
    """The task with registry.io_retries retries, delays io_retry_delay_s x 1, 2, 4, ..."""
    n = reg.io_retries
    if not n:   # io_retries: 0 means none, whatever the task's own decorator says
        return task.with_options(retries=0)
    return task.with_options(retries=n, retry_delay_seconds=[reg.io_retry_delay_s * 2 ** i for i in range(n)],
                             retry_condition_fn=transient_failure)
