"""Serve the MLflow UI / tracking server on ftpipe's store (no __init__.py here on purpose:
this folder must never shadow the `mlflow` package).

    make ui                                                  # the same as the next line
    .venv/bin/python mlflow/launch.py                        # SQLite store in mlflow/, port 5000
    .venv/bin/python mlflow/launch.py --backend postgresql://postgres@127.0.0.1:5432/mlflow
    .venv/bin/python mlflow/launch.py --port 5001 --host 127.0.0.1

Binds to 127.0.0.1 unless --host says otherwise. Artifacts stay in mlflow/artifacts,
where `ftpipe run` writes them when no server is running.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def server_command(backend: str, artifacts: Path, host: str, port: int, workers: int = 2) -> list[str]:
    return [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend,
            "--artifacts-destination", str(artifacts), "--default-artifact-root", artifacts.as_uri(),
            "--host", host, "--port", str(port), "--workers", str(workers)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", default=f"sqlite:///{HERE / 'mlflow.db'}",
                    help="backend store URI (default: SQLite in mlflow/)")
    ap.add_argument("--artifacts", type=Path, default=HERE / "artifacts")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=5000)
    ap.add_argument("--workers", type=int, default=2, help="server worker processes (default 2)")
    args = ap.parse_args()
    try:
        import mlflow  # noqa: F401
    except ImportError:
        sys.exit(f"mlflow is not installed for {sys.executable}: run `make install`, then "
                 "`.venv/bin/python mlflow/launch.py`")
    args.artifacts.mkdir(parents=True, exist_ok=True)
    cmd = server_command(args.backend, args.artifacts.resolve(), args.host, args.port, args.workers)
    # Never print a password: postgresql://user:secret@host/db is shown as host/db.
    shown = args.backend.split("@")[-1] if "@" in args.backend else args.backend
    print(f"MLflow on http://{args.host}:{args.port}  (store: {shown})", flush=True)
    # MLflow 3's server also starts ~8 job-runner processes (huey consumers, for GenAI jobs
    # ftpipe never submits): 10 s of CPU at each start and polling after. Off unless asked.
    os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    os.execv(cmd[0], cmd)


if __name__ == "__main__":
    main()
