"""Prefect around the flows, for the CLI and the flows: which run store a project uses, serving
a deployment whose stop never rewrites a finished run, a terminal without tracebacks, the
final state and outcome artifact of a run, the hook that marks a failed run's MLflow run, and
reading a flow run back for the lineage audit. The library (ftpipe/) never imports prefect;
the CLI imports this module only inside the commands that need it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from prefect import Flow
    from prefect.client.schemas.objects import FlowRun

    from ftpipe.config import ScheduleConfig


def quiet_terminal() -> None:
    """Prefect prints a traceback for each failed task and for the flow; a failed `ftpipe run`
    ends with one `error:` line instead. The tracebacks stay in the run's log on the Prefect
    server (the UI, `prefect flow-run logs ID`): only the terminal's copy goes."""
    import logging

    from prefect.logging.handlers import PrefectConsoleHandler

    class OneLine(logging.Formatter):
        def __init__(self, inner: logging.Formatter | None):
            super().__init__()
            self.inner = inner or logging.Formatter()

        def format(self, record: logging.LogRecord) -> str:
            saved = record.exc_info, record.exc_text, record.stack_info
            record.exc_info = record.exc_text = record.stack_info = None
            try:
                return self.inner.format(record)
            finally:
                record.exc_info, record.exc_text, record.stack_info = saved

    for handler in logging.getLogger().handlers:
        if isinstance(handler, PrefectConsoleHandler) and not isinstance(handler.formatter, OneLine):
            handler.setFormatter(OneLine(handler.formatter))


def project_server(project: Path) -> str | None:
    """The API URL of this project's `ftpipe prefect-server` (recorded in .prefect/server.json) if it answers."""
    import json
    import urllib.request

    try:
        record = json.loads((project / ".prefect" / "server.json").read_text())
        os.kill(record["pid"], 0)
        with urllib.request.urlopen(f"{record['url']}/health", timeout=3):
            return record["url"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def project_store(project: Path) -> str | None:
    """One project, one Prefect run store, however a command is started. With no Prefect API set
    (environment, profile, prefect.toml): this project's `ftpipe prefect-server` when it answers, else
    Prefect's temporary server on the file that server serves, PROJECT/.prefect/prefect.db (not the
    user-wide $PREFECT_HOME one). Call before anything else imports prefect. Returns the API URL, if any."""
    from prefect.context import refresh_global_settings_context
    from prefect.settings import get_current_settings

    settings = get_current_settings()
    if settings.api.url:
        return settings.api.url
    url = project_server(project)
    if url:
        os.environ["PREFECT_API_URL"] = url
    elif "connection_url" not in settings.server.database.model_fields_set:   # unless one is set
        (project / ".prefect").mkdir(exist_ok=True)
        os.environ["PREFECT_SERVER_DATABASE_CONNECTION_URL"] = f"sqlite+aiosqlite:///{project}/.prefect/prefect.db"
    refresh_global_settings_context()
    return url


def serve(flow: Flow, name: str, schedule: ScheduleConfig, **deployment: Any) -> None:
    """`flow.serve(name, cron, **deployment)` until stopped, one run at a time in the workspace,
    except that stopping it never rewrites a run that has finished.

    On SIGTERM Prefect 3.9's runner cancels every run whose process it still tracks (Runner.astop ->
    CancellationManager.cancel_all) and ends each with a forced CANCELLED (StateProposer.propose_cancelled:
    set_flow_run_state(force=True), which skips the server's orchestration rules). A run is still tracked
    after it has reported COMPLETED, while its process tears down: its engine sends the outcome receipt
    that makes the runner skip it only at the very end. A stop in that window turned COMPLETED into
    CANCELLED. Here a finished run's process is left to exit, and CANCELLED never replaces a final state."""
    import asyncio

    from prefect.runner import Runner

    class Serving(Runner):
        async def __aenter__(self) -> Serving:
            await super().__aenter__()
            force_cancelled = self._state_proposer.propose_cancelled

            async def propose_cancelled(flow_run: FlowRun, state_updates: dict | None = None) -> bool:
                state = (await self._client.read_flow_run(flow_run.id)).state
                if state is not None and state.is_final():   # it ended before the stop reached it
                    return False
                return await force_cancelled(flow_run, state_updates)

            self._state_proposer.propose_cancelled = propose_cancelled
            return self

        async def cancel_all(self) -> None:
            for run_id in self._process_manager.flow_run_ids():
                state = (await self._client.read_flow_run(run_id)).state
                if state is not None and state.is_final():   # finished, tearing down: let it exit
                    await self._process_manager.wait_for_exit(run_id, grace_seconds=60)
            await super().cancel_all()

    from prefect.schedules import Cron

    runner = Serving(name=name)
    runner.add_flow(flow, name=name, schedule=Cron(schedule.cron, timezone=schedule.timezone), tags=["ftpipe"],
                    concurrency_limit=1, **deployment)
    try:
        asyncio.run(runner.start())
    except KeyboardInterrupt:
        pass


def outcome(res, data=None):
    """A run's final state: Completed, or Completed named "Skipped" for a run that trained
    nothing, with what happened as its message and as a markdown artifact, so the Prefect UI
    tells a skipped run from a promotion or a refusal at a glance."""
    from prefect.artifacts import create_markdown_artifact
    from prefect.states import Completed

    if hasattr(res, "promotion"):
        p, name_ = res.promotion, res.cfg.registry.model_name
        name, message = "Completed", f"{p.decision.verdict} {name_} v{p.version}: {p.decision.summary()}"
        rows = [("outcome", f"{p.decision.verdict.upper()} {name_} v{p.version}"),
                ("aliases", ", ".join(p.aliases) or "—"),
                ("champion", f"v{p.champion_after or '—'} (was v{p.champion_before or '—'})")]
        rows += [(r.rule, ("passed: " if r.passed else "FAILED: ") + r.detail) for r in p.decision.reasons]
    else:
        name, message = "Skipped", f"{res.message} (champion: {res.champion or 'none'}); nothing trained"
        rows = [("outcome", "skipped: nothing trained, no alias moved"), ("why", res.message)]
    rows.append(("MLflow run", res.run_id))
    cell = lambda text: str(text).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    create_markdown_artifact(key="retrain-outcome", description=message[:500],
                             markdown="| | |\n|---|---|\n" + "\n".join(f"| {cell(k)} | {cell(v)} |" for k, v in rows))
    return Completed(name=name, message=message[:1000], data=res if data is None else data)


def mark_run_failed(flow, flow_run, state) -> None:
    """Flow hook (on_failure, on_crashed): the MLflow run this flow run started is marked
    FAILED, so a failed run never looks finished or running in MLflow. When MLflow itself is
    what failed, the log says so and the run stays as it was."""
    from ftpipe.config import load_config, parse_config
    from ftpipe.registry import runs, store

    params = flow_run.parameters or {}
    try:
        root = Path(params.get("root", ".")).resolve()
        cfg = parse_config(params["cfg"]) if isinstance(params.get("cfg"), dict) else (
            params["cfg"] if "cfg" in params else load_config(root / params.get("config", "params.yaml")))
        store.setup(cfg.registry, root)
        for run_id in runs.runs_of_flow_run(str(flow_run.id)):
            runs.finish_run(run_id, "FAILED")
    except Exception as exc:   # noqa: BLE001 - a hook must not hide the run's own failure
        print(f"(could not mark the MLflow run of flow run {flow_run.id} FAILED: {type(exc).__name__}: {exc})")


def read_flow_run(flow_run_id: str) -> tuple[bool | None, str]:
    """(found, "NAME: STATE") of a recorded flow run, for the lineage audit: from PREFECT_API_URL's
    server, else the project's store (see project_store); (None, why) when it cannot be told."""
    if not flow_run_id or flow_run_id == "local":
        return None, "no Prefect flow run recorded (flow ran without an API)"
    found = _read_store_file(flow_run_id)
    if found is not None:
        return found
    try:
        import uuid

        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as c:
            fr = c.read_flow_run(uuid.UUID(flow_run_id))
        return True, f"{fr.name}: {fr.state.name if fr.state else '?'}"
    except Exception as exc:  # noqa: BLE001
        name = type(exc).__name__
        if name == "ObjectNotFound":
            from prefect.settings import PREFECT_API_URL

            if not PREFECT_API_URL.value():   # the project's own store: maybe not where it ran
                return None, ("not checked: not in this project's Prefect store (.prefect/prefect.db); set "
                              "PREFECT_API_URL to the server the flow ran on")
            return False, f"not found on the Prefect server {PREFECT_API_URL.value()}"
        return None, f"not checked: {name}: {str(exc)[:120]}"


def _read_store_file(flow_run_id: str) -> tuple[bool | None, str] | None:
    """With no Prefect API and a SQLite run store (project_store's file, or one set by the user),
    the flow run read from that file, read-only: Prefect's client would start its temporary server
    (~10 s, 6 of them waiting for it) to answer one query; with no such file (a fresh clone) the run
    is in no store here, and the temporary server would only have made an empty one to say so. None
    when it cannot be read that way (an API is set, another database, a schema without the columns):
    the client decides."""
    import sqlite3

    from prefect.settings import get_current_settings

    settings = get_current_settings()
    url = settings.server.database.connection_url
    url = url.get_secret_value() if hasattr(url, "get_secret_value") else url
    if settings.api.url or not url or not str(url).startswith("sqlite"):
        return None
    path = Path(str(url).split(":///", 1)[-1])
    missing = (None, "not checked: not in this project's Prefect store (.prefect/prefect.db); set "
                     "PREFECT_API_URL to the server the flow ran on")
    if not path.is_file():
        return missing
    try:
        with sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=10) as db:
            row = db.execute("SELECT name, state_name FROM flow_run WHERE id = ?", (flow_run_id,)).fetchone()
    except sqlite3.Error:
        return None
    if row is None:
        return missing
    return True, f"{row[0]}: {row[1] or '?'}"
