"""Shared fixtures. Every service a test needs is started here, on 127.0.0.1, in a temp dir."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
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
    # `ftpipe schedule` (Prefect's runner) and `prefect worker` look for runs to start every 10 s by
    # default; a test waits for each run it triggers
    "PREFECT_RUNNER_POLL_FREQUENCY": "1", "PREFECT_WORKER_QUERY_SECONDS": "1",
})
os.environ.pop("MLFLOW_TRACKING_URI", None)

# A model small enough that the whole flow runs in well under a minute on 2 cores.
TINY = {
    "model.build": {"seed": 0, "vocab_size": 320, "hidden_size": 64, "layers": 2, "heads": 2,
                    "intermediate_size": 128, "block_size": 64, "pretrain_steps": 30,
                    "pretrain_batch_size": 16, "pretrain_lr": 0.003},
    "train": {"method": "lora", "max_steps": 60, "batch_size": 16, "lr": 0.01,
              "warmup_steps": 5, "log_every": 20},
    "eval": {"batch_size": 64, "max_new_tokens": 12, "max_examples": 64},
    "incremental": {"start_from": "scratch"},      # tests of incremental runs switch it on
    "registry.promotion": {"primary_metric": "eval_loss", "min_improvement": 0.0,
                           "min_gain_over_base": 0.0, "thresholds": {},
                           # a 0.1M-parameter model cannot hold the date format: no behaviour rule
                           "behaviour": {"min_pass_rate": {}, "must_not_regress": []}},
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


def shared_dir() -> Path:
    """The test session's folder that all its workers share (made and removed by tests/conftest.py)."""
    return Path(os.environ["FTPIPE_TEST_SHARED"])


def once_per_session(name: str, build) -> dict:
    """What build() returned (a JSON document), built by the first worker of the session that asks
    and read by the others: one Prefect server and one trained project for the whole session."""
    import json

    from filelock import FileLock

    record = shared_dir() / f"{name}.json"
    with FileLock(shared_dir() / f"{name}.lock"):
        if not record.exists():
            record.write_text(json.dumps(build()))
    return json.loads(record.read_text())


def start_session_server(shared: Path) -> dict:
    """Start the session's `prefect server` (SQLite, in shared/prefect-home) without waiting for it
    to answer: {"pid", "env"} (the PREFECT_* settings of the commands that use it)."""
    home = shared / "prefect-home"
    home.mkdir()
    port = free_port()
    env = os.environ | {"PREFECT_HOME": str(home), "PREFECT_API_URL": ""}
    with open(home / "server.log", "w") as log:
        proc = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1",
                                 "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    return {"pid": proc.pid, "env": {"PREFECT_HOME": str(home), "PREFECT_API_URL": f"http://127.0.0.1:{port}/api"}}


@pytest.fixture(scope="session")
def prefect_server():
    """A real `prefect server` for the CLI runs of this session, one for all its workers: started as
    the session starts (tests/conftest.py), while the workers start; each waits until it answers.
    The session's end stops it (stop_session_server)."""
    env = once_per_session("prefect-server", lambda: start_session_server(shared_dir()))["env"]
    wait_http(env["PREFECT_API_URL"] + "/health", 120)
    return env


def stop_session_server(shared: Path) -> None:
    """The session's Prefect server (if one started) and what it started: SIGTERM, SIGKILL after 20 s."""
    import json
    import signal

    record = shared / "prefect-server.json"
    if not record.exists():
        return
    pid = json.loads(record.read_text())["pid"]
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 5)):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.time() + wait
        while time.time() < deadline:
            try:   # the session's own child (tests/conftest.py started it): reap it, or it stays a zombie
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass
            try:
                os.killpg(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.2)


def stop(proc: subprocess.Popen, timeout: float = 30) -> None:
    """SIGTERM, then SIGKILL if it has not exited within `timeout` seconds."""
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()


def set_dotted(doc: dict, dotted: str, value) -> None:
    node = doc
    *parents, last = dotted.split(".")
    for p in parents:
        node = node.setdefault(p, {})
    node[last] = value


def make_project(dest: Path, tweaks: dict | None = None, tiny: bool = True, shared_cache: bool = True,
                 relative_remote: bool = False) -> Path:
    """A fresh ftpipe project (a git + DVC repo); tiny-model params unless tiny=False.

    shared_cache: the project's DVC cache is the test session's (FTPIPE_TEST_DVC_CACHE, in
    .dvc/config.local: a git clone of the project has its own and pulls from the remote), so a
    stage another project already ran with the same code, params and data is restored from
    DVC's run-cache instead of run again (the tiny base model, the default data's stages).
    Tests that corrupt or grep cache objects keep their own.
    relative_remote: the remote as ../dvc-remote (no absolute path in a committed file: the
    project can be copied, see copy_project)."""
    for rel in ("ftpipe", "data/sources", "data/incoming", "data/corpus", "data/behaviour", "dvc.yaml", ".dvc/config",
                ".dvc/.gitignore", ".gitignore", ".dvcignore"):
        src = REPO / rel
        if src.is_dir():
            shutil.copytree(src, dest / rel, ignore=shutil.ignore_patterns("__pycache__"), dirs_exist_ok=True)
        elif src.exists():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    # the project's own DVC remote (tests delete and corrupt remote objects), by absolute path as
    # a team's shared remote would be: clones of the project reach the same one
    cache = os.environ.get("FTPIPE_TEST_DVC_CACHE") if shared_cache else None
    remote = "../dvc-remote" if relative_remote else dest.resolve() / "dvc-remote"
    (dest / ".dvc/config").write_text(f"[core]\n    remote = local\n['remote \"local\"']\n    url = {remote}\n")
    if cache:   # this machine's setting, not committed: a clone of the project has a cache of its own
        (dest / ".dvc/config.local").write_text(f"[cache]\n    dir = {cache}\n")
    _write_params(dest, yaml.safe_load((REPO / "params.yaml").read_text()), (TINY if tiny else {}) | (tweaks or {}))
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    subprocess.run(GIT + ["add", "-A"], cwd=dest, check=True)
    subprocess.run(GIT + ["commit", "-qm", "project"], cwd=dest, check=True)
    return dest


GIT = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]


def _write_params(dest: Path, params: dict, tweaks: dict) -> None:
    """params.yaml in dest: params with tweaks ({"section": {key: value}} or {"dotted.key": value})."""
    for key, value in tweaks.items():
        if isinstance(value, dict):
            for k, v in value.items():
                set_dotted(params, f"{key}.{k}", v)
        else:
            set_dotted(params, key, value)
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def copy_project(src: Path, dest: Path, tweaks: dict | None = None) -> Path:
    """A project that has run (made with relative_remote=True), copied to dest as if it had run
    there: every absolute path of src in its files and SQLite stores (MLflow's runs, artifacts
    and versions; results; adapter configs) now names dest, and it has its own DVC remote. Its
    git history is src's (no committed file holds a path), so its versions' lineage verifies.
    tweaks change params.yaml in a commit of their own, as a user's edit after those runs would.
    Faster than running the project again: most tests are about a later run."""
    import sqlite3

    skip = {src / ".dvc" / "tmp", src / "runs" / ".ftpipe-run.holder"}
    shutil.copytree(src, dest, symlinks=True, ignore=lambda d, names: [n for n in names if Path(d) / n in skip])
    old, new = str(src.resolve()), str(dest.resolve())
    for path in dest.rglob("*"):
        if ".git" in path.relative_to(dest).parts or not path.is_file() or path.is_symlink():
            continue
        data = path.read_bytes()
        if data.startswith(b"SQLite format 3\0"):
            con = sqlite3.connect(path)
            for (table,) in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall():
                for col in [c[1] for c in con.execute(f'PRAGMA table_info("{table}")')]:
                    con.execute(f'UPDATE "{table}" SET "{col}" = replace("{col}", ?, ?) '
                                f'WHERE typeof("{col}") = \'text\' AND instr("{col}", ?) > 0', (old, new, old))
            con.commit()
            con.close()
        elif old.encode() in data:
            assert b"\0" not in data, f"{path}: a binary file names the project's path; copy_project rewrites text"
            path.write_bytes(data.replace(old.encode(), new.encode()))
    if tweaks:
        _write_params(dest, yaml.safe_load((dest / "params.yaml").read_text()), tweaks)
        subprocess.run(GIT + ["commit", "-qm", "tweaks", "params.yaml"], cwd=dest, check=True)
    return dest


@dataclass(frozen=True)
class Trained:
    """A tiny project after its first `ftpipe run` (version 1, the champion) and what it printed."""
    project: Path
    output: str


@pytest.fixture(scope="session")
def trained(prefect_server) -> Trained:
    """One tiny project after its first run, for the whole session (its first worker to ask runs
    it): read-only, tests whose subject is a later run take copy_project(trained.project, ...)
    instead of paying a first run."""
    def build() -> dict:
        project = make_project(shared_dir() / "trained" / "proj", relative_remote=True)
        return {"project": str(project), "output": ok(run_cli(["run"], project, prefect_server))}
    done = once_per_session("trained", build)
    return Trained(Path(done["project"]), done["output"])


def _cli_env() -> dict:
    # mlflow.set_tracking_uri() in an earlier test exports MLFLOW_TRACKING_URI: never let
    # that leak into a project's own run
    return {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}


class _Launcher:
    """This worker's tests/launcher.py: `ftpipe` calls forked from a process that has the heavy
    third-party imports done (FTPIPE_TEST_COLD=1: a fresh `ftpipe` process for every call)."""

    def __init__(self):
        import tempfile

        self.dir = Path(tempfile.mkdtemp(prefix="ftpipe-test-launcher-"))
        self.socket = str(self.dir / "s")
        self.proc = subprocess.Popen([sys.executable, str(REPO / "tests" / "launcher.py"), self.socket],
                                     cwd=self.dir, env=_cli_env(), stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if line.strip() != "ready":
            raise RuntimeError(f"tests/launcher.py did not start (exit {self.proc.wait()}): {line}")
        self.calls = 0

    def _request(self, conn: socket.socket, argv: list[str], cwd: Path, env: dict, out: Path, err: Path) -> tuple:
        """Send one command; (its pid, the file its answers arrive on) once it has started."""
        import json

        conn.connect(self.socket)
        conn.sendall((json.dumps({"argv": argv, "cwd": str(cwd), "env": env, "out": str(out),
                                  "err": str(err)}) + "\n").encode())
        answers = conn.makefile("r")
        return json.loads(answers.readline())["pid"], answers

    def start(self, argv: list[str], cwd: Path, env: dict) -> "Started":
        """A command left running (stdout and stderr into one file): see Started."""
        import json

        self.calls += 1
        out = self.dir / f"{self.calls}.log"
        out.touch()   # the reader may open it before the command does
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        pid, answers = self._request(conn, argv, cwd, env, out, out)

        def wait() -> int:
            try:
                return json.loads(answers.readline())["returncode"]
            finally:
                conn.close()
        return Started(pid, out, wait)

    def run(self, argv: list[str], cwd: Path, env: dict, timeout: float) -> subprocess.CompletedProcess:
        import json
        import signal

        self.calls += 1
        out, err = self.dir / f"{self.calls}.out", self.dir / f"{self.calls}.err"
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            pid, answers = self._request(conn, argv, cwd, env, out, err)
            conn.settimeout(timeout)
            try:
                code = json.loads(answers.readline())["returncode"]
            except socket.timeout:
                os.killpg(pid, signal.SIGKILL)
                raise subprocess.TimeoutExpired(argv, timeout, out.read_text(errors="replace"),
                                                err.read_text(errors="replace")) from None
        try:
            return subprocess.CompletedProcess(argv, code, out.read_text(), err.read_text())
        finally:
            out.unlink()
            err.unlink()

    def close(self) -> None:
        stop(self.proc, 10)
        shutil.rmtree(self.dir, ignore_errors=True)


class Started:
    """An `ftpipe` command running in the background (start_cli), with what the tests used of a
    Popen: pid (also its process group: killpg takes what it started), poll(), wait(timeout),
    communicate(timeout) -> (output, None), terminate(), kill(), send_signal(), returncode; and
    its output (stdout and stderr in one file) as it is written: `lines` (the complete lines so
    far, appended by a reader thread) and output() (all of it)."""

    def __init__(self, pid: int, log: Path, wait):
        import threading

        self.pid, self.log, self.returncode = pid, log, None
        self.lines: list[str] = []
        self._done = threading.Event()

        def waiter():
            self.returncode = wait()
            self._done.set()

        def reader():
            with open(log, errors="replace") as f:
                part = ""
                while True:
                    finished = self._done.is_set()
                    chunk = f.read()
                    if chunk:
                        part += chunk
                        *complete, part = part.split("\n")
                        self.lines.extend(line + "\n" for line in complete)
                    elif finished:
                        if part:
                            self.lines.append(part)
                        return
                    else:
                        time.sleep(0.05)
        self._reader = threading.Thread(target=reader, daemon=True)
        threading.Thread(target=waiter, daemon=True).start()
        self._reader.start()

    def poll(self) -> int | None:
        return self.returncode if self._done.is_set() else None

    def wait(self, timeout: float | None = None) -> int:
        if not self._done.wait(timeout):
            raise subprocess.TimeoutExpired(str(self.pid), timeout)
        self._reader.join(10)
        return self.returncode

    def communicate(self, timeout: float | None = None) -> tuple[str, None]:
        self.wait(timeout)
        return self.output(), None

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def send_signal(self, sig: int) -> None:
        if not self._done.is_set():
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def terminate(self) -> None:
        import signal

        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        import signal

        self.send_signal(signal.SIGKILL)


_launcher: _Launcher | None = None


def _launcher_now() -> _Launcher:
    global _launcher
    if _launcher is None or _launcher.proc.poll() is not None:
        _launcher = _Launcher()
        import atexit

        atexit.register(_launcher.close)
    return _launcher


def start_cli(args: list[str], project: Path, env_extra: dict | None = None, env: dict | None = None) -> Started:
    """`ftpipe ARGS --project PROJECT` left running in its own process group (what a test kills,
    signals or waits for): forked from the warm launcher as run_cli's calls are. env: the whole
    environment instead of the session's plus env_extra."""
    argv = [str(BIN / "ftpipe"), *args, "--project", str(project)]
    env = env if env is not None else _cli_env() | {"COLUMNS": "200"} | (env_extra or {})
    if os.environ.get("FTPIPE_TEST_COLD"):
        import tempfile

        fd, name = tempfile.mkstemp(prefix="ftpipe-test-", suffix=".log")
        log = Path(name)
        with os.fdopen(fd, "w") as f:
            proc = subprocess.Popen(argv, cwd=project, env=env, stdout=f, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        return Started(proc.pid, log, proc.wait)
    return _launcher_now().start(argv, project, env)


def run_cli(args: list[str], project: Path, env_extra: dict | None = None,
            timeout: int = 600) -> subprocess.CompletedProcess:
    """`ftpipe ARGS --project PROJECT` in a new process, in PROJECT, with the test session's
    environment plus env_extra; forked from this worker's warm launcher (tests/launcher.py)."""
    argv = [str(BIN / "ftpipe"), *args, "--project", str(project)]
    env = _cli_env() | {"COLUMNS": "200"} | (env_extra or {})
    if os.environ.get("FTPIPE_TEST_COLD"):
        return subprocess.run(argv, cwd=project, env=env, capture_output=True, text=True, timeout=timeout)
    return _launcher_now().run(argv, project, env, timeout)


def mlflow_client(project: Path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{project / 'mlflow' / 'mlflow.db'}"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def ok(proc: subprocess.CompletedProcess) -> str:
    """The output (stdout, then stderr) of a command that must have succeeded."""
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}"
    return proc.stdout + proc.stderr


def ok_json(proc: subprocess.CompletedProcess):
    """The JSON document a command printed; it must have succeeded."""
    ok(proc)
    import json

    return json.loads(proc.stdout)


def dates_rows(n: int) -> list[dict]:
    """The first n rows of the embedded date task."""
    import json

    return [json.loads(line) for line in (REPO / "data/sources/dates.jsonl").read_text().splitlines()[:n]]


def write_rows(path: Path, rows: list[dict]) -> Path:
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def build_tiny_base(dest: Path) -> Path:
    """An untrained 0.1M-parameter Llama with the project's tokenizer, saved like any checkpoint."""
    from ftpipe.config import BuildConfig
    from ftpipe.training.basemodel import build_base_model

    build_base_model(REPO / "data/corpus/corpus.jsonl", dest, BuildConfig(
        vocab_size=320, hidden_size=64, layers=2, heads=2, intermediate_size=128, pretrain_steps=0),
        log=lambda m: None)
    return dest


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    """One tiny base model for every test that trains or loads one directly (read-only: copy
    it before changing it)."""
    return build_tiny_base(tmp_path_factory.mktemp("tiny-base") / "base")


# ------------------------------------------------------------------ the training engine

QUIET = dict(log=lambda m: None)


@pytest.fixture(scope="session")
def tiny(tiny_base, tmp_path_factory) -> Path:
    """A folder with base/ (the tiny base), train.jsonl (80 date rows) and val.jsonl (16)."""
    d = tmp_path_factory.mktemp("tiny-engine")
    (d / "base").symlink_to(tiny_base)
    rows = dates_rows(96)
    write_rows(d / "train.jsonl", rows[:80])
    write_rows(d / "val.jsonl", rows[80:])
    return d


def engine_cfg(tiny: Path, **train):
    """(model, lora, train) configs of a short LoRA run on the tiny base."""
    from ftpipe.config import LoraConfig, ModelConfig, TrainConfig

    return (ModelConfig(base=str(tiny / "base")), LoraConfig(r=4, alpha=8),
            TrainConfig(**({"max_steps": 8, "batch_size": 8, "log_every": 1, "warmup_steps": 1,
                            "checkpoint_every": 0} | train)))


def losses(res) -> list[float]:
    return [loss for _, loss in res.loss_history]


def run_spec(spec: Path, env: dict | None = None) -> subprocess.Popen:
    """One training process (python -m ftpipe.training.launch SPEC), as the launcher starts it."""
    return subprocess.Popen([sys.executable, "-m", "ftpipe.training.launch", str(spec)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=os.environ | {"PYTHONPATH": str(REPO)} | (env or {}))


def killed_after_step(tiny: Path, out: Path, m, lo, t, step: int = 15) -> tuple[Path, Path]:
    """A training process (its own launcher spec in out/) SIGKILLed once step `step`'s checkpoint exists."""
    import signal

    from ftpipe.training.launch import write_spec

    out.mkdir()
    spec = write_spec(out / "spec.json", m, lo, t, str(tiny / "train.jsonl"), str(tiny / "val.jsonl"), str(out))
    proc = run_spec(spec)
    deadline = time.time() + 120
    while not (out / "checkpoints" / f"step-{step:07d}").is_dir():
        assert proc.poll() is None and time.time() < deadline, "no checkpoint before the run ended"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return out, spec


# ------------------------------------------------------------------ PostgreSQL

PG = "postgresql://postgres@127.0.0.1:5432"


def postgres_reachable() -> bool:
    try:
        import psycopg

        psycopg.connect(f"{PG}/postgres", connect_timeout=3).close()
        return True
    except Exception:   # noqa: BLE001
        return False


# Tests on a real PostgreSQL (a SQL source, MLflow's and Prefect's PostgreSQL backends): skipped
# on a laptop without one, run in CI (.ci/run checks it answers).
needs_postgres = pytest.mark.skipif(not postgres_reachable(), reason="no PostgreSQL on 127.0.0.1:5432 (CI has one)")
