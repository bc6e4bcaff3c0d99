"""One retrain at a time per project. Two flows started together on one machine (a cron
run and a manual one, two `--if-new-data` hooks) would otherwise run DVC stages over the
same files, train into the same checkpoint folder and race to register the same
candidate: the second waits for the first, says so, then runs (and usually finds the data
unchanged and the candidate registered). The lock is the OS's (released when the process
dies, SIGKILL included); the holder's pid and start time are kept beside it for the message."""

from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator


@contextmanager
def project_lock(root: Path, log: Callable[[str], None] = print, poll_s: float = 60.0) -> Iterator[None]:
    from filelock import FileLock, Timeout

    runs = Path(root) / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    lock, info = FileLock(str(runs / ".ftpipe-run.lock")), runs / ".ftpipe-run.holder"
    start, waited = time.monotonic(), False
    while True:
        try:
            lock.acquire(timeout=poll_s if waited else 0)
            break
        except Timeout:
            try:
                holder = json.loads(info.read_text())
                who = f"pid {holder['pid']}, started {holder['since']}"
            except (OSError, ValueError, KeyError):
                who = "holder unknown"
            log(f"another retrain is running in this project ({who}): waiting for it "
                f"({time.monotonic() - start:.0f} s so far)")
            waited = True
    if waited:
        log(f"the other retrain finished: this one starts now (waited {time.monotonic() - start:.0f} s)")
    try:
        info.write_text(json.dumps({"pid": os.getpid(), "since": time.strftime("%Y-%m-%d %H:%M:%S %Z")}))
        yield
    finally:
        lock.release()
