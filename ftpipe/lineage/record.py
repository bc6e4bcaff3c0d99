"""The lineage of a model version and its immutable record.

The facts (Lineage): git commit and whether the code differed, config hash, base model and
revision, the DVC hash of every data stage output, the GX verdict, each source's sha256, the
Prefect flow run, and for an incremental run its start and training file. At registration
they all go into the record: the run artifact lineage/lineage.json, its digest the run param
ftpipe.lineage_sha256 (MLflow params cannot change once logged); a few are also version
tags (ftpipe.names.VERSION_TAGS; the record lists which). Reading it back names every tag
edited since. Also: resolving models:/NAME@alias, models:/NAME/V or a run id to a version.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ftpipe import names as t
from ftpipe.files import read_jsonl
from ftpipe.registry.store import VersionInfo

if TYPE_CHECKING:
    from ftpipe.data.versions import DataVersion
    from ftpipe.training.plan import TrainingPlan


@dataclass(frozen=True)
class Lineage:
    git_commit: str
    git_dirty: bool
    config_hash: str
    base_model: str
    base_model_revision: str
    data_hashes: dict[str, str]          # "stage:path" -> DVC md5 from dvc.lock
    gx_verdict: str
    manifest: dict = field(default_factory=dict)
    prefect_flow_run: str = ""
    start_from: str = "scratch"          # or "champion models:/NAME/V: N new training rows + M replayed"
    train_file: str = ""                 # an incremental run's training file: "sha256:HEX rows:N"
    sweep: str = ""                      # a sweep's winner: "study NAME trial N (OBJECTIVE=VALUE) in STORAGE"
    behaviour: dict[str, str] = field(default_factory=dict)   # suite file -> "sha256:HEX cases:N"

    def tags(self) -> dict[str, str]:
        """The lineage as ftpipe.* keys (ftpipe.names): all go into the immutable record, a few
        also onto the version (ftpipe.names.version_tags)."""
        tags = {
            t.GIT_COMMIT: self.git_commit,
            t.GIT_DIRTY: str(self.git_dirty).lower(),
            t.CONFIG_HASH: self.config_hash,
            t.BASE_MODEL: self.base_model,
            t.BASE_MODEL_REVISION: self.base_model_revision,
            t.GX_VERDICT: self.gx_verdict,
            t.PREFECT_FLOW_RUN: self.prefect_flow_run,
            t.START_FROM: self.start_from,
        } | ({t.TRAIN_FILE: self.train_file} if self.train_file else {}) | ({t.SWEEP: self.sweep} if self.sweep else {})
        for key, md5 in self.data_hashes.items():
            tags[t.DVC + key] = md5
        for f in self.manifest.get("files", []):
            tags[t.SOURCE + f["path"]] = f"sha256:{f['sha256']} rows:{f['rows']}"
        for path, pin in self.behaviour.items():
            tags[t.BEHAVIOUR + path] = pin
        return tags


def file_pin(path: str | Path) -> str:
    """A JSONL file as a record pins it: 'sha256:HEX rows:N'."""
    from ftpipe.files import sha256_path

    rows = sum(1 for line in Path(path).read_bytes().splitlines() if line.strip())
    return f"sha256:{sha256_path(Path(path))} rows:{rows}"


# Versioned elsewhere: data/ and dvc.lock by DVC (their hashes are the data link), params.yaml
# by the config link (the whole config is logged and hashed). A drop landing in data/incoming
# or a run updating dvc.lock does not make the code "dirty".
NOT_CODE = ("data", "dvc.lock", "params.yaml")


def git_commit(root: Path) -> tuple[str, bool]:
    """(HEAD commit, whether tracked code differs from it); ('unknown', True) outside git."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "."]
                               + [f":(exclude){p}" for p in NOT_CODE], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
        return head, bool(dirty)
    except (subprocess.CalledProcessError, FileNotFoundError):
        return "unknown", True



RECORD_PARAM = t.RECORD_PARAM


RECORD_ARTIFACT = "lineage/lineage.json"


TRAIN_FILE_ARTIFACT = "data/increment/train.jsonl"   # an incremental run's training file


class AuditError(RuntimeError):
    """The model reference or the store cannot be read at all (not a broken link)."""


def record_digest(doc: dict) -> str:
    return hashlib.sha256(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def lineage_tags_of(tags: dict[str, str]) -> dict[str, str]:
    """The lineage among a version's tags (what records before VERSION_TAGS held, all as tags)."""
    return {k: v for k, v in tags.items() if k in t.LINEAGE_KEYS or k.startswith((t.DVC, t.SOURCE))}


def write_record(client, run_id: str, facts: dict[str, str], tagged: dict[str, str]) -> str:
    """At registration: every fact as a run artifact, its digest as an immutable param; the
    record names the facts that are also version tags (`tagged`)."""
    doc = facts | {t.RECORD_TAGGED: sorted(tagged)}
    client.log_text(run_id, json.dumps(doc, indent=2, sort_keys=True), RECORD_ARTIFACT)
    digest = record_digest(doc)
    client.log_param(run_id, RECORD_PARAM, digest)
    return digest


def tag_problems(doc: dict, tags: dict[str, str], where: str) -> list[str]:
    """Each version tag that no longer says what the record holds (`where`: "NAME vN"). A
    record lists the facts it also wrote as tags; an older one (no list) wrote them all."""
    tagged = doc.get(t.RECORD_TAGGED)
    if tagged is None:
        tagged, watched = set(doc), lineage_tags_of(tags)
    else:
        tagged, watched = set(tagged), {k: v for k, v in tags.items() if t.is_registered(k)}
    problems = []
    for key in sorted((tagged | set(watched)) - {t.RECORD_TAGGED}):
        if key not in tags:
            problems.append(f"tag {key} on {where} was removed: recorded {doc[key]!r}")
        elif key not in doc:
            problems.append(f"tag {key} on {where} was added after registration: {tags[key]!r}")
        elif doc[key] != tags[key]:
            problems.append(f"tag {key} on {where} was rewritten: recorded {doc[key]!r}, now {tags[key]!r}")
    return problems


def resolve(client, ref: str) -> VersionInfo:
    """`models:/NAME@alias`, `models:/NAME/VERSION` or an MLflow run id."""
    from mlflow.exceptions import MlflowException

    try:
        if ref.startswith("models:/"):
            body = ref[len("models:/"):]
            if "@" in body:
                name, alias = body.split("@", 1)
                return VersionInfo.of(client.get_model_version_by_alias(name, alias))
            name, _, version = body.rpartition("/")
            if not name or not version.isdigit():
                raise AuditError(f"{ref}: expected models:/NAME@alias, models:/NAME/VERSION or a run id")
            return VersionInfo.of(client.get_model_version(name, version))
        found = client.search_model_versions(f"run_id = '{ref}'")
    except MlflowException as exc:
        raise AuditError(f"{ref}: {exc.message}") from None
    if not found:
        raise AuditError(f"{ref}: no model version was registered from a run with this id "
                         "(expected models:/NAME@alias, models:/NAME/VERSION or a run id)")
    return VersionInfo.of(found[0])


def all_versions(client) -> list[VersionInfo]:
    out = []
    for rm in client.search_registered_models():
        aliases: dict[str, list[str]] = {}
        for alias, version in (client.get_registered_model(rm.name).aliases or {}).items():
            aliases.setdefault(str(version), []).append(alias)
        for mv in client.search_model_versions(f"name = '{rm.name}'"):
            out.append(VersionInfo.of(mv, tuple(sorted(aliases.get(str(mv.version), [])))))  # search: no aliases
    return sorted(out, key=lambda v: (v.name, int(v.version)))


class _Run:
    def __init__(self, client, run_id: str):
        self.client, self.run_id = client, run_id
        self._dir = Path(tempfile.mkdtemp(prefix="ftpipe-audit-"))
        try:
            self.info = client.get_run(run_id)
        except Exception as exc:  # noqa: BLE001 - deleted run, wrong store
            raise AuditError(f"run {run_id}: {getattr(exc, 'message', exc)}") from None

    def artifact(self, path: str) -> Path | None:
        try:
            local = self.client.download_artifacts(self.run_id, path, str(self._dir))
        except Exception:  # noqa: BLE001 - not there
            return None
        return Path(local) if Path(local).is_file() else None

    def json(self, path: str):
        p = self.artifact(path)
        if p is None:
            return None
        if p.suffix == ".jsonl":
            return read_jsonl(p)
        return json.loads(p.read_text())

    def close(self):
        shutil.rmtree(self._dir, ignore_errors=True)


def recorded_lineage(client, v: VersionInfo) -> tuple[dict, str, list[str]]:
    """(the lineage document to trust, where it came from, problems with the record/tags)."""
    run = _Run(client, v.run_id)
    try:
        digest = run.info.data.params.get(RECORD_PARAM)
        doc = run.json(RECORD_ARTIFACT)
    finally:
        run.close()
    tags = lineage_tags_of(v.tags)
    if digest is None:
        return tags, "tags (no immutable record: registered before lineage records)", []
    if doc is None:
        return tags, "tags", [f"lineage record: the run's {RECORD_ARTIFACT} is missing"]
    if record_digest(doc) != digest:
        return tags, "tags", [f"lineage record: {RECORD_ARTIFACT} does not hash to the run's immutable "
                              f"param {RECORD_PARAM} (the artifact was altered)"]
    problems = tag_problems(doc, v.tags, f"{v.name} v{v.version}")
    return {k: x for k, x in doc.items() if k != t.RECORD_TAGGED}, "immutable run record", problems


def recorded_tags(client, name: str, version: str) -> dict[str, str]:
    """A version's tags with every fact of its record (lineage, all metrics): what the
    version tags alone held before only a few facts were kept as tags."""
    v = VersionInfo.of(client.get_model_version(name, str(version)))
    return v.tags | recorded_lineage(client, v)[0]


def lineage_of(data: DataVersion, plan: TrainingPlan, config_hash: str, root: Path, flow_run_id: str,
               sweep: str = "", suites: list | None = None) -> Lineage:
    """Everything a candidate came from: code, config, base model, data version, GX verdict,
    sources, the Prefect flow run, (incremental) its start and training file, and (a sweep's
    winner) the study and trial."""
    commit, dirty = git_commit(root)
    train_file = plan.splits["train"] if plan.increment.train_path else None
    return Lineage(git_commit=commit, git_dirty=dirty, config_hash=config_hash, base_model=data.base.id,
                   base_model_revision=data.base.revision, data_hashes=data.hashes, gx_verdict=data.gx_verdict,
                   manifest=data.manifest, prefect_flow_run=flow_run_id, start_from=plan.start_from,
                   train_file=file_pin(train_file) if train_file else "", sweep=sweep,
                   behaviour={s.file: f"sha256:{s.sha256} cases:{len(s.cases)}" for s in suites or []
                              if not s.generated})
