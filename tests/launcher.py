"""A warm launcher for the tests' `ftpipe` calls (tests/helpers.run_cli).

Every `ftpipe` command imports some of torch, transformers, peft, MLflow and Great Expectations
before it does anything: 5-14 CPU-seconds a call on this 2-core machine, paid ~160 times a
suite. This process imports those third-party libraries once (never ftpipe, flows or tasks,
whose module state must start fresh) and forks a new process for each call, which then runs
the `ftpipe` console script exactly as the installed one would: the call's own argv, working
directory and environment, stdin from /dev/null, stdout and stderr to files, the console
script's sys.path, fresh random seeds, normal interpreter exit (atexit handlers run). What a
command does is unchanged; only the imports are inherited.

    python tests/launcher.py SOCKET

A request is one JSON line on a Unix socket: {"argv", "cwd", "env", "out", "err"} (out == err:
both streams to one file). The answer
is two JSON lines: {"pid"} of the process running the command once it started, then
{"returncode"} (negative: killed by that signal, as subprocess reports it) once it ended.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading

# What the commands import (measured: with these done, what `ftpipe run`, `data status`, `models`,
# `lineage`, `export` and `generate` import besides took 0.8 s).
PRELOAD = ("torch", "torch.distributed.tensor", "torch._dynamo", "transformers",
           "transformers.models.llama.modeling_llama", "transformers.models.qwen2.modeling_qwen2", "peft",
           "mlflow", "mlflow.pyfunc", "mlflow.tracking", "mlflow.store.tracking.sqlalchemy_store",
           "great_expectations", "sqlalchemy.orm", "alembic", "scipy.optimize", "sklearn", "dvc.repo", "dvc_data",
           "accelerate", "pandas", "matplotlib.pyplot", "nltk", "networkx", "pydantic", "rich", "typer", "yaml")
# Prefect's modules, but not `prefect.main` (what `from prefect import flow` runs: it sets up
# logging from the settings). Prefect reads its settings (PREFECT_HOME, PREFECT_API_URL, ...) from
# the environment into one global context at import; every call brings its own, so the child
# rebuilds that context (prefect.context.refresh_global_settings_context) before anything reads it.
PREFECT = ("prefect.context", "prefect.settings", "prefect.flows", "prefect.tasks", "prefect.states", "prefect.futures",
           "prefect.task_runners", "prefect.cache_policies", "prefect.runtime", "prefect.artifacts",
           "prefect.schedules", "prefect.client.orchestration", "prefect.client.schemas.objects",
           "prefect.logging.handlers")


def _preload() -> int:
    """Import PRELOAD; returns torch's thread count for a process with no OMP_NUM_THREADS."""
    import importlib

    import torch

    default_threads = torch.get_num_threads()
    # One thread while importing: GNU OpenMP's pool does not survive a fork (a child that
    # starts a parallel region where its parent had a pool hangs), so the launcher never makes one.
    torch.set_num_threads(1)
    for name in PRELOAD:
        importlib.import_module(name)
    import tempfile

    home = tempfile.mkdtemp(prefix="ftpipe-launcher-prefect-")   # where the launcher's own settings point
    os.environ.update({"PREFECT_HOME": home, "PREFECT_API_URL": "", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                       "DO_NOT_TRACK": "1"})
    for name in PREFECT:
        importlib.import_module(name)
    if "prefect.main" in sys.modules:
        raise SystemExit("launcher: prefect.main was imported: its logging set-up would hold the launcher's settings")
    # a fork copies only the calling thread: no Python thread may be running beside it (native
    # ones that handle fork themselves are left: OpenBLAS's pool, pyarrow's jemalloc thread)
    extra = [t.name for t in threading.enumerate() if t is not threading.main_thread()]
    if extra:
        raise SystemExit(f"launcher: threads running after the imports ({extra}): cannot fork safely")
    # the imported objects are permanent: a child's garbage collector then never walks them
    # (each walk would touch, hence copy, every page the imports filled)
    import gc

    gc.collect()
    gc.freeze()
    return default_threads


def _command(req: dict, default_threads: int) -> None:
    """In the forked process: become `ftpipe ARGS` as a fresh console-script process would be."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    os.setpgid(0, 0)   # its own group: a timeout kills the command and whatever it started
    os.chdir(req["cwd"])
    os.environ.clear()
    os.environ.update(req["env"])
    import prefect.context

    prefect.context.refresh_global_settings_context()   # this call's PREFECT_* settings
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    for fd, path in ((1, req["out"]), (2, req["err"])):
        if fd == 2 and path == req["out"]:   # one file for both, as stderr=STDOUT
            os.dup2(1, 2)
            continue
        f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(f, fd)
        os.close(f)
    import random

    import numpy as np

    import torch

    random.seed()
    np.random.seed()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or default_threads))
    bindir = os.path.dirname(req["argv"][0])
    sys.path[0] = bindir          # a console script's sys.path starts with its own folder
    sys.argv = list(req["argv"])
    from ftpipe.cli import app

    sys.exit(app())


def _serve_one(conn: socket.socket, default_threads: int) -> None:
    """In the forked supervisor: start the command, report its pid, wait, report its status."""
    req = json.loads(conn.makefile("r").readline())
    pid = os.fork()
    if pid == 0:
        conn.close()
        _command(req, default_threads)   # never returns: SystemExit ends the interpreter normally
    conn.sendall((json.dumps({"pid": pid}) + "\n").encode())
    import time

    began = time.monotonic()
    _, status, usage = os.wait4(pid, 0)
    code = os.waitstatus_to_exitcode(status)   # -N: killed by signal N, as subprocess says
    if os.environ.get("FTPIPE_TEST_ACCOUNT"):   # where the suite's time goes: one line per command
        with open(os.environ["FTPIPE_TEST_ACCOUNT"], "a") as f:
            f.write(json.dumps({"argv": req["argv"][1:], "cwd": req["cwd"], "wall": round(time.monotonic() - began, 2),
                                "cpu": round(usage.ru_utime + usage.ru_stime, 2), "code": code}) + "\n")
    try:
        conn.sendall((json.dumps({"returncode": code}) + "\n").encode())
    finally:
        os._exit(0)


def main(path: str) -> None:
    default_threads = _preload()
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(16)
    server.settimeout(1.0)
    print("ready", flush=True)
    while True:
        try:   # reap finished supervisors
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass
        except ChildProcessError:
            pass
        if os.getppid() == 1:   # the test worker is gone
            return
        try:
            conn, _ = server.accept()
        except socket.timeout:
            continue
        conn.settimeout(None)
        if os.fork() == 0:
            server.close()
            _serve_one(conn, default_threads)
        conn.close()


if __name__ == "__main__":
    main(sys.argv[1])
