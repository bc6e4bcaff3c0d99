"""Lineage audits: from a registered model version back to the exact bytes it learned from,
every link verified; the bytes restored from DVC; and the reverse questions of a deletion
request ("which versions saw this file / this row?").

The chain of a version: model version -> MLflow run -> git commit, config hash, base model
-> data version (DVC md5 of every data stage output) -> GX results -> source manifest ->
quarantine summary -> Prefect flow run.

What is trusted: registry tags can be edited by anyone with registry access, so every
version also gets an immutable record at registration: the run's param
`ftpipe.lineage_sha256` (MLflow params cannot be changed once logged) over the lineage
document stored as the run artifact `lineage/lineage.json`. The record holds every fact of
the registration; only a few are also version tags (ftpipe.registry.tags.VERSION_TAGS; the record
lists them). The audit reads the document, checks its digest against the param, and names
every tag that no longer says what was recorded. Everything else is re-derived from what it
points at: git objects, DVC cache and remote objects re-hashed, source files and an
incremental run's training file re-hashed.
"""

from __future__ import annotations

import hashlib
import html
import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ftpipe.registry import tags as t

RECORD_PARAM = "ftpipe.lineage_sha256"
RECORD_ARTIFACT = "lineage/lineage.json"
TRAIN_FILE_ARTIFACT = "data/increment/train.jsonl"   # an incremental run's training file
SPLITS_KEY = t.SPLITS.removeprefix(t.DVC)


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


# ------------------------------------------------------------------ model references

@dataclass(frozen=True)
class Version:
    name: str
    version: str
    run_id: str
    aliases: tuple[str, ...]
    tags: dict
    created: str


def _version(mv) -> Version:
    import datetime as dt

    created = dt.datetime.fromtimestamp(mv.creation_timestamp / 1000, dt.timezone.utc).isoformat(timespec="seconds") \
        if mv.creation_timestamp else ""
    return Version(mv.name, str(mv.version), mv.run_id, tuple(mv.aliases or ()), dict(mv.tags or {}), created)


def resolve(client, ref: str) -> Version:
    """`models:/NAME@alias`, `models:/NAME/VERSION` or an MLflow run id."""
    from mlflow.exceptions import MlflowException

    try:
        if ref.startswith("models:/"):
            body = ref[len("models:/"):]
            if "@" in body:
                name, alias = body.split("@", 1)
                return _version(client.get_model_version_by_alias(name, alias))
            name, _, version = body.rpartition("/")
            if not name or not version.isdigit():
                raise AuditError(f"{ref}: expected models:/NAME@alias, models:/NAME/VERSION or a run id")
            return _version(client.get_model_version(name, version))
        found = client.search_model_versions(f"run_id = '{ref}'")
    except MlflowException as exc:
        raise AuditError(f"{ref}: {exc.message}") from None
    if not found:
        raise AuditError(f"{ref}: no model version was registered from a run with this id "
                         "(expected models:/NAME@alias, models:/NAME/VERSION or a run id)")
    return _version(found[0])


def all_versions(client) -> list[Version]:
    out = []
    for rm in client.search_registered_models():
        aliases: dict[str, list[str]] = {}
        for alias, version in (client.get_registered_model(rm.name).aliases or {}).items():
            aliases.setdefault(str(version), []).append(alias)
        for mv in client.search_model_versions(f"name = '{rm.name}'"):
            v = _version(mv)   # (search results carry no aliases)
            out.append(Version(v.name, v.version, v.run_id, tuple(sorted(aliases.get(v.version, []))), v.tags, v.created))
    return sorted(out, key=lambda v: (v.name, int(v.version)))


# ------------------------------------------------------------------ run artifacts

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
            return [json.loads(x) for x in p.read_text().splitlines() if x.strip()]
        return json.loads(p.read_text())

    def close(self):
        shutil.rmtree(self._dir, ignore_errors=True)


def recorded_lineage(client, v: Version) -> tuple[dict, str, list[str]]:
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
    v = _version(client.get_model_version(name, str(version)))
    return v.tags | recorded_lineage(client, v)[0]


# ------------------------------------------------------------------ DVC objects

def _md5_stream(f) -> str:
    h = hashlib.md5()  # noqa: S324 - DVC's content address, not security
    for chunk in iter(lambda: f.read(1 << 20), b""):
        h.update(chunk)
    return h.hexdigest()


class Store:
    """The DVC cache and (if configured) remote of the project, read-only."""

    def __init__(self, root: Path, remote: str | None = None):
        os.environ.setdefault("DVC_NO_ANALYTICS", "1")
        import logging

        from dvc.repo import Repo

        logging.getLogger("dvc").propagate = False
        self.repo = Repo(str(root))
        self.local = self.repo.cache.local
        self.remote_name = remote or self.repo.config["core"].get("remote")
        self.remote = self.repo.cloud.get_remote_odb(self.remote_name) if self.remote_name else None

    def close(self):
        self.repo.close()

    def _open(self, where: str, oid: str):
        if where == "cache":
            return open(self.local.oid_to_path(oid), "rb")
        return self.remote.fs.open(self.remote.oid_to_path(oid), "rb")

    def check(self, where: str, oid: str) -> str:
        """'ok', 'missing' or 'corrupt:<md5 it hashes to>' for one object in the cache or remote."""
        if where == "remote" and self.remote is None:
            return "n/a"
        try:
            with self._open(where, oid) as f:
                got = _md5_stream(f)
        except (FileNotFoundError, OSError):
            return "missing"
        want = oid[:-4] if oid.endswith(".dir") else oid
        return "ok" if got == want else f"corrupt:{got}"

    def read(self, oid: str) -> bytes | None:
        """An object's bytes from wherever a copy re-hashes correctly (cache first)."""
        got = self.read_from(oid)
        return got[0] if got else None

    def read_from(self, oid: str) -> tuple[bytes, str] | None:
        for where in ("cache", "remote"):
            if self.check(where, oid) == "ok":
                with self._open(where, oid) as f:
                    return f.read(), where
        return None

    def listing(self, md5: str) -> list[dict] | None:
        data = self.read(md5)
        return json.loads(data) if data is not None else None

    def where(self) -> str:
        return f"remote '{self.remote_name}'" if self.remote_name else "remote"


def verify_output(store: Store, key: str, md5: str) -> dict:
    """One recorded DVC output: every object (listing and files) present and re-hashing in the
    cache, and present in the remote; each problem named."""
    oids = [(md5, "(directory listing)")]
    listing = store.listing(md5) if md5.endswith(".dir") else []
    problems: list[str] = []
    if listing is None:
        problems.append(f"data {key}: directory listing {md5} is in neither the cache nor {store.where()}")
        listing = []
    oids += [(e["md5"], e["relpath"]) for e in listing]
    seen = {"cache": 0, "remote": 0}
    for oid, rel in oids:
        states = {w: store.check(w, oid) for w in ("cache", "remote")}
        for w, s in states.items():
            if s == "ok":
                seen[w] += 1
            elif s.startswith("corrupt"):
                problems.append(f"data {key}: {w} object for {rel} re-hashes to {s.split(':', 1)[1]}, "
                                f"recorded {oid} ({store.local.oid_to_path(oid) if w == 'cache' else store.remote.oid_to_path(oid)})")
        if states["remote"] == "missing":
            problems.append(f"data {key}: {rel} ({oid}) is missing from {store.where()}")
        if "ok" not in states.values() and not any(s.startswith("corrupt") for s in states.values()):
            if states["remote"] == "n/a":
                problems.append(f"data {key}: {rel} ({oid}) is not in the DVC cache and no remote is configured")
    return {"key": key, "md5": md5, "files": [e["relpath"] for e in listing],
            "objects": len(oids), "in_cache": seen["cache"],
            "in_remote": seen["remote"] if store.remote is not None else None,
            "ok": not problems, "problems": problems}


def restore_output(store: Store, md5: str, dest: Path) -> list[dict]:
    """Write a recorded output (a directory) into dest, byte for byte, each file re-hashed."""
    listing = store.listing(md5)
    if listing is None:
        raise AuditError(f"data version {md5} is in neither the DVC cache nor {store.where()}")
    out = []
    for e in listing:
        got = store.read_from(e["md5"])
        if got is None:
            raise AuditError(f"{e['relpath']} ({e['md5']}) of data version {md5}: no copy in the cache or "
                             f"{store.where()} re-hashes to its recorded md5")
        data, where = got
        path = dest / e["relpath"]
        if not path.resolve().is_relative_to(dest.resolve()):
            raise AuditError(f"data version {md5}: listed file {e['relpath']!r} would land outside {dest}")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".part")
        tmp.write_bytes(data)
        tmp.replace(path)
        out.append({"path": str(path), "md5": e["md5"], "bytes": len(data), "from": where})
    return out


def split_rows(store: Store, md5: str) -> dict[str, str] | None:
    """row hash -> split name for a data/splits version (from the cache or the remote)."""
    listing = store.listing(md5)
    if listing is None:
        return None
    rows: dict[str, str] = {}
    for e in listing:
        if not e["relpath"].endswith(".jsonl"):
            continue
        data = store.read(e["md5"])
        if data is None:
            return None
        for line in data.splitlines():
            if line.strip():
                rows[json.loads(line)["_hash"]] = e["relpath"][:-len(".jsonl")]
    return rows


# ------------------------------------------------------------------ the audit

@dataclass
class Link:
    name: str
    ok: bool
    detail: str
    warning: bool = False


@dataclass
class Audit:
    model: dict
    run: dict
    record: str
    code: dict
    config: dict
    base_model: dict
    data: list[dict]
    gx: dict
    sources: list[dict]
    quarantine: dict
    prefect_flow_run: dict
    links: list[Link] = field(default_factory=list)
    project: str = ""
    audited_at: str = ""
    trained_on: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return all(link.ok for link in self.links)

    @property
    def broken(self) -> list[Link]:
        return [link for link in self.links if not link.ok]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ok"] = self.ok
        d["broken"] = [link.detail for link in self.broken]
        return d


def _git_has(root: Path, commit: str) -> bool:
    return subprocess.run(["git", "cat-file", "-e", f"{commit}^{{commit}}"], cwd=root,
                          capture_output=True).returncode == 0


def _flow_run(flow_run_id: str) -> tuple[bool | None, str]:
    """(found, state) from the Prefect API when one is configured; (None, why) otherwise."""
    if not flow_run_id or flow_run_id == "local":
        return None, "no Prefect flow run recorded (flow ran without an API)"
    try:  # PREFECT_API_URL's server, else the project's store (its server, or a temporary one: ~15 s)
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


def audit(client, root: Path, ref: str, remote: str | None = None) -> Audit:
    from ftpipe.data.sources import sha256_path

    v = resolve(client, ref)
    links: list[Link] = []
    doc, source, record_problems = recorded_lineage(client, v)
    links.append(Link("lineage record", not record_problems,
                      "; ".join(record_problems) or f"version tags match the {source}",
                      warning=source.startswith("tags (")))
    run = _Run(client, v.run_id)
    try:
        info = run.info.info
        run_d = {"id": v.run_id, "status": info.status, "experiment_id": info.experiment_id,
                 "name": info.run_name}
        # code
        commit = doc.get("ftpipe.git_commit", "unknown")
        dirty = doc.get("ftpipe.git_dirty") == "true"
        has = commit != "unknown" and _git_has(root, commit)
        code = {"git_commit": commit, "dirty": dirty, "in_repository": has}
        links.append(Link("code", has, f"git commit {commit} " + (
            "is in this repository" if has else "is not in this repository's history")
            + (" (the working tree had uncommitted changes when it trained)" if dirty and has else "")))
        # config
        cfg_hash = doc.get("ftpipe.config_hash", "")
        logged = run.artifact("config/params.yaml")
        config = {"hash": cfg_hash, "logged": logged is not None}
        if logged is None:
            links.append(Link("config", False, "config: the run's config/params.yaml is missing"))
        else:
            import yaml

            try:   # the hash of the logged document itself: later config fields do not change it
                blob = json.dumps(yaml.safe_load(logged.read_text()), sort_keys=True).encode()
                again = hashlib.sha256(blob).hexdigest()[:16]
            except Exception as exc:  # noqa: BLE001 - an unreadable config is a broken link
                again = f"unreadable ({type(exc).__name__})"
            config["rehash"] = again
            links.append(Link("config", again == cfg_hash,
                              f"config hash {cfg_hash} " + ("re-computes from the run's config/params.yaml"
                                                            if again == cfg_hash else f"!= {again} computed "
                                                            "from the run's config/params.yaml")))
        base = {"id": doc.get("ftpipe.base_model", ""), "revision": doc.get("ftpipe.base_model_revision", ""),
                "start_from": doc.get("ftpipe.start_from", "scratch")}
        # what it trained on: its data version's train split, or an incremental run's own file
        trained_on = {"file": f"train.jsonl of {SPLITS_KEY}", "data_version": doc.get(t.SPLITS, "")}
        if doc.get(t.TRAIN_FILE):
            want, rows = doc[t.TRAIN_FILE].split()[0].removeprefix("sha256:"), doc[t.TRAIN_FILE].split("rows:")[-1]
            got = run.artifact(TRAIN_FILE_ARTIFACT)
            now = sha256_path(got) if got else None
            trained_on = {"file": f"run artifact {TRAIN_FILE_ARTIFACT}", "rows": int(rows), "sha256": want,
                          "sha256_now": now}
            links.append(Link("training file", now == want, f"training file {TRAIN_FILE_ARTIFACT}: " + (
                "missing from the run's artifacts" if got is None else f"sha256 {want[:16]}… matches"
                if now == want else f"altered since registration (sha256 now {now[:16]}…, recorded {want[:16]}…)")))
        # data
        store = Store(root, remote)
        try:
            data = [verify_output(store, k[len("ftpipe.dvc."):], md5)
                    for k, md5 in sorted(doc.items()) if k.startswith("ftpipe.dvc.")]
        finally:
            store.close()
        if not data:
            links.append(Link("data", False, "data: no DVC data version recorded"))
        for d in data:
            links.append(Link(f"data {d['key']}", d["ok"], "; ".join(d["problems"]) or
                              f"data {d['key']} {d['md5']}: {d['objects']} objects re-hash in the cache "
                              f"({d['in_cache']}/{d['objects']})"
                              + (f", all in the remote" if d["in_remote"] == d["objects"] else "")))
        # GX
        gx = {"verdict": doc.get("ftpipe.gx_verdict", "")}
        for name in ("raw_validation", "cleaned_validation"):
            res = run.json(f"data/{name}.json")
            gx[name] = None if res is None else {"success": res.get("success"),
                                                 "evaluated": (res.get("statistics") or {}).get("evaluated_expectations")}
            ok = res is not None and bool(res.get("success"))
            links.append(Link(f"gx {name}", ok, f"GX {name}: " + (
                "missing from the run's artifacts" if res is None else
                ("passed" if ok else "did not pass") + f" ({gx[name]['evaluated']} expectations)")))
        # sources
        manifest = run.json("data/manifest.json") or {}
        recorded = {k[len("ftpipe.source."):]: val for k, val in doc.items() if k.startswith("ftpipe.source.")}
        sources = []
        files = manifest.get("files") or [{"path": p, "sha256": val.split()[0].removeprefix("sha256:"),
                                            "rows": None, "size": None} for p, val in recorded.items()]
        if not manifest:
            links.append(Link("source manifest", False, "source manifest: data/manifest.json is missing from the run"))
        for f in files:
            path = root / f["path"]
            rec = recorded.get(f["path"], "")
            state, now = "ok", None
            if rec and not rec.startswith(f"sha256:{f['sha256']}"):
                state = "manifest differs from the recorded lineage"
            elif not path.exists():
                state = "missing"
            else:
                now = sha256_path(path)
                if now != f["sha256"]:
                    state = "changed"
            sources.append({"path": f["path"], "size": f.get("size"), "rows": f.get("rows"),
                            "sha256": f["sha256"], "state": state, "sha256_now": now})
            links.append(Link(f"source {f['path']}", state == "ok", {
                "ok": f"source {f['path']}: sha256 {f['sha256'][:16]}… matches",
                "missing": f"source {f['path']}: no longer at {path} (its rows are in the collected "
                           "snapshot in DVC)",
                "changed": f"source {f['path']}: changed since training (sha256 now {str(now)[:16]}…, "
                           f"recorded {f['sha256'][:16]}…)",
            }.get(state, f"source {f['path']}: {state}")))
        # quarantine
        report = run.json("data/report.json")
        quarantine = {} if report is None else {k: report.get(k) for k in ("read", "kept", "quarantined", "reasons")}
        links.append(Link("quarantine summary", report is not None, "quarantine summary: " + (
            "missing from the run's artifacts" if report is None else
            f"{report.get('quarantined')} of {report.get('read')} rows quarantined")))
        # Prefect
        fr_id = doc.get("ftpipe.prefect_flow_run", "")
        found, state = _flow_run(fr_id)
        flow = {"id": fr_id, "found": found, "state": state}
        links.append(Link("prefect flow run", found is not False, f"Prefect flow run {fr_id or '—'}: {state}",
                          warning=found is None))
    finally:
        run.close()
    model = {"name": v.name, "version": v.version, "aliases": list(v.aliases), "created": v.created,
             "run_id": v.run_id}
    import datetime as dt

    return Audit(model, run_d, source, code, config, base, data, gx, sources, quarantine, flow, links,
                 str(root), dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), trained_on)


# ------------------------------------------------------------------ reverse queries

def versions_with_source(client, root: Path, path: str) -> list[dict]:
    """Every model version whose collected data included this source file: by its recorded
    path, or by the same bytes (sha256) under any path when the file is here."""
    from ftpipe.data.sources import sha256_path

    p = Path(path)
    if p.is_absolute():
        full = p
    else:   # relative to the project (as recorded), else to where the command runs
        full = root / p if (root / p).exists() or not (Path.cwd() / p).exists() else Path.cwd() / p
    try:
        rel = full.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        rel = p.as_posix()
    sha = sha256_path(full) if full.is_file() else None
    out = []
    for v in all_versions(client):
        doc, _, _ = recorded_lineage(client, v)
        for k, val in doc.items():
            if not k.startswith("ftpipe.source."):
                continue
            src = k[len("ftpipe.source."):]
            digest = val.split()[0].removeprefix("sha256:")
            if src == rel:
                how = "path"
            elif full.is_dir() and src.startswith(rel.rstrip("/") + "/"):
                how = "folder"
            elif sha and digest == sha:
                how = "content"
            else:
                continue
            note = ""
            if how == "path":
                note = ("no file there now" if not full.exists() else
                        "the file there now has other bytes" if sha != digest else "the file there now is the same")
            out.append({"model": v.name, "version": v.version, "aliases": list(v.aliases), "source": src,
                        "sha256": digest, "matched_by": how, "now": note, "run_id": v.run_id})
    return out


def with_descendants(client, hits: list[dict]) -> list[dict]:
    """Add every version trained from the weights of a version that learned it (incremental
    runs record `ftpipe.start_from: champion models:/NAME/V: ...`), transitively: it carries
    what they learned. A hit that did not train on the row itself (`trained` false: held out,
    or left out of an incremental run's training file) passes nothing on; it gets `via` when
    the weights it started from learned the row."""
    import re

    versions = all_versions(client)
    parent = {}
    for v in versions:
        m = re.match(r"champion models:/([^/]+)/(\d+)", recorded_lineage(client, v)[0].get(t.START_FROM, ""))
        if m:
            parent[(v.name, v.version)] = (m.group(1), m.group(2))
    out = [dict(h) for h in hits]
    by_key = {(h["model"], h["version"]): h for h in out}
    learned = {k for k, h in by_key.items() if h.get("trained") is not False}
    grew = True
    while grew:
        grew = False
        for v in versions:
            key = (v.name, v.version)
            if key in learned or parent.get(key) not in learned:
                continue
            learned.add(key)
            grew = True
            via = f"models:/{parent[key][0]}/{parent[key][1]}"
            if key in by_key:
                by_key[key]["via"] = via
            else:
                by_key[key] = {"model": v.name, "version": v.version, "aliases": list(v.aliases), "via": via,
                               "run_id": v.run_id}
                out.append(by_key[key])
    return out


def trained_rows(client, v: Version, doc: dict) -> set[str] | str | None:
    """The `_hash` of every row an incremental version trained on (its run's training file,
    checked against the record's sha256); None when it trained on its whole train split; a
    string saying why the file cannot be read."""
    from ftpipe.data.sources import sha256_path

    pin = doc.get(t.TRAIN_FILE, "")
    if not pin and not doc.get(t.START_FROM, "").startswith("champion "):
        return None
    run = _Run(client, v.run_id)
    try:
        path = run.artifact(TRAIN_FILE_ARTIFACT)
        if path is None:
            return f"its training file {TRAIN_FILE_ARTIFACT} is missing from run {v.run_id}"
        if pin and sha256_path(path) != pin.split()[0].removeprefix("sha256:"):
            return f"its training file {TRAIN_FILE_ARTIFACT} does not hash to the recorded {pin.split()[0]}"
        return {json.loads(x)["_hash"] for x in path.read_bytes().splitlines() if x.strip()}
    finally:
        run.close()


def versions_with_row(client, root: Path, row_hash: str, remote: str | None = None) -> list[dict]:
    """Every model version whose train/validation/test data held the row with this `_hash`,
    and whether it trained on it (`trained`: true, false, or None when its training file
    cannot be read): a validation/test row is not trained on, and an incremental version
    trained only on its new rows + replay sample (`trained_on`), not on its whole split."""
    store = Store(root, remote)
    cache: dict[str, dict | None] = {}
    out = []
    try:
        for v in all_versions(client):
            doc, _, _ = recorded_lineage(client, v)
            md5 = doc.get(t.SPLITS)
            if not md5:
                continue
            if md5 not in cache:
                cache[md5] = split_rows(store, md5)
            rows = cache[md5]
            if rows is None:
                out.append({"model": v.name, "version": v.version, "split": None,
                            "error": f"data/splits {md5} is in neither the cache nor {store.where()}"})
            elif row_hash in rows:
                hit = {"model": v.name, "version": v.version, "aliases": list(v.aliases), "split": rows[row_hash],
                       "trained": rows[row_hash] == "train", "data_version": md5, "run_id": v.run_id}
                trained = trained_rows(client, v, doc) if hit["trained"] else None
                if trained is not None:
                    hit["trained_on"] = f"run artifact {TRAIN_FILE_ARTIFACT} (incremental: new rows + replay)"
                    hit["trained"] = row_hash in trained if isinstance(trained, set) else None
                    if isinstance(trained, str):
                        hit["note"] = trained
                out.append(hit)
    finally:
        store.close()
    return out


# ------------------------------------------------------------------ output

def tree_lines(a: Audit) -> list[str]:
    mark = {True: "ok", False: "BROKEN"}
    by = {link.name: link for link in a.links}

    def m(name):
        link = by.get(name)
        return "" if link is None else f"  [{mark[link.ok] if not (link.ok and link.warning) else 'unverified'}]"

    lines = [f"{a.model['name']} v{a.model['version']}" + (f" ({', '.join(a.model['aliases'])})" if a.model['aliases'] else "")
             + f"  registered {a.model['created']}" + m("lineage record"),
             f"└── run {a.run['id']} ({a.run['name']}, {a.run['status']})",
             f"    ├── code: git {a.code['git_commit']}" + (" (dirty)" if a.code["dirty"] else "") + m("code"),
             f"    ├── config: {a.config['hash']}" + m("config"),
             f"    ├── base model: {a.base_model['id']} @ {a.base_model['revision']}",
             f"    ├── trained from: {a.base_model.get('start_from', 'scratch')}",
             "    ├── data version (DVC)"]
    if a.trained_on.get("sha256"):
        lines.insert(-1, f"    ├── trained on: {a.trained_on['file']}, {a.trained_on['rows']} rows, "
                         f"sha256 {a.trained_on['sha256'][:16]}…" + m("training file"))
    for i, d in enumerate(a.data):
        last = i == len(a.data) - 1
        lines.append(f"    │   {'└' if last else '├'}── {d['key']}: {d['md5']} ({len(d['files'])} files)" + m(f"data {d['key']}"))
    lines.append("    ├── GX: " + a.gx.get("verdict", ""))
    for name in ("raw_validation", "cleaned_validation"):
        lines.append(f"    │   {'└' if name == 'cleaned_validation' else '├'}── {name}" + m(f"gx {name}"))
    lines.append("    ├── sources")
    for i, s in enumerate(a.sources):
        lines.append(f"    │   {'└' if i == len(a.sources) - 1 else '├'}── {s['path']}  {s['size'] or '?'} bytes, "
                     f"{s['rows'] if s['rows'] is not None else '?'} rows, sha256 {s['sha256'][:16]}…" + m(f"source {s['path']}"))
    q = a.quarantine
    lines.append(f"    ├── quarantine: {q.get('quarantined', '?')} of {q.get('read', '?')} rows"
                 + (f" ({', '.join(f'{k}: {n}' for k, n in sorted((q.get('reasons') or {}).items()))})" if q.get("reasons") else "")
                 + m("quarantine summary"))
    lines.append(f"    └── Prefect flow run: {a.prefect_flow_run['id']} {a.prefect_flow_run['state']}" + m("prefect flow run"))
    return lines


def html_report(a: Audit) -> str:
    e = html.escape
    rows = "".join(f"<tr class='{'ok' if l.ok else 'bad'}{' warn' if l.ok and l.warning else ''}'><td>{e(l.name)}</td>"
                   f"<td>{'unverified' if l.ok and l.warning else ('ok' if l.ok else 'BROKEN')}</td><td>{e(l.detail)}</td></tr>"
                   for l in a.links)
    srcs = "".join(f"<tr><td>{e(s['path'])}</td><td>{e(str(s['size']))}</td><td>{e(str(s['rows']))}</td>"
                   f"<td><code>{e(s['sha256'])}</code></td><td>{e(s['state'])}</td></tr>" for s in a.sources)
    data = "".join(f"<tr><td>{e(d['key'])}</td><td><code>{e(d['md5'])}</code></td><td>{'<br>'.join(e(f) for f in d['files'])}</td>"
                   f"<td>{d['in_cache']}/{d['objects']}</td><td>{'—' if d['in_remote'] is None else str(d['in_remote']) + '/' + str(d['objects'])}</td></tr>"
                   for d in a.data)
    q = a.quarantine
    reasons = "".join(f"<tr><td>{e(k)}</td><td>{n}</td></tr>" for k, n in sorted((q.get("reasons") or {}).items()))
    verdict = "Chain whole: every link verified." if a.ok else f"{len(a.broken)} broken link(s)."
    return f"""<!doctype html><html><head><meta charset="utf-8">
<title>Lineage audit: {e(a.model['name'])} v{e(a.model['version'])}</title>
<style>body{{font:14px system-ui,sans-serif;margin:2em;max-width:1100px}}table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}}tr.bad td{{background:#fdd}}
tr.warn td{{background:#ffe}}.verdict{{font-size:1.2em;font-weight:bold;color:{'#060' if a.ok else '#a00'}}}
pre{{background:#f6f6f6;padding:1em;overflow:auto}}</style></head><body>
<h1>Lineage audit: {e(a.model['name'])} v{e(a.model['version'])}</h1>
<p class="verdict">{e(verdict)}</p>
<p>Audited {e(a.audited_at)} in <code>{e(a.project)}</code>.</p>
<p>Aliases: {e(', '.join(a.model['aliases']) or 'none')} · registered {e(a.model['created'])} ·
run <code>{e(a.run['id'])}</code> ({e(a.run['status'])}) · lineage read from the {e(a.record)}</p>
<h2>Chain</h2><pre>{e(chr(10).join(tree_lines(a)))}</pre>
<h2>Verification</h2><table><tr><th>link</th><th>status</th><th>detail</th></tr>{rows}</table>
<h2>Code and configuration</h2><table>
<tr><td>git commit</td><td><code>{e(a.code['git_commit'])}</code>{' (uncommitted changes at training time)' if a.code['dirty'] else ''}</td></tr>
<tr><td>config hash</td><td><code>{e(a.config['hash'])}</code></td></tr>
<tr><td>base model</td><td>{e(a.base_model['id'])} @ <code>{e(a.base_model['revision'])}</code></td></tr>
<tr><td>Prefect flow run</td><td><code>{e(a.prefect_flow_run['id'])}</code> {e(a.prefect_flow_run['state'])}</td></tr></table>
<h2>Data version (DVC)</h2><table><tr><th>output</th><th>md5</th><th>files</th><th>cache</th><th>remote</th></tr>{data}</table>
<h2>Great Expectations</h2><p>{e(a.gx.get('verdict', ''))}</p>
<h2>Sources</h2><table><tr><th>path</th><th>bytes</th><th>rows</th><th>sha256</th><th>now</th></tr>{srcs}</table>
<h2>Quarantine</h2><p>{e(str(q.get('quarantined', '?')))} of {e(str(q.get('read', '?')))} rows quarantined, {e(str(q.get('kept', '?')))} kept.</p>
<table><tr><th>reason</th><th>rows</th></tr>{reasons}</table>
<p><small>Generated by <code>ftpipe lineage</code>. Self-contained: no external resources.</small></p>
</body></html>
"""
