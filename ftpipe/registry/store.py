"""MLflow: tracking runs, registering model versions, reading and moving aliases.

Aliases only: a new version gets `challenger`; `champion` moves only through
`record_champion` (the gate, a manual promotion, a rollback), which records each move in the
model's history. Stages (deprecated since MLflow 2.9) are never used.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from ftpipe import names as t
from ftpipe.config import RegistryConfig

CHAMPION, CHALLENGER = "champion", "challenger"


@dataclass(frozen=True)
class VersionInfo:
    """A model version as ftpipe reads it."""
    name: str
    version: str
    run_id: str
    aliases: tuple[str, ...]
    model_id: str | None = None
    tags: dict = field(default_factory=dict)
    created: str = ""          # ISO time of registration

    @classmethod
    def of(cls, mv, aliases: tuple[str, ...] | None = None) -> VersionInfo:
        """From an MLflow ModelVersion (search results carry no aliases: pass them)."""
        import datetime as dt

        ts = mv.creation_timestamp
        created = dt.datetime.fromtimestamp(ts / 1000, dt.timezone.utc).isoformat(timespec="seconds") if ts else ""
        return cls(mv.name, str(mv.version), mv.run_id, tuple(mv.aliases or ()) if aliases is None else aliases,
                   logged_model_id(mv), dict(mv.tags or {}), created)


class RegistryError(RuntimeError):
    """A registry operation that cannot be done as asked (unknown version, nothing to roll back to)."""


def tracking_uri(cfg: RegistryConfig, root: Path) -> str:
    """Config, else $MLFLOW_TRACKING_URI, else the SQLite store under mlflow/."""
    if cfg.tracking_uri:
        return os.path.expandvars(cfg.tracking_uri)
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{(root / 'mlflow' / 'mlflow.db').resolve()}"


def setup(cfg: RegistryConfig, root: Path) -> str:
    """Point MLflow at the store and make sure the experiment exists; returns its id."""
    import mlflow

    uri = tracking_uri(cfg, root)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    exp = mlflow.get_experiment_by_name(cfg.experiment)
    if exp is not None:
        return exp.experiment_id
    artifact_location = None
    if not uri.startswith(("http://", "https://", "databricks")):
        # Without a server, MLflow would put artifacts in ./mlruns of whatever directory
        # the process runs in: pin them next to the database instead.
        art = (root / "mlflow" / "artifacts").resolve()
        art.mkdir(parents=True, exist_ok=True)
        artifact_location = art.as_uri()
    try:
        return mlflow.create_experiment(cfg.experiment, artifact_location=artifact_location)
    except mlflow.exceptions.MlflowException:
        # Another process created it first.
        return mlflow.get_experiment_by_name(cfg.experiment).experiment_id


def client():
    from mlflow import MlflowClient

    return MlflowClient()


def version_by_alias(name: str, alias: str) -> VersionInfo | None:
    from mlflow.exceptions import MlflowException

    try:
        mv = client().get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None
        raise
    return VersionInfo.of(mv)


def logged_model_id(mv) -> str | None:
    source = getattr(mv, "source", "") or ""
    return getattr(mv, "model_id", None) or (source.split("models:/", 1)[1] if source.startswith("models:/") else None)


@dataclass(frozen=True)
class LocalVersion:
    """A version on this machine: what from_pretrained loads (the full weights, or an adapter
    version's base from the base store) and the adapter to put on it, if any."""
    model_dir: str
    adapter_dir: str | None = None
    base_ref: dict | None = None      # an adapter version's pinned base (ftpipe.registry.bases)


def download_model(name: str, version: str, dst: Path) -> LocalVersion:
    """A version's weights as local folders: its full checkpoint, or its adapter with the
    base it pins (from this machine's base cache, else the registry's base store)."""
    import mlflow

    from ftpipe.registry import bases

    dst.mkdir(parents=True, exist_ok=True)
    local = Path(mlflow.artifacts.download_artifacts(
        artifact_uri=f"models:/{name}/{version}", dst_path=str(dst)))
    adapters = [p.parent for p in local.rglob("adapter_config.json")]
    refs = list(local.rglob(bases.REF_FILE))
    if adapters and refs:
        ref = bases.read_ref(refs[0])
        return LocalVersion(str(bases.fetch_base(ref)), str(adapters[0]), ref)
    hf_dirs = [p.parent for p in local.rglob("config.json") if (p.parent / "tokenizer_config.json").exists()]
    if not hf_dirs:
        raise FileNotFoundError(f"models:/{name}/{version} holds no Hugging Face checkpoint ({local})")
    return LocalVersion(str(hf_dirs[0]))


def log_model(run_id: str, model_dir: str, name: str, tags: dict[str, str] | None = None,
              adapter_dir: str | None = None, base_ref: dict | None = None) -> VersionInfo:
    """Log the candidate as a pyfunc model in the run, then register a new version with all
    its tags in one call: a failure before that call (upload, full disk, lost server)
    leaves no version, and no version ever exists without its lineage tags.

    An adapter version (adapter_dir and base_ref, from ftpipe.registry.bases.store_base)
    stores only its adapter and the base reference; a full one its weights."""
    import warnings

    import pandas as pd
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import Array, ColSpec, Object, ParamSchema, ParamSpec, Property, Schema

    import mlflow
    from ftpipe.registry import bases

    example = pd.DataFrame({"instruction": ["Convert 1991-03-13 to words."], "input": [""]})
    signature = ModelSignature(
        # an instruction (and input), or a conversation so far (rendered by the chat template)
        inputs=Schema([ColSpec("string", "instruction", required=False), ColSpec("string", "input", required=False),
                       ColSpec(Array(Object([Property("role", "string"), Property("content", "string")])),
                               "messages", required=False)]),
        outputs=Schema([ColSpec("string")]),
        params=ParamSchema([ParamSpec("max_new_tokens", "long", 48)]))
    code = code_copy()
    if adapter_dir:
        ref_file = bases.write_ref(base_ref, code.parent / bases.REF_FILE)
        artifacts = {"adapter": adapter_dir, "base": str(ref_file)}
    else:
        artifacts = {"model": model_dir}
    try:
        with mlflow.start_run(run_id=run_id), warnings.catch_warnings():
            # The signature is given explicitly; MLflow's hint about type hints does not apply.
            warnings.filterwarnings("ignore", message=".*type hints.*")
            info = mlflow.pyfunc.log_model(
                name="model",
                # Models from code: the version stores this file, not a pickle of an object.
                python_model=str(Path(__file__).parents[1] / "serving" / "model_file.py"),
                artifacts=artifacts,
                signature=signature,
                input_example=example,
                # ftpipe's own code travels with the model, so serving needs only these.
                code_paths=[str(code)],
                pip_requirements=["torch>=2.4", "transformers>=5.2,<6", "mlflow>=3.17,<3.18", "pandas",
                                  "safetensors", "accelerate"] + (["peft>=0.21,<0.22"] if adapter_dir else []),
            )
    finally:
        remove(code.parent)
    # Leaving start_run() ended the run; it is still in progress until the flow says otherwise.
    client().update_run(run_id, status="RUNNING")
    try:
        client().create_registered_model(name)
    except Exception as exc:   # already there (the usual case)
        if "RESOURCE_ALREADY_EXISTS" not in str(getattr(exc, "error_code", "")) and "already exists" not in str(exc):
            raise
    mv = client().create_model_version(name, info.model_uri, run_id=run_id, tags=tags or {}, model_id=info.model_id)
    version = str(mv.version)
    client().set_registered_model_alias(name, CHALLENGER, version)
    return VersionInfo(name, version, run_id, (CHALLENGER,), info.model_id)


def log_model_file(name: str, version: str, local_path: str | Path) -> None:
    """Add a file (the model card) to a registered version's own artifacts."""
    mv = client().get_model_version(name, version)
    model_id = logged_model_id(mv)
    if model_id is None:
        raise RegistryError(f"{name} v{version} has no logged model to attach {Path(local_path).name} to")
    client().log_model_artifact(model_id, str(local_path))


# ------------------------------------------------------------------ promotion lock


# ------------------------------------------------------------------ champion history

HISTORY_TAG = t.HISTORY


def champion_history(name: str) -> list[dict]:
    from mlflow.exceptions import MlflowException

    try:
        rm = client().get_registered_model(name)
    except MlflowException:
        return []
    return json.loads(rm.tags.get(HISTORY_TAG, "[]"))


def champion_stack(history: list[dict]) -> list[str]:
    """The champions in order, replaying promotions (push) and rollbacks (pop)."""
    stack: list[str] = []
    for event in history:
        if event["kind"] == "rollback":
            if stack:
                stack.pop()
        else:
            stack.append(event["version"])
    return stack


def record_champion(name: str, version: str, kind: str, reason: str, previous: str | None,
                    by: str | None = None) -> dict:
    """Move `champion` to `version` and append the event to the model's history (a
    registered-model tag, newest last, trimmed from the oldest end to fit the store)."""
    import getpass
    import time

    event = {"version": version, "kind": kind, "reason": reason[:500], "previous": previous,
             "by": by or getpass.getuser(), "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    history = champion_history(name) + [event]
    c = client()
    c.set_registered_model_alias(name, CHAMPION, version)
    blob = json.dumps(history)
    while len(blob) > 4900 and len(history) > 1:
        history = history[1:]
        blob = json.dumps(history)
    c.set_registered_model_tag(name, HISTORY_TAG, blob)
    c.set_model_version_tag(name, version, t.CHAMPION_EVENT + event['at'], f"{kind}: {reason}"[:5000])
    return event


def _quoted(value: str) -> str:
    return "'" + str(value).replace("\\", "\\\\").replace("'", "\\'") + "'"


def versions_tagged(name: str, tags: dict[str, str]) -> list:
    """The versions whose tags hold these values, newest first: one indexed query, not a
    scan of every version (a registry of 1,000 versions answers in ~0.02 s on PostgreSQL)."""
    clauses = [f"name={_quoted(name)}"] + [f"tags.`{k}` = {_quoted(v)}" for k, v in tags.items()]
    found = client().search_model_versions(" and ".join(clauses), max_results=1000)
    return sorted(found, key=lambda v: -int(v.version))


def newest_versions(name: str, limit: int) -> list:
    return list(client().search_model_versions(f"name={_quoted(name)}", max_results=limit,
                                               order_by=["version_number DESC"]))


def versions(name: str) -> list:
    """Every version of the model, newest first."""
    c = client()
    out, token = [], None
    while True:
        page = c.search_model_versions(f"name='{name}'", max_results=1000, page_token=token,
                                       order_by=["version_number DESC"])
        out.extend(page)
        token = page.token
        if not token:
            return sorted(out, key=lambda v: -int(v.version))


def tag_version(name: str, version: str, tags: dict[str, str], description: str | None = None) -> None:
    c = client()
    for key, value in tags.items():
        c.set_model_version_tag(name, version, key, str(value)[:5000])
    if description is not None:
        c.update_model_version(name, version, description=description)



def log_dict_artifact(run_id: str, data: dict, artifact_file: str) -> None:
    client().log_text(run_id, json.dumps(data, indent=2, sort_keys=True, default=str), artifact_file)


def log_files(run_id: str, paths: list[str | Path], artifact_path: str) -> None:
    c = client()
    for p in paths:
        p = Path(p)
        if p.is_file():
            c.log_artifact(run_id, str(p), artifact_path)


def log_dir(run_id: str, path: str | Path, artifact_path: str, skip: tuple[str, ...] = ()) -> None:
    """A folder into the run's artifacts, leaving out files matching the `skip` patterns."""
    if not skip:
        client().log_artifacts(run_id, str(path), artifact_path)
        return
    tmp = scratch_dir("ftpipe-log-dir-")
    try:
        shutil.copytree(path, tmp / "d", ignore=shutil.ignore_patterns(*skip))
        client().log_artifacts(run_id, str(tmp / "d"), artifact_path)
    finally:
        remove(tmp)


def code_copy() -> Path:
    """ftpipe's Python modules as a version carries them (no caches, no Data Docs assets)."""
    tmp = scratch_dir("ftpipe-code-")
    shutil.copytree(Path(__file__).parents[1], tmp / "ftpipe",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "static"))
    return tmp / "ftpipe"


def scratch_dir(prefix: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=prefix))


def remove(path: str | Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def decided_on(name: str, splits_md5: str, config_hash: str) -> str | None:
    """'NAME vN (decision)' when a version was already trained on this data version with this
    config and the gate decided on it (an undecided one is finished by the next run)."""

    for mv in versions_tagged(name, {t.SPLITS: splits_md5, t.CONFIG_HASH: config_hash}):
        decision = (mv.tags or {}).get(t.DECISION)
        if decision:
            return f"{name} v{mv.version} ({decision})"
    return None


def version_weights(name: str, version: str, root: Path) -> LocalVersion:
    """A version's weights, downloaded once under runs/ and reused after (an adapter
    version's base comes from this machine's base cache)."""
    import json

    dst = root / "runs" / f"champion-{name}-v{version}"
    done = dst / ".complete"
    if done.is_file():
        try:
            found = LocalVersion(**json.loads(done.read_text()))
            if Path(found.model_dir).is_dir() and (found.adapter_dir is None or Path(found.adapter_dir).is_dir()):
                return found
        except (ValueError, TypeError):   # an older marker (a bare path): download again
            pass
    found = download_model(name, version, dst)
    done.write_text(json.dumps(found.__dict__))
    return found
