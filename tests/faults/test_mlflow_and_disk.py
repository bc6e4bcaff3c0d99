"""The tracking server and the artifact store fail under a real `ftpipe run`: the MLflow
server stopped (briefly, then for good) and the artifact store's disk full (a small tmpfs).
Transient failures are retried with back-off, then fail clearly; no alias moves, no
version is left half-registered, and the next run succeeds reusing the finished training."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from tests.helpers import REPO, free_port, make_project, run_cli, start_cli, wait_http

MODEL = "ftpipe-dates"


class Server:
    """`mlflow server` through the project's launcher; stop() and start() keep port and store."""

    def __init__(self, d, artifacts=None):
        self.d, self.port = d, free_port()
        self.artifacts = artifacts or d / "artifacts"
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc = None

    def start(self):
        log = open(self.d / "server.log", "a")
        self.proc = subprocess.Popen([sys.executable, str(REPO / "mlflow/launch.py"), "--backend",
                                      f"sqlite:///{self.d / 'mlflow.db'}", "--artifacts", str(self.artifacts),
                                      "--port", str(self.port), "--workers", "1"],
                                     stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_http(f"{self.uri}/health", 120, self.proc)

    def stop(self):
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    def client(self):
        from mlflow import MlflowClient

        return MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)


def _project(tmp, uri):
    return make_project(tmp, {"registry": {"tracking_uri": uri, "io_retries": 3, "io_retry_delay_s": 0.5},
                              "train": {"max_steps": 300, "log_every": 20}})


def _start(project, env, *overrides):
    proc = start_cli(["run", *overrides], project, env)
    return proc, proc.lines


def _wait_for(lines, proc, text, timeout=300):
    deadline = time.time() + timeout
    while not any(text in line for line in lines):
        assert proc.poll() is None or any(text in line for line in lines), \
            f"run ended before {text!r}:\n{''.join(lines)[-3000:]}"
        assert time.time() < deadline, f"no {text!r} within {timeout} s:\n{''.join(lines)[-3000:]}"
        time.sleep(0.1)


def _finish(proc, lines, timeout=600):
    proc.wait(timeout)
    return proc.output()


def _versions(c):
    return [str(v.version) for v in c.search_model_versions(f"name = '{MODEL}'")]


def test_mlflow_outages_are_retried_then_fail_clearly_and_the_next_run_succeeds(tmp_path, prefect_server):
    server = Server(tmp_path)
    server.start()
    project = _project(tmp_path / "p", server.uri)
    try:
        # 1. the server goes away during training and stays away
        proc, lines = _start(project, prefect_server)
        _wait_for(lines, proc, "step 20/300")
        server.stop()
        out = _finish(proc, lines)
        assert proc.returncode == 1, out[-3000:]
        assert "training goes on, the history is logged after training" in out   # training survived it
        assert "step 300/300" in out
        assert "Retry 3/3 will start 2.0 second(s) from now" in out                  # back-off: 0.5, 1, 2 s
        assert "did not answer after 3 retries" in out and "No alias moved" in out

        # 2. the next run starts while it is still down: its first call to MLflow is retried
        #    with back-off, succeeds once the server is back, and the run completes. Six
        #    retries (0.5 + 1 + ... + 16 s) outlast the server's restart on a loaded machine
        #    (it took over 14 s once in a CI-like run on 2 cores).
        proc, lines = _start(project, prefect_server, "registry.io_retries=6")
        _wait_for(lines, proc, "Retry 1/6 will start 0.5 second(s) from now")
        server.start()
        out = _finish(proc, lines)
        assert proc.returncode == 0, out[-3000:]
        assert "Cached" in out and "already holds these weights" not in out   # training reused; nothing half-done
        c = server.client()
        assert _versions(c) == ["1"]                                          # the failed run registered nothing
        assert str(c.get_model_version_by_alias(MODEL, "champion").version) == "1"
        # the loss curve trained while MLflow was away reached the run that registered it
        run_id = c.get_model_version(MODEL, "1").run_id
        assert [m.step for m in c.get_metric_history(run_id, "train_loss")][-1] == 300
    finally:
        server.stop()


@pytest.fixture
def tmpfs(tmp_path):
    mnt = tmp_path / "artifacts"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()}): the disk-full fault needs one")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_the_artifact_store_disk_full_fails_clearly_and_leaves_no_version(tmp_path, tmpfs, prefect_server):
    server = Server(tmp_path, artifacts=tmpfs)
    server.start()
    project = _project(tmp_path / "p", server.uri)
    filler = tmpfs / "filler"
    try:
        proc, lines = _start(project, prefect_server)
        _wait_for(lines, proc, "step 20/300")
        st = os.statvfs(tmpfs)                      # the disk fills up while training: 200 KB stay free
        with open(filler, "wb") as f:
            f.write(b"\0" * max(0, st.f_bavail * st.f_frsize - 200 * 1024))
        out = _finish(proc, lines)
        assert proc.returncode == 1, out[-3000:]
        assert "error: the disk is full" in out and "No space left on device" in out
        assert "No version was registered and no alias moved" in out
        assert "Retry 1/3" not in out               # a full disk is not retried
        c = server.client()
        assert _versions(c) == []

        filler.unlink()                             # space freed: the next run succeeds
        out = run_cli(["run"], project, prefect_server)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        assert "Cached" in out.stdout + out.stderr
        assert _versions(c) == ["1"]
        local = c.download_artifacts(c.get_model_version(MODEL, "1").run_id, "lineage", str(tmp_path / "dl"))
        assert os.listdir(local)                    # its artifacts are whole
    finally:
        server.stop()
        shutil.rmtree(tmp_path / "dl", ignore_errors=True)
