"""The `ftpipe` command. Heavy imports happen inside commands so `--help` stays fast."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode="markdown",
                  help="ftpipe: fine-tune LLMs through data gates, an MLflow registry and promotion gates.")

# Keys that DVC stages read from params.yaml (dvc.yaml lists them): overriding them on the
# command line would train on data that dvc.lock does not describe (model.base: the clean
# stage counts tokens with its tokenizer).
DVC_TRACKED = ("data", "model.base", "model.revision", "model.build")


def _quiet_env() -> None:
    for key, value in {
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        "GX_ANALYTICS_ENABLED": "false",
        "DVC_NO_ANALYTICS": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "MLFLOW_ENABLE_LOGGED_MODEL_CACHE": "false",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    }.items():
        os.environ.setdefault(key, value)


def _fail(message: str, code: int = 1) -> None:
    from rich.console import Console

    from ftpipe.secrets import redact

    Console(stderr=True).print(f"[bold red]error:[/] {redact(message)}", highlight=False, markup=True)
    raise typer.Exit(code)


def _config_path(config: Path, project: Path) -> Path:
    """A relative --config is looked up in the project first, then the current directory."""
    if config.is_absolute():
        return config
    return project / config if (project / config).exists() or not config.exists() else config


def _load(config: Path, overrides: list[str], project: Path):
    from ftpipe.config import ConfigError, load_config

    problems = []
    bad = [o for o in overrides if any(o.split("=", 1)[0].strip() == k or o.startswith(k + ".") for k in DVC_TRACKED)]
    if bad:
        problems.append("these keys are read by DVC stages from params.yaml and cannot be "
                        f"overridden on the command line: {', '.join(bad)}; edit "
                        f"{project / 'params.yaml'} instead")
    try:
        cfg = load_config(config, overrides)
    except ConfigError as exc:
        problems.insert(0, str(exc))
    if problems:
        _fail("\n".join(problems), 2)
    project_params = (project / "params.yaml").resolve()
    if config.resolve() != project_params and project_params.is_file():
        base = load_config(project_params)
        differ = [k for k in DVC_TRACKED if _dotted(base, k) != _dotted(cfg, k)]
        if differ:
            _fail(f"{config}: {', '.join(differ)} differ from {project_params}, which the DVC stages "
                  "read; put them in params.yaml", 2)
    return cfg


def _dotted(cfg, key: str):
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


@app.command()
def run(
    overrides: Optional[list[str]] = typer.Argument(None, help="dotted overrides, e.g. train.max_steps=200"),
    config: Path = typer.Option(Path("params.yaml"), "--config", "-c", help="the params file"),
    project: Path = typer.Option(Path("."), "--project", "-p", help="project root (dvc.yaml, data/)"),
    if_new_data: bool = typer.Option(False, "--if-new-data", help="end as skipped (nothing trained) when fewer "
                                     "than schedule.min_new_rows rows are new since the champion's data"),
) -> None:
    """Run the retrain flow: data stages, GX gate, fine-tune, evaluate, register, promote."""
    _quiet_env()
    project = project.resolve()
    if not (project / "dvc.yaml").is_file():
        _fail(f"{project} is not an ftpipe project (no dvc.yaml); pass --project", 2)
    cfg = _load(_config_path(config, project), overrides or [], project)

    from ftpipe.cli_summary import print_summary
    from ftpipe.data.preflight import preflight

    os.chdir(project)
    problems = preflight(cfg.data, cfg.model, project)   # before Prefect starts: seconds, every problem at once
    from ftpipe.evaluation.behaviour import SuiteError, project_suites

    try:
        project_suites(cfg.eval.behaviour_dir, cfg.registry.promotion.behaviour, project)
    except SuiteError as exc:
        problems += str(exc).splitlines()
    if problems:
        _fail("\n".join(problems) + "\nNothing was run.", 2)
    from flows.runtime import project_store, quiet_terminal

    project_store(project)
    from flows.retrain import SkippedRun, retrain

    quiet_terminal()
    result = _classified(lambda: retrain(cfg, root=str(project), require_new_data=if_new_data), cfg)
    if isinstance(result, SkippedRun):
        champ = f" (champion: {result.champion})" if result.champion else ""
        print(f"{result.message}{champ}: nothing trained, no alias moved. "
              f"MLflow run {result.run_id} (tag ftpipe.skipped)")
        return
    print_summary(result)


def _classified(call, cfg):
    """Run a flow; a failure the user can act on ends in one `error:` line that says what moved
    (nothing) and what to do."""
    from ftpipe.config import ConfigError
    from ftpipe.data.preflight import PreflightFailed
    from ftpipe.data.quality import QualityGateFailed
    from ftpipe.data.sources import SourceError
    from ftpipe.data.versions import StageFailed
    from ftpipe.training.models import ModelRefError
    from ftpipe.training.recipe import TrainingDiverged

    try:
        return call()
    except QualityGateFailed as exc:
        _fail(f"{exc}\nNo model was trained and no alias moved.")
    except (SourceError, StageFailed, ConfigError) as exc:
        _fail(f"{exc}\nNo model was trained and no alias moved.")
    except TrainingDiverged as exc:
        _fail(str(exc))
    except (ModelRefError, PreflightFailed) as exc:
        _fail(f"{exc}\nNothing was run.")
    except Exception as exc:   # noqa: BLE001 - classified below, else re-raised as is
        from ftpipe.retry import disk_full, is_transient

        if disk_full(exc):
            _fail(f"the disk is full ({_first_line(exc)}).\nNo version was registered and no alias moved; "
                  "free space (the MLflow artifact store, runs/, the DVC cache) and run again: finished "
                  "training is reused, not repeated.")
        if is_transient(exc):
            _fail(f"MLflow / the DVC remote did not answer after {cfg.registry.io_retries} retries "
                  f"({_first_line(exc)}).\nNo alias moved; a version is only ever registered whole. Run "
                  "again when it answers: finished training is reused, a registered candidate is not "
                  "registered twice.")
        raise



@app.command()
def sweep(
    overrides: Optional[list[str]] = typer.Argument(None, help="dotted overrides, e.g. sweep.sampler=random"),
    config: Path = typer.Option(Path("params.yaml"), "--config", "-c", help="the params file"),
    project: Path = typer.Option(Path("."), "--project", "-p", help="project root (dvc.yaml, data/)"),
    trials: Optional[int] = typer.Option(None, "--trials", "-n", help="finished trials the study needs (sweep.trials)"),
    study: Optional[str] = typer.Option(None, "--study", help="the study (default: named after the sweep's settings; "
                                        "--report/--join: the newest)"),
    report: bool = typer.Option(False, "--report", help="print the study's leaderboard and stop"),
    join: bool = typer.Option(False, "--join", help="one more worker on a running study (e.g. on a second machine)"),
) -> None:
    """Tune the recipe: an Optuna study of trials; the best goes through the gate like `run`."""
    _quiet_env()
    project = project.resolve()
    if not (project / "dvc.yaml").is_file():
        _fail(f"{project} is not an ftpipe project (no dvc.yaml); pass --project", 2)
    overrides = list(overrides or []) + ([f"sweep.trials={trials}"] if trials else []) + (
        [f"sweep.study={study}"] if study and not (report or join) else [])
    config = _config_path(config, project)
    cfg = _load(config, overrides, project)
    if report:
        return _sweep_report(cfg, project, study)
    if not cfg.sweep.space:
        _fail(f"{config}: sweep.space is empty: name the recipe keys to tune, e.g.\n  sweep:\n    space:\n"
              "      train.lr: {low: 0.0005, high: 0.01, log: true}\n      lora.r: [8, 16, 32]", 2)
    if cfg.train.stages:
        _fail(f"{config}: train.stages: a sweep's trials train one stage; tune each stage's recipe with "
              "train.stages=[] (e.g. the DPO stage from the champion: train.objective=dpo), then run the stages", 2)
    from ftpipe.data.preflight import preflight

    os.chdir(project)
    problems = preflight(cfg.data, cfg.model, project)
    if problems:
        _fail("\n".join(problems) + "\nNothing was run.", 2)
    from flows.runtime import project_store, quiet_terminal

    project_store(project)
    from flows.sweep import NoTrialCompleted, sweep as sweep_flow, sweep_trials

    quiet_terminal()
    if join:
        try:
            done = sweep_trials(str(project), str(config), study, overrides)
        except ValueError as exc:
            _fail(str(exc), 2)
        print(f"study {done['study']}: {done['trials_here']} trial(s) run here; the coordinator registers the winner")
        return _sweep_report(cfg, project, done["study"])
    try:
        res = _classified(lambda: sweep_flow(cfg, root=str(project)), cfg)
    except NoTrialCompleted as exc:
        _fail(f"{exc}\nNo model was registered and no alias moved.")
    except ValueError as exc:      # the study's storage or name (ftpipe.sweeps.study says which)
        _fail(f"{exc}\nNo model was registered and no alias moved.", 2)
    _sweep_report(cfg, project, res.board.study)
    from flows.retrain import SkippedRun

    if isinstance(res.result, SkippedRun):
        print(f"best trial: {res.result.message}: nothing registered, no alias moved")
        return
    from ftpipe.cli_summary import print_summary

    print(f"best trial {res.board.best['trial']} ({res.board.objective} {res.board.best['value']:.4f}) -> the gate:")
    print_summary(res.result)


def _sweep_report(cfg, project: Path, name: str | None) -> None:
    from rich.console import Console
    from rich.table import Table

    from ftpipe.sweeps import report, study

    try:
        url = study.storage_url(cfg.sweep, project)
        name = name or study.newest(url, cfg.sweep.heartbeat_s)
        if name is None:
            _fail(f"no study in {study.display(cfg.sweep, project)} yet: run `ftpipe sweep`", 2)
        s = study.open_study(url, name, cfg.sweep, cfg.sweep.params(), create=False)
    except KeyError:
        _fail(f"no study {name!r} in {study.display(cfg.sweep, project)}", 2)
    except ValueError as exc:
        _fail(str(exc), 2)
    rows = study.leaderboard(s)
    header, body = report.table_rows(rows)
    table = Table(title=f"study {name} — objective {s.user_attrs.get('objective', '?')}"
                        f" ({s.direction.name.lower()}) — {study.display(cfg.sweep, project)}")
    for h in header:
        table.add_column(h, overflow="fold")
    for row in body:
        table.add_row(*row)
    Console(width=max(120, int(os.environ.get("COLUMNS", "0") or 0))).print(table)
    best = next((r for r in rows if r["state"] == "complete"), None)
    print(f"best: trial {best['trial']} value {best['value']:.6g} {best['params']}" if best else "best: none yet")


def _first_line(exc: BaseException) -> str:
    from ftpipe.retry import chain

    for e in chain(exc):   # the error as raised (its causes follow in the log)
        text = f"{type(e).__name__}: {e}".strip()
        if text:
            return text.splitlines()[0][:400]
    return type(exc).__name__





@app.command()
def schedule(
    config: Path = typer.Option(Path("params.yaml"), "--config", "-c", help="the params file"),
    project: Path = typer.Option(Path("."), "--project", "-p", help="project root (dvc.yaml, data/)"),
    name: str = typer.Option("ftpipe-retrain", help="the deployment's name"),
) -> None:
    """Serve the retrain flow on schedule.cron until stopped.

    A Prefect deployment served from this machine on schedule.cron (schedule.timezone). Each run
    skips when too little data is new (schedule.min_new_rows). Needs a Prefect server:
    PREFECT_API_URL's, else the project's `ftpipe prefect-server`; `prefect.yaml` describes the
    same deployment for a work pool."""
    _quiet_env()
    project = project.resolve()
    if not (project / "dvc.yaml").is_file():
        _fail(f"{project} is not an ftpipe project (no dvc.yaml); pass --project", 2)
    cfg_path = _config_path(config, project).resolve()     # before the chdir below
    cfg = _load(cfg_path, [], project)
    os.chdir(project)
    from flows.runtime import project_store, serve

    if not project_store(project):
        _fail(f"no Prefect server: a served deployment needs one (`ftpipe prefect-server --project {project}`, "
              "or PREFECT_API_URL set to a running server)", 2)
    from flows.retrain import scheduled_retrain

    print(f"serving deployment scheduled-retrain/{name}: cron '{cfg.schedule.cron}' ({cfg.schedule.timezone}), "
          f"min_new_rows {cfg.schedule.min_new_rows}, project {project}", flush=True)
    serve(scheduled_retrain, name, cfg.schedule, parameters={"root": str(project), "config": str(cfg_path)})


@app.command()
def generate(
    prompt: str = typer.Argument(..., help="the instruction, e.g. 'Convert 1991-03-13 to words.'"),
    model: Optional[str] = typer.Option(None, "--model", "-m",
                                        help="models:/NAME@alias, models:/NAME/VERSION or a local checkpoint; "
                                             "default: the champion"),
    input_text: str = typer.Option("", "--input", help="the alpaca 'input' field, if any"),
    max_new_tokens: int = typer.Option(48, help="tokens to generate at most"),
    config: Path = typer.Option(Path("params.yaml"), "--config", "-c"),
    project: Path = typer.Option(Path("."), "--project", "-p"),
) -> None:
    """Generate with a registered model (the champion by default) or a local checkpoint."""
    cfg, project = _project_config(config, project)
    model = model or f"models:/{cfg.registry.model_name}@champion"
    row = {"instruction": prompt, "input": input_text}
    if Path(model).is_dir():
        from ftpipe.data.formatting import prompt_of
        from ftpipe.evaluation.generation import generate as gen
        from ftpipe.evaluation.generation import load_for_eval

        model, adapter = _checkpoint(model, project)
        m, tok = load_for_eval(model, adapter=adapter)
        answer = gen(m, tok, [prompt_of(row)], max_new_tokens)[0]
    else:
        import pandas as pd
        from mlflow.exceptions import MlflowException

        import mlflow
        from ftpipe.registry import store as registry

        registry.setup(cfg.registry, project)
        try:
            pyfunc = mlflow.pyfunc.load_model(model)
        except MlflowException as exc:
            _fail(f"cannot load {model} from {registry.tracking_uri(cfg.registry, project)}: "
                  f"{exc.message}. Run `ftpipe run` first, or pass --model.")
        answer = pyfunc.predict(pd.DataFrame([row]), params={"max_new_tokens": max_new_tokens})[0]
    print(answer)


@app.command()
def check(
    model: str = typer.Argument(..., help="models:/NAME@alias, models:/NAME/VERSION, a run id or a local checkpoint"),
    as_json: bool = typer.Option(False, "--json", help="one JSON document"),
    config: Path = typer.Option(Path("params.yaml"), "--config", "-c"),
    project: Path = typer.Option(Path("."), "--project", "-p"),
) -> None:
    """Run the behaviour suites (eval.behaviour_dir) against any version and print the table.

    Exit 1 when a rule of registry.promotion.behaviour.min_pass_rate fails, 2 on a malformed suite."""
    import json

    cfg, project = _project_config(config, project)
    from ftpipe.evaluation.behaviour import SuiteError, answerer, pass_rates, project_suites, run_suites, table

    try:
        suites = project_suites(cfg.eval.behaviour_dir, cfg.registry.promotion.behaviour, project)
    except SuiteError as exc:
        _fail(str(exc), 2)
    if not suites:
        _fail(f"no behaviour suite in {cfg.eval.behaviour_dir}: write one (README \"Behaviour suites\")", 2)
    from ftpipe.evaluation.generation import load_for_eval

    tmp = None
    if Path(model).is_dir():
        (model_dir, adapter), label = _checkpoint(model, project), model
    else:
        from ftpipe.lineage.record import AuditError, resolve
        from ftpipe.registry import store as registry

        registry.setup(cfg.registry, project)
        try:
            v = resolve(registry.client(), model)
        except AuditError as exc:
            _fail(str(exc), 2)
        tmp = registry.scratch_dir("ftpipe-check-")
        label = f"models:/{v.name}/{v.version}"
    try:
        if tmp is not None:
            local = registry.download_model(v.name, v.version, tmp)
            model_dir, adapter = local.model_dir, local.adapter_dir
        m, tok = load_for_eval(model_dir, adapter=adapter)

        results = run_suites(suites, answerer(m, tok, cfg.eval.batch_size))
    finally:
        if tmp is not None:
            registry.remove(tmp)
    rates = pass_rates(results)
    rules = cfg.registry.promotion.behaviour.min_pass_rate
    failed = [t for t, need in rules.items() if rates.get(t, 0.0) < need]
    if as_json:
        print(json.dumps({"model": label, "suites": [{"name": s.name, "file": s.file, "sha256": s.sha256}
                                                      for s in suites],
                          "cases": [r.as_dict() for r in results], "pass_rates": rates,
                          "rules_failed": failed}, indent=2))
    else:
        print(f"{label}: {sum(r.passed for r in results)}/{len(results)} behaviour cases pass")
        print("\n".join(table(results)))
        for tag, rate in rates.items():
            need = rules.get(tag)
            print(f"{tag}: {rate:.0%}" + ("" if need is None else
                                         f" (required {need:.0%}: {'ok' if rate >= need else 'FAILS'})"))
    if failed:
        raise typer.Exit(1)


def _checkpoint(folder: str, project: Path) -> tuple[str, str | None]:
    """(model folder, adapter folder or None) of a local checkpoint: an exported adapter runs on
    the base its adapter_config.json names (a project folder, else a hub id)."""
    import json

    if not (Path(folder) / "adapter_config.json").is_file():
        return folder, None
    base = json.loads((Path(folder) / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if not base:
        _fail(f"{folder}/adapter_config.json names no base model (base_model_name_or_path)", 2)
    return (str(project / base) if (project / base).is_dir() else base), folder


def _project_config(config: Path, project: Path):
    """(the project's config, its resolved root) for a command that runs nothing."""
    _quiet_env()
    project = project.resolve()
    return _load(_config_path(config, project), [], project), project


def _registry(config: Path, project: Path):
    cfg, project = _project_config(config, project)
    from ftpipe.registry import store as registry

    registry.setup(cfg.registry, project)
    return cfg, project


@app.command()
def promote(
    version: str = typer.Argument(..., help="the model version to make champion (3 or v3)"),
    reason: str = typer.Option(..., "--reason", "-r", help="why (recorded in the registry)"),
    config: Path = typer.Option(Path("params.yaml"), "--config", "-c"),
    project: Path = typer.Option(Path("."), "--project", "-p"),
) -> None:
    """Make VERSION champion by hand, overriding the gate; the reason is recorded."""
    import re

    if not re.fullmatch(r"v?[0-9]+", version):
        _fail(f"{version!r} is not a version number (e.g. 3 or v3; `ftpipe models` lists them)", 2)
    cfg, _ = _registry(config, project)
    from ftpipe.registry.manual import manual_promote
    from ftpipe.registry.store import RegistryError

    try:
        event = manual_promote(cfg.registry, str(int(version.removeprefix("v"))), reason)
    except RegistryError as exc:
        _fail(str(exc))
    print(f"{cfg.registry.model_name} v{event['version']} is champion (was "
          f"{'v' + event['previous'] if event['previous'] else 'none'}); recorded: manual by {event['by']} "
          f"at {event['at']}: {event['reason']}")


@app.command()
def rollback(
    reason: str = typer.Option("", "--reason", "-r", help="why (recorded)"),
    config: Path = typer.Option(Path("params.yaml"), "--config", "-c"),
    project: Path = typer.Option(Path("."), "--project", "-p"),
) -> None:
    """Move champion back to the previous champion; recorded in the registry."""
    cfg, _ = _registry(config, project)
    from ftpipe.registry.manual import rollback as do_rollback
    from ftpipe.registry.store import RegistryError

    try:
        event = do_rollback(cfg.registry, reason)
    except RegistryError as exc:
        _fail(str(exc))
    print(f"{cfg.registry.model_name}: champion rolled back from v{event['previous']} to v{event['version']} "
          f"({event['reason']}; by {event['by']} at {event['at']})")


@app.command()
def models(
    as_json: bool = typer.Option(False, "--json", help="one JSON document"),
    limit: int = typer.Option(50, help="newest versions to show"),
    config: Path = typer.Option(Path("params.yaml"), "--config", "-c"),
    project: Path = typer.Option(Path("."), "--project", "-p"),
) -> None:
    """Model versions, aliases, scores and gate decisions.

    Each version's primary metric on a named test set, beside the champion's on the same set,
    its gate decision and the rule that decided."""
    from ftpipe.registry import store as registry

    _quiet_env()
    cfg = _load(_config_path(config, project.resolve()), [], project.resolve())
    uri = registry.tracking_uri(cfg.registry, project.resolve())
    m = cfg.registry.promotion.primary_metric
    if uri.startswith(("http://", "https://")):   # a tracking server: its REST API, no mlflow import
        from ftpipe.registry.rest import list_models as rest_list

        rows, history = rest_list(uri, cfg.registry.model_name, m, limit)
    else:
        cfg, _ = _registry(config, project)
        from ftpipe.registry.manual import list_models

        rows, history = list_models(cfg.registry, limit), registry.champion_history(cfg.registry.model_name)
    if as_json:
        import json

        print(json.dumps({"model": cfg.registry.model_name, "versions": rows, "champion_history": history},
                         indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    if not rows:
        print(f"{cfg.registry.model_name}: no versions yet; `ftpipe run` registers the first")
        return
    console = Console()
    fmt = lambda v: "—" if v is None else f"{v:.4f}"  # noqa: E731
    cells = {"version": lambda r: r["version"], "aliases": lambda r: ", ".join(r["aliases"]),
             "created": lambda r: r["created"], "method": lambda r: r["method"],
             "test set": lambda r: r["test_set"] or "—", m: lambda r: fmt(r[m]),
             "vs champion": lambda r: f"v{r['champion_compared']} {fmt(r[f'champion_{m}'])}"
             if r["champion_compared"] else "—",
             "forgetting": lambda r: fmt(r["forgetting"]), "decision": lambda r: r["decision"]}
    wide = console.width >= 140
    if not wide:   # narrow terminal: the columns that decide, "why" under the table; --json has everything
        cells = {k: v for k, v in cells.items() if k in ("version", "aliases", "test set", m, "vs champion", "decision")}
    n = len(rows)
    table = Table(title=f"{cfg.registry.model_name}: {n} version{'s' if n != 1 else ''}", title_justify="left",
                  caption=f"{m}: on the test set the version was scored on (vN:sha256, named after the first "
                          "version scored on it); vs champion: the champion it was compared with, on that set",
                  caption_justify="left")
    for col in cells:
        table.add_column(col, no_wrap=col != "aliases", min_width=min(len(col), 8))
    if wide:
        table.add_column("why", overflow="fold", min_width=20)
    for r in rows:
        table.add_row(*(cell(r) for cell in cells.values()), *([r["why"]] if wide else []))
    console.print(table)
    if not wide:
        for r in rows:
            console.print(f"v{r['version']} why: {r['why'] or '—'}", highlight=False)


@app.command()
def serve(
    model: str = typer.Option("champion", "--model", "-m",
                              help="what answers by default: an alias (champion, challenger), a version number"),
    host: str = typer.Option("127.0.0.1", help="bind address (anything but loopback needs serve.token)"),
    port: int = typer.Option(5001, help="port"),
    config: Path = typer.Option(Path("params.yaml"), "--config", "-c"),
    project: Path = typer.Option(Path("."), "--project", "-p"),
) -> None:
    """Serve registered versions over HTTP (the champion by default), recording each request.

    POST /v1/generate {"instruction": "..."} (or "prompt", or "messages"; "model": "challenger" or
    "3" for another version) -> request_id and answer; POST /v1/feedback on a request_id;
    POST /invocations as `mlflow models serve` takes it. README "Serving and feedback"."""
    cfg, project = _registry(config, project)
    import uvicorn

    from ftpipe.serving.app import LOOPBACK, create_app
    from ftpipe.serving.records import Records, store_url
    from ftpipe.registry import store as registry
    from ftpipe.serving.versions import page_status, resolver, version_checker

    token = os.path.expandvars(cfg.serve.token) if cfg.serve.token else None
    if token is not None and token.startswith("$"):
        token = None                                  # the variable is not set
    if host not in LOOPBACK and not token:
        _fail(f"--host {host} lets other machines in: set serve.token to ${{VAR}} in {project / 'params.yaml'} and "
              "that variable to a secret in this environment (or bind 127.0.0.1)", 2)
    resolve = resolver(cfg.registry.model_name)
    try:
        resolve(model)                                # fail now, not on the first request
    except LookupError as exc:
        _fail(f"{exc}. Run `ftpipe run` first, or pass --model.")
    records = Records.open(store_url(cfg.serve.store, project), cfg.data.clean.pii) if cfg.serve.capture else None
    app = create_app(resolve, records, queue_size=cfg.serve.queue_size, max_batch=cfg.serve.max_batch,
                     batch_wait_ms=cfg.serve.batch_wait_ms, max_new_tokens=cfg.serve.max_new_tokens, token=token,
                     version_exists=version_checker(cfg.registry.model_name), default_model=model,
                     max_body_bytes=cfg.serve.max_body_bytes,
                     status=page_status(cfg.registry.model_name, registry.tracking_uri(cfg.registry, project)))
    print(f"serving {cfg.registry.model_name} ({model}): the page at http://{host}:{port}/"
          + ("?token=..." if token else "") + f", the API at http://{host}:{port}/v1/generate"
          + ("; requests recorded" if records else "; capture off"), flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")


feedback_app = typer.Typer(no_args_is_help=True, help="Feedback on served answers: export it as training data.")
app.add_typer(feedback_app, name="feedback")


@feedback_app.command("export")
def feedback_export(
    config: Path = typer.Option(Path("params.yaml"), "--config", "-c"),
    project: Path = typer.Option(Path("."), "--project", "-p"),
) -> None:
    """Write the feedback gathered since the last export into data/incoming/ as a drop:
    corrections as SFT rows, preferences as preference pairs, each with its request ids."""
    cfg, project = _project_config(config, project)
    from ftpipe.serving.records import export_drop

    paths, counts = export_drop(cfg.serve.store, cfg.data.clean.pii, project) or ([], {})
    if not paths:
        print("no feedback to export since the last export (ratings stay in the store)")
        return
    print(f"{', '.join(str(p.relative_to(project)) for p in paths)}: {counts['corrections']} corrections "
          f"(SFT rows), {counts['preferences']} preferences (pairs); the next `ftpipe run` collects them")


@app.command()
def export(
    model: str = typer.Argument(..., help="models:/NAME@alias, models:/NAME/VERSION or a run id"),
    to: Path = typer.Option(..., "--to", help="a new (or empty) folder"),
    merged: bool = typer.Option(False, "--merged", help="base + adapter merged: a Hugging Face folder that "
                                                      "from_pretrained loads without peft"),
    max_shard_size: str = typer.Option("2GB", help="--merged: the largest safetensors shard (e.g. 5GB, 500MB)"),
    config: Path = typer.Option(Path("params.yaml"), "--config", "-c"),
    project: Path = typer.Option(Path("."), "--project", "-p"),
) -> None:
    """Export a version: its PEFT adapter folder (vLLM LoRA, PeftModel), or --merged a full checkpoint."""
    cfg, project = _registry(config, project)
    from ftpipe.lineage.record import AuditError, resolve
    from ftpipe.registry import store as registry
    from ftpipe.serving import export as ex

    try:
        v = resolve(registry.client(), model)
    except AuditError as exc:
        _fail(str(exc))
    tmp = registry.scratch_dir("ftpipe-export-")
    try:
        local = registry.download_model(v.name, v.version, tmp)
        try:
            done = (ex.export_merged(local.model_dir, local.adapter_dir, to, max_shard_size) if merged or local.adapter_dir is None
                    else ex.export_adapter(local.adapter_dir, local.base_ref, to))
        except FileExistsError as exc:
            _fail(str(exc), 2)
    finally:
        registry.remove(tmp)
    print(f"exported {v.name} v{v.version} ({done.kind}): {done.files} files, {done.bytes:,} bytes in {done.path}")


def _row_use(hit: dict) -> str:
    """What a version did with a row: trained on it, or only held it in its data version."""
    if hit["split"] != "train":
        return f"in its {hit['split']} split (evaluated on, not trained on)"
    if hit["trained"]:
        return ("trained on it (in its incremental training file: new rows + replay)" if hit.get("trained_on")
                else "trained on it (train split)")
    if hit["trained"] is False:
        return "in its train split, not in the rows it trained on (incremental: new rows + replay)"
    return f"in its train split; whether it trained on it cannot be told: {hit.get('note')}"


@app.command()
def lineage(
    model: Optional[str] = typer.Argument(None, help="models:/NAME@alias, models:/NAME/VERSION or a run id"),
    as_json: bool = typer.Option(False, "--json", help="one JSON document"),
    report: Optional[Path] = typer.Option(None, "--report", help="also write a self-contained HTML audit report"),
    source: Optional[str] = typer.Option(None, "--source", help="which versions learned from this source file"),
    row_hash: Optional[str] = typer.Option(None, "--row-hash", help="which versions' data held this row (_hash), "
                                           "and which trained on it"),
    request: Optional[str] = typer.Option(None, "--request", help="which versions learned from feedback on this "
                                          "served request (its request_id)"),
    requests: bool = typer.Option(False, "--requests", help="with MODEL: the served requests whose feedback fed it"),
    config: Path = typer.Option(Path("params.yaml"), "--config", "-c"),
    project: Path = typer.Option(Path("."), "--project", "-p"),
) -> None:
    """Audit a version's lineage, or find the versions that learned from a file or row.

    Walks code, config, data, GX, sources, quarantine and flow run, verifying every link; exit
    1 naming each broken one. With --source / --row-hash: every version that learned from a
    file or a row."""
    import json
    import re

    if sum(q is not None for q in (source, row_hash, request)) > 1:
        _fail("--source, --row-hash, --request: one query at a time", 2)
    if request is not None:
        _lineage_request(request, as_json, model, config, project)
        return
    if requests:
        _lineage_requests(model, as_json, config, project)
        return
    if (source is not None or row_hash is not None) and (model or report):
        _fail("--source / --row-hash list versions: give no MODEL and no --report with them", 2)
    if row_hash is not None and not re.fullmatch(r"[0-9a-f]{64}", row_hash):
        _fail(f"--row-hash {row_hash!r}: a row hash is the 64 lowercase hex digits of a row's `_hash` "
              "(in data/splits/*.jsonl)", 2)
    if source is not None and not source.strip():
        _fail("--source: give a path", 2)
    if report and not report.parent.resolve().is_dir():
        _fail(f"--report {report}: folder {report.parent} does not exist", 2)
    cfg, project = _registry(config, project)
    from ftpipe.lineage import audit as au
    from ftpipe.lineage import queries as lq
    from ftpipe.lineage import record as lr
    from ftpipe.lineage import report as lrep
    from ftpipe.registry import store as registry

    client = registry.client()
    try:
        if source is not None or row_hash is not None:
            hits = (lq.versions_with_source(client, project, source) if source
                    else lq.versions_with_row(client, project, row_hash, cfg.data.remote))
            hits = lq.with_descendants(client, hits)
            what = f"source {source}" if source else f"row {row_hash}"
            if as_json:
                print(json.dumps({"query": {"source": source, "row_hash": row_hash}, "versions": hits}, indent=2))
                return
            unknown = [h for h in hits if h.get("error")]
            hits = [h for h in hits if not h.get("error")]
            for h in unknown:
                print(f"warning: {h['model']} v{h['version']}: {h['error']}: not searched", file=sys.stderr)
            if not hits:
                where = "" if row_hash or (Path(source).exists() or (project / source).exists()) else \
                    " (no file there now either)"
                print(f"no registered model version saw {what}{where}")
                return
            print(f"{len(hits)} model version(s) saw {what}:")
            for h in hits:
                via = h.get("via") and (f"trained from the weights of {h['via']}, which "
                                        f"{'saw' if source else 'trained on'} it")
                if "split" not in h and "source" not in h:
                    extra = via
                elif source:
                    extra = (f"{h['source']}, matched by {h['matched_by']}, sha256 {h['sha256'][:16]}…"
                             + (f" ({h['now']})" if h.get("now") else ""))
                else:
                    extra = _row_use(h) + (f"; {via}" if via else "")
                print(f"  {h['model']} v{h['version']}" + (f" ({', '.join(h['aliases'])})" if h.get("aliases") else "")
                      + f": {extra}")
            return
        if not model:
            _fail("give a MODEL (models:/NAME@champion, models:/NAME/3 or a run id), or --source / --row-hash", 2)
        from flows.runtime import project_store, read_flow_run

        project_store(project)   # the flow run is looked up where this project's runs are
        result = au.audit(client, project, model, cfg.data.remote, flow_run=read_flow_run)
    except lr.AuditError as exc:
        _fail(str(exc), 2)
    if report:
        report.write_text(lrep.html_report(result), encoding="utf-8")
    if as_json:
        print(json.dumps(result.to_dict(), indent=2, default=str))
    else:
        print("\n".join(lrep.tree_lines(result)))
        print()
        if result.ok:
            print("lineage verified: every link holds" + (f"; report: {report}" if report else ""))
    if not result.ok:
        for link in result.broken:
            print(f"BROKEN {link.detail}" if link.detail.startswith(link.name) else f"BROKEN {link.name}: {link.detail}",
                  file=sys.stderr)
        raise typer.Exit(1)


def _feedback_store(cfg, project: Path):
    from ftpipe.serving.records import open_store

    return open_store(cfg.serve.store, cfg.data.clean.pii, project)


def _lineage_request(request: str, as_json: bool, model: Optional[str], config: Path, project: Path) -> None:
    """`ftpipe lineage --request R`: the versions that learned from feedback on R."""
    import json

    if model:
        _fail("--request lists versions: give no MODEL with it", 2)
    cfg, project = _registry(config, project)
    from ftpipe.lineage import queries as lq
    from ftpipe.registry import store as registry

    records = _feedback_store(cfg, project)
    if records is None or records.request(request) is None:
        _fail(f"--request {request}: no such request in the serving store "
              f"({cfg.serve.store or project / 'serving' / 'requests.db'})", 2)
    drops = records.drops_of(request)
    client = registry.client()
    hits = lq.with_descendants(client, lq.versions_with_request(client, project, drops))
    if as_json:
        print(json.dumps({"query": {"request": request}, "drops": drops, "versions": hits}, indent=2))
        return
    if not drops:
        print(f"request {request}: no feedback on it was exported yet (`ftpipe feedback export`): no version learned from it")
        return
    if not hits:
        print(f"request {request}: its feedback is in {', '.join(drops)}; no registered version learned from it yet")
        return
    print(f"{len(hits)} model version(s) learned from request {request} (via {', '.join(drops)}):")
    for h in hits:
        how = f"trained from the weights of {h['via']}, which learned it" if h.get("via") and "source" not in h \
            else f"{h['source']}, sha256 {h['sha256'][:16]}…"
        print(f"  {h['model']} v{h['version']}" + (f" ({', '.join(h['aliases'])})" if h.get("aliases") else "")
              + f": {how}")


def _lineage_requests(model: Optional[str], as_json: bool, config: Path, project: Path) -> None:
    """`ftpipe lineage MODEL --requests`: the served requests whose feedback fed MODEL."""
    import json

    if not model:
        _fail("--requests needs a MODEL (models:/NAME/3, models:/NAME@champion or a run id)", 2)
    cfg, project = _registry(config, project)
    from ftpipe.lineage import queries as lq
    from ftpipe.lineage import record as lr
    from ftpipe.registry import store as registry

    records = _feedback_store(cfg, project)
    try:
        fed = lq.requests_of(registry.client(), project, model, records.requests_in if records else None)
    except lr.AuditError as exc:
        _fail(str(exc), 2)
    if as_json:
        print(json.dumps({"model": model, "drops": fed}, indent=2))
        return
    if not fed:
        print(f"{model}: no served feedback fed it (no feedback drop among its data, nor its ancestors')")
        return
    for d in fed:
        via = f" (through {d['via']}, whose weights it started from)" if d["via"] else ""
        print(f"{d['model']} v{d['version']} learned from {d['drop']}{via}: {len(d['request_ids'])} request(s), "
              f"read from {d['read_from']}")
        for rid in d["request_ids"]:
            print(f"  {rid}")


@app.command("prefect-server")
def prefect_server(
    db: Optional[str] = typer.Option(None, "--db", help="postgresql://USER@HOST:PORT/DB (default: SQLite "
                                                        "in PROJECT/.prefect/prefect.db)"),
    host: str = typer.Option("127.0.0.1", help="bind address"),
    port: int = typer.Option(4200, help="port"),
    project: Path = typer.Option(Path("."), "--project", "-p"),
) -> None:
    """Start the project's Prefect server (runs UI, `ftpipe schedule`).

    SQLite in the project by default, PostgreSQL with --db (the database must exist:
    `createdb -h HOST -U USER DB`)."""
    _quiet_env()
    project = project.resolve()
    env = dict(os.environ)
    env.pop("PREFECT_API_URL", None)
    home = project / ".prefect"
    home.mkdir(exist_ok=True)
    env["PREFECT_HOME"] = str(home)
    if db:
        if not db.startswith(("postgresql://", "postgresql+asyncpg://", "postgres://")):
            _fail(f"--db {db!r}: expected postgresql://USER@HOST:PORT/DB", 2)
        env["PREFECT_SERVER_DATABASE_CONNECTION_URL"] = "postgresql+asyncpg://" + db.split("://", 1)[1]
    else:
        env["PREFECT_SERVER_DATABASE_CONNECTION_URL"] = f"sqlite+aiosqlite:///{home / 'prefect.db'}"
    bindir = Path(sys.executable).parent
    import json
    import re

    shown = re.sub(r"://([^:/@]+):[^@]*@", r"://\1:***@", db) if db else None
    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}/api"
    # the project's commands that find no PREFECT_API_URL talk to this server (this process becomes it)
    (home / "server.json").write_text(json.dumps({"url": url, "pid": os.getpid()}))
    print(f"Prefect server on http://{host}:{port} ({'PostgreSQL ' + shown if db else 'SQLite ' + str(home / 'prefect.db')}); "
          f"the project's ftpipe commands use it; for other clients: export PREFECT_API_URL={url}", flush=True)
    cmd = [str(bindir / "prefect"), "server", "start", "--host", host, "--port", str(port)]
    os.execve(cmd[0], cmd, env)


data_app = typer.Typer(no_args_is_help=True, help="Data versions: status, SQL exports, restore.")
app.add_typer(data_app, name="data")


@data_app.command("status")
def data_status(
    as_json: bool = typer.Option(False, "--json", help="one JSON document"),
    config: Path = typer.Option(Path("params.yaml"), "--config", "-c"),
    project: Path = typer.Option(Path("."), "--project", "-p"),
) -> None:
    """Current data version, rows added/removed since the champion's, and what the remote holds."""
    cfg, project = _project_config(config, project)
    from ftpipe.data.status import data_status as status
    from ftpipe.data.status import print_status

    st = status(cfg, project)
    if as_json:
        print(st.to_json())
    else:
        print_status(st)


@data_app.command("fetch")
def data_fetch(
    config: Path = typer.Option(Path("params.yaml"), "--config", "-c"),
    project: Path = typer.Option(Path("."), "--project", "-p"),
) -> None:
    """Run each SQL source's query into data/sources/sql/ (before a hand-run `dvc repro`)."""
    cfg, project = _project_config(config, project)
    from ftpipe.data.sources import SourceError, fetch_sql

    for src in cfg.data.sources:
        if src.type == "sql":
            try:
                exp = fetch_sql(project, src)
            except SourceError as exc:
                _fail(str(exc))
            print(f"{src.name}: {exp.rows} rows -> {exp.path} ({'changed' if exp.changed else 'unchanged'})")


@data_app.command("restore")
def data_restore(
    model: str = typer.Argument(..., help="models:/NAME@alias, models:/NAME/VERSION or a run id"),
    to: Path = typer.Option(..., "--to", help="an empty (or new) directory"),
    every_stage: bool = typer.Option(False, "--all", help="every recorded data output (collected, cleaned, "
                                                          "splits) under DIR/<its path>, not just the splits"),
    force: bool = typer.Option(False, "--force", help="restore even when the lineage record and the tags disagree"),
    config: Path = typer.Option(Path("params.yaml"), "--config", "-c"),
    project: Path = typer.Option(Path("."), "--project", "-p"),
) -> None:
    """Restore the exact data a model version learned from.

    Writes its train/validation/test files, byte for byte,
    from the DVC cache or remote, whatever data/ holds now."""
    cfg, project = _registry(config, project)
    import shutil
    import tempfile

    from ftpipe.data.versions import Store, restore_output
    from ftpipe.lineage import record as lr
    from ftpipe import names as t
    from ftpipe.names import SPLITS_OUTPUT
    from ftpipe.registry import store as registry

    if to.exists() and not to.is_dir():
        _fail(f"{to}: a file; restore writes into an empty or new directory", 2)
    if to.exists() and any(to.iterdir()):
        _fail(f"{to}: not empty; restore writes into an empty or new directory", 2)
    if not to.resolve().parent.is_dir():
        _fail(f"{to}: folder {to.resolve().parent} does not exist", 2)
    client = registry.client()
    try:
        v = lr.resolve(client, model)
    except lr.AuditError as exc:
        _fail(str(exc), 2)
    doc, _, problems = lr.recorded_lineage(client, v)
    if problems and not force:
        _fail("the lineage of " + f"{v.name} v{v.version} does not hold:\n" + "\n".join(problems)
              + "\n(`ftpipe lineage` for the whole audit; --force restores what the record says anyway)", 1)
    outputs = {k: md5 for k, md5 in t.under(doc, t.DVC).items() if ":" in k}
    wanted = outputs if every_stage else {k: m for k, m in outputs.items() if k == SPLITS_OUTPUT}
    if not wanted:
        _fail(f"{v.name} v{v.version}: no data version recorded", 2)
    # written next to DIR, moved into place only when every file re-hashed: never half a restore
    staging = Path(tempfile.mkdtemp(dir=to.resolve().parent, prefix=f".{to.name}.restoring-"))
    store = Store(project, cfg.data.remote)
    try:
        lines = []
        for key, md5 in sorted(wanted.items()):
            dest = staging / key.split(":", 1)[1] if every_stage else staging
            files = restore_output(store, md5, dest)
            remote = sum(f["from"] == "remote" for f in files)
            lines.append(f"{key} {md5}: {len(files)} files, {sum(f['bytes'] for f in files):,} bytes"
                         + (f" ({remote} from {store.where()}: no good copy in the cache)" if remote else ""))
        if to.exists():
            to.rmdir()
        staging.rename(to)
    except lr.AuditError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        _fail(f"{exc}\nnothing written to {to}", 1)
    finally:
        store.close()
        shutil.rmtree(staging, ignore_errors=True)
    for line in lines:
        print(f"{line} -> {to}")
    for p in problems:
        print(f"warning: {p}", file=sys.stderr)
    print(f"restored the data {v.name} v{v.version} learned from; every file re-hashed to its recorded md5")


def main() -> None:  # pragma: no cover
    app(prog_name="ftpipe")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
