"""Trial processes started warm. Each trial still runs in a process of its own (a crash or a
kill ends that trial only; its memory, GPU memory included, goes back when it ends), but the
process is forked from a server that has imported torch, transformers, peft and optuna once
(multiprocessing's forkserver, preloading ftpipe.sweeps.warm), instead of a fresh interpreter that
spends ~6 CPU-seconds importing them before every trial.

The server never touches CUDA and runs torch on one thread while it imports (a GNU OpenMP
thread pool does not survive a fork): each trial sets its own thread count and devices.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

def _context():
    import multiprocessing

    ctx = multiprocessing.get_context("forkserver")
    # read when the first trial of this process starts the server; '__main__' imported there once,
    # not again in every trial (multiprocessing prepares each child from the parent's main module)
    ctx.set_forkserver_preload(["__main__", "ftpipe.sweeps.warm"])
    return ctx


def _die_with(pid: int) -> None:
    """SIGKILL this process when process `pid` (the sweep that started the trial) ends. The kernel's
    parent-death signal does not serve: a trial's parent is the server, which outlives a killed sweep
    while the sweep's trials run (each holds the server's keep-alive pipe)."""
    import select
    import signal

    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        os.kill(os.getpid(), signal.SIGKILL)

    def watch() -> None:
        select.select([fd], [], [])        # readable once that process has exited
        os.kill(os.getpid(), signal.SIGKILL)
    threading.Thread(target=watch, daemon=True, name="die-with-sweep").start()


def _trial(spec: str, log: str, cwd: str, env: dict[str, str], sweep: int) -> None:
    """In the forked trial process: the trial's own directory, environment and output file; it
    ends with the sweep process that started it."""
    _die_with(sweep)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    import torch

    torch.set_num_threads(int(env.get("OMP_NUM_THREADS") or os.cpu_count() or 1))
    from ftpipe.sweeps.trial import main

    code = main([spec])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)   # nothing of the server's to tear down: the trial's files are written and closed


def run(spec: Path, cwd: str, env: dict[str, str], on_line) -> int:
    """Run the trial of `spec` in a process forked from the warm server; each line it prints is
    passed to on_line as it comes. Returns its exit code (negative: killed by that signal)."""
    log = spec.with_suffix(".log")
    log.touch()
    proc = _context().Process(target=_trial, args=(str(spec), str(log), cwd, env, os.getpid()), name=f"trial-{spec.stem}")
    proc.start()
    with open(log, errors="replace") as f:
        part = ""
        while True:
            alive = proc.is_alive()
            chunk = f.read()
            if chunk:
                part += chunk
                *lines, part = part.split("\n")
                for line in lines:
                    on_line(line)
            elif not alive:
                break
            else:
                time.sleep(0.2)
        if part:
            on_line(part)
    proc.join()
    return proc.exitcode
