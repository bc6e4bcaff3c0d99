"""Shared fixtures. Every service a test needs is started here, on 127.0.0.1, in a temp dir."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

# Quiet, offline, reproducible: set before anything imports these libraries.
os.environ.update({
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1",
    "GX_ANALYTICS_ENABLED": "false", "DVC_NO_ANALYTICS": "1", "HF_HUB_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1", "TOKENIZERS_PARALLELISM": "false",
})
os.environ.pop("MLFLOW_TRACKING_URI", None)

# A model small enough that the whole flow runs in well under a minute on 2 cores.
TINY = {
    "model.build": {"seed": 0, "vocab_size": 320, "hidden_size": 64, "layers": 2, "heads": 2,
                    "intermediate_size": 128, "block_size": 64, "pretrain_steps": 30,
                    "pretrain_batch_size": 16, "pretrain_lr": 0.003},
    "train": {"method": "lora", "max_steps": 120, "batch_size": 16, "lr": 0.01,
              "warmup_steps": 5, "log_every": 20},
    "eval": {"batch_size": 64, "max_new_tokens": 12, "max_examples": 64},
    "incremental": {"start_from": "scratch"},      # tests of incremental runs switch it on
    "registry.promotion": {"primary_metric": "eval_loss", "min_improvement": 0.0,
                           "min_gain_over_base": 0.0, "thresholds": {}},
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server for {url} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout}s")


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """A real `prefect server` (SQLite) for the CLI runs of this session."""
    home = tmp_path_factory.mktemp("prefect-home")
    port = free_port()
    env = os.environ | {"PREFECT_HOME": str(home), "PREFECT_API_URL": ""}
    log = open(home / "server.log", "w")
    proc = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1",
                             "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_http(f"http://127.0.0.1:{port}/api/health", 120, proc)
        yield {"PREFECT_HOME": str(home), "PREFECT_API_URL": f"http://127.0.0.1:{port}/api"}
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def set_dotted(doc: dict, dotted: str, value) -> None:
    node = doc
    *parents, last = dotted.split(".")
    for p in parents:
        node = node.setdefault(p, {})
    node[last] = value


def make_project(dest: Path, tweaks: dict | None = None, tiny: bool = True) -> Path:
    """A fresh ftpipe project (a git + DVC repo); tiny-model params unless tiny=False."""
    for rel in ("ftpipe", "data/sources", "data/incoming", "data/corpus", "dvc.yaml", ".dvc/config",
                ".dvc/.gitignore", ".gitignore", ".dvcignore"):
        src = REPO / rel
        if src.is_dir():
            shutil.copytree(src, dest / rel, ignore=shutil.ignore_patterns("__pycache__"), dirs_exist_ok=True)
        elif src.exists():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    # the project's own DVC remote (tests delete and corrupt remote objects), by absolute path as
    # a team's shared remote would be: clones of the project reach the same one
    (dest / ".dvc/config").write_text(f"[core]\n    remote = local\n['remote \"local\"']\n"
                                      f"    url = {dest.resolve() / 'dvc-remote'}\n")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for key, value in ((TINY if tiny else {}) | (tweaks or {})).items():
        if isinstance(value, dict):
            for k, v in value.items():
                set_dotted(params, f"{key}.{k}", v)
        else:
            set_dotted(params, key, value)
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    subprocess.run(git + ["add", "-A"], cwd=dest, check=True)
    subprocess.run(git + ["commit", "-qm", "project"], cwd=dest, check=True)
    return dest


def run_cli(args: list[str], project: Path, env_extra: dict | None = None,
            timeout: int = 600) -> subprocess.CompletedProcess:
    # mlflow.set_tracking_uri() in an earlier test exports MLFLOW_TRACKING_URI: never let
    # that leak into a project's own run
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    env = env | {"COLUMNS": "200"} | (env_extra or {})
    return subprocess.run([str(BIN / "ftpipe"), *args, "--project", str(project)], cwd=project,
                          env=env, capture_output=True, text=True, timeout=timeout)


def mlflow_client(project: Path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{project / 'mlflow' / 'mlflow.db'}"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)
