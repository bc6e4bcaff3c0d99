"""One project, one Prefect run store: a flow run started with no Prefect API (`make run`)
lands where `ftpipe prefect-server --project P` serves from, and the lineage's Prefect link
verifies whichever way it is checked. A colleague's `git clone` of the project on the same
machine pulls every stage output from the shared DVC remote, and every version's lineage is
whole there too."""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

from tests.helpers import ok, ok_json, BIN, REPO, free_port, make_project, run_cli, start_cli, wait_http

MODEL = "ftpipe-dates"



def _flow_run(project, version: str, env: dict) -> dict:
    """The Prefect link of `ftpipe lineage models:/NAME/VERSION` (the whole chain must verify)."""
    return ok_json(run_cli(["lineage", f"models:/{MODEL}/{version}", "--json"], project, env))[
        "prefect_flow_run"]


def test_runs_without_a_prefect_api_share_the_projects_store(tmp_path):
    """`ftpipe run` with no PREFECT_API_URL (what `make run` does) records its flow run in the project's
    store: `ftpipe lineage` finds it through `ftpipe prefect-server --project P` (PREFECT_API_URL set to it,
    or not set at all: the project's commands find their server), and, with that server stopped, in
    .prefect/prefect.db; a run made while the server runs is found there afterwards too."""
    project = make_project(tmp_path / "project")
    no_api = {"PREFECT_API_URL": "", "PREFECT_HOME": str(tmp_path / "users-prefect-home")}   # a user's own home
    first = run_cli(["run"], project, no_api)
    ok(first)
    assert "Starting temporary server" in first.stdout + first.stderr     # no server of the project's yet
    v1 = _flow_run(project, "1", no_api)
    assert v1["found"] is True and v1["state"].endswith(": Completed"), v1

    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"} | no_api
    server = start_cli(["prefect-server", "--port", str(port)], project, env=env)
    try:
        wait_http(f"http://127.0.0.1:{port}/api/health", 180, server)
        api = no_api | {"PREFECT_API_URL": f"http://127.0.0.1:{port}/api"}
        assert _flow_run(project, "1", api) == v1                        # the make-run run is on the server
        _commit(project, "data version of v1")
        shutil.copy(REPO / "data/drops/drop-0002.jsonl", project / "data/incoming")   # a drop lands
        second = run_cli(["run"], project, no_api)                         # no API: talks to that server
        ok(second)
        assert "temporary server" not in second.stdout + second.stderr, second.stderr[-2000:]
        lineage = ok_json(run_cli(["lineage", f"models:/{MODEL}/2", "--json"], project, no_api))
        assert lineage["prefect_flow_run"]["found"] is True
        assert lineage["code"]["dirty"] is False       # a drop and the updated dvc.lock are DVC's to version
        _commit(project, "data version of v2")
        _clone_pulls_every_version(project, tmp_path / "colleague", api)
    finally:
        server.terminate()
        server.wait(60)
    v2 = _flow_run(project, "2", no_api)                                 # the server's run, from the file
    assert v2["found"] is True and v2["state"].endswith(": Completed"), v2


def _commit(project: Path, message: str) -> None:
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(git + ["add", "-A"], cwd=project, check=True)
    subprocess.run(git + ["commit", "-qm", message], cwd=project, check=True)


def _md5s(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.md5(p.read_bytes()).hexdigest()
            for out in ("data/collected", "data/cleaned", "data/splits", "models/base")
            for p in sorted((root / out).rglob("*")) if p.is_file()}


def _clone_pulls_every_version(project: Path, clone: Path, api: dict) -> None:
    """`git clone` + `dvc pull` on the same machine: the remote in .dvc/config is shared, so
    every stage output of the committed dvc.lock arrives byte for byte, and each version's
    lineage is whole in the clone, with PREFECT_API_URL set (the project's server) or not."""
    subprocess.run(["git", "clone", "-q", str(project), str(clone)], check=True)
    pull = subprocess.run([str(BIN / "dvc"), "pull"], cwd=clone, capture_output=True, text=True)
    assert pull.returncode == 0, pull.stdout[-2000:] + pull.stderr[-2000:]
    got, want = _md5s(clone), _md5s(project)
    assert got == want and len(got) > 8
    status = ok_json(run_cli(["data", "status", "--json"], clone))
    assert status["remote"] == {"name": "local", "url": str(project / "dvc-remote")}
    registry = {"MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow' / 'mlflow.db'}"}
    for env in (api | registry, {"PREFECT_API_URL": "", "PREFECT_HOME": api["PREFECT_HOME"]} | registry):
        for version in ("1", "2"):
            proc = run_cli(["lineage", f"models:/{MODEL}/{version}"], clone, env)
            assert proc.returncode == 0, f"v{version}, PREFECT_API_URL={env['PREFECT_API_URL']!r}:\n" + \
                proc.stdout[-3000:] + proc.stderr[-3000:]
            assert "lineage verified: every link holds" in proc.stdout and "(dirty)" not in proc.stdout
