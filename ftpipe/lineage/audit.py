"""Lineage audits: from a registered model version back to the exact bytes it learned from,
every link verified.

The chain of a version: model version -> MLflow run -> git commit, config hash, base model
-> data version (DVC md5 of every data stage output) -> GX results -> source manifest ->
quarantine summary -> Prefect flow run (and, incremental, the training file).

What is trusted: the immutable record (ftpipe.lineage.record): the audit reads it, checks
its digest, and names every version tag that no longer says what was recorded. Everything
else is re-derived from what it points at: git objects, DVC cache and remote objects
re-hashed, source files and an incremental run's training file re-hashed.
"""

from __future__ import annotations

import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from ftpipe import names as t
from ftpipe.config import config_digest
from ftpipe.data.versions import Store
from ftpipe.lineage.record import TRAIN_FILE_ARTIFACT, _Run, recorded_lineage, resolve

# ------------------------------------------------------------------ model references


# ------------------------------------------------------------------ run artifacts


# ------------------------------------------------------------------ DVC objects


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
    behaviour: list[dict] = field(default_factory=list)   # the suites that gated it: file, sha256, cases, state

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



def audit(client, root: Path, ref: str, remote: str | None = None,
          flow_run: Callable[[str], tuple[bool | None, str]] | None = None) -> Audit:
    """Walk a version's chain and verify every link. flow_run(id) -> (found, "NAME: STATE")
    looks the Prefect flow run up (flows.runtime.read_flow_run: the library has no Prefect)."""
    from ftpipe.files import sha256_path

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
        commit = doc.get(t.GIT_COMMIT, "unknown")
        dirty = doc.get(t.GIT_DIRTY) == "true"
        has = commit != "unknown" and _git_has(root, commit)
        code = {"git_commit": commit, "dirty": dirty, "in_repository": has}
        links.append(Link("code", has, f"git commit {commit} " + (
            "is in this repository" if has else "is not in this repository's history")
            + (" (the working tree had uncommitted changes when it trained)" if dirty and has else "")))
        # config
        cfg_hash = doc.get(t.CONFIG_HASH, "")
        logged = run.artifact("config/params.yaml")
        config = {"hash": cfg_hash, "logged": logged is not None}
        if logged is None:
            links.append(Link("config", False, "config: the run's config/params.yaml is missing"))
        else:
            import yaml

            try:   # the hash of the logged document itself: later config fields do not change it
                again = config_digest(yaml.safe_load(logged.read_text()))
            except Exception as exc:  # noqa: BLE001 - an unreadable config is a broken link
                again = f"unreadable ({type(exc).__name__})"
            config["rehash"] = again
            links.append(Link("config", again == cfg_hash,
                              f"config hash {cfg_hash} " + ("re-computes from the run's config/params.yaml"
                                                            if again == cfg_hash else f"!= {again} computed "
                                                            "from the run's config/params.yaml")))
        base = {"id": doc.get(t.BASE_MODEL, ""), "revision": doc.get(t.BASE_MODEL_REVISION, ""),
                "start_from": doc.get(t.START_FROM, "scratch")}
        if doc.get(t.BASE_STORED):       # an adapter version: its base in the registry's base store
            from ftpipe.registry.bases import audit_stored

            ok, detail, facts = audit_stored(client, v.name, v.version, doc[t.BASE_STORED])
            base |= facts
            links.append(Link("base model", ok, detail))
        # what it trained on: its data version's train split, or an incremental run's own file
        trained_on = {"file": f"train.jsonl of {t.SPLITS_OUTPUT}", "data_version": doc.get(t.SPLITS, "")}
        if doc.get(t.TRAIN_FILE):
            want, rows = doc[t.TRAIN_FILE].split()[0].removeprefix("sha256:"), doc[t.TRAIN_FILE].split("rows:")[-1]
            got = run.artifact(TRAIN_FILE_ARTIFACT)
            now = sha256_path(got) if got else None
            trained_on = {"file": f"run artifact {TRAIN_FILE_ARTIFACT}", "rows": int(rows), "sha256": want,
                          "sha256_now": now}
            links.append(Link("training file", now == want, f"training file {TRAIN_FILE_ARTIFACT}: " + (
                "missing from the run's artifacts" if got is None else f"sha256 {want[:16]}… matches"
                if now == want else f"altered since registration (sha256 now {now[:16]}…, recorded {want[:16]}…)")))
        if doc.get(t.SWEEP):             # a sweep's winner: its study and trial, read back
            from ftpipe.sweeps.study import audit_trial

            ok, detail = audit_trial(doc[t.SWEEP], doc.get(t.CANDIDATE, ""))
            links.append(Link("sweep trial", ok is not False, detail, warning=ok is None))
        # data
        store = Store(root, remote)
        try:
            data = [verify_output(store, k, md5) for k, md5 in sorted(t.under(doc, t.DVC).items())]
        finally:
            store.close()
        if not data:
            links.append(Link("data", False, "data: no DVC data version recorded"))
        for d in data:
            links.append(Link(f"data {d['key']}", d["ok"], "; ".join(d["problems"]) or
                              f"data {d['key']} {d['md5']}: {d['objects']} objects re-hash in the cache "
                              f"({d['in_cache']}/{d['objects']})"
                              + (", all in the remote" if d["in_remote"] == d["objects"] else "")))
        # GX
        gx = {"verdict": doc.get(t.GX_VERDICT, "")}
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
        recorded = t.under(doc, t.SOURCE)
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
        # behaviour suites: which version of each gated it (a suite edited since is noted, not broken:
        # git holds the version at the recorded commit)
        suites = []
        for path_, pin in sorted(t.under(doc, t.BEHAVIOUR).items()):
            sha, cases = pin.split()[0].removeprefix("sha256:"), pin.split()[-1].removeprefix("cases:")
            here = root / path_
            now = sha256_path(here) if here.is_file() else None
            state = "ok" if now == sha else "missing" if now is None else "changed"
            suites.append({"path": path_, "sha256": sha, "cases": cases, "state": state})
            links.append(Link(f"behaviour {path_}", True, f"behaviour suite {path_}: " + {
                "ok": f"sha256 {sha[:16]}… matches ({cases} cases)",
                "missing": f"gated with sha256 {sha[:16]}…; no longer here (git has it at the recorded commit)",
                "changed": f"gated with sha256 {sha[:16]}…; edited since (git has it at the recorded commit)"}[state],
                warning=state != "ok"))
        # Prefect
        fr_id = doc.get(t.PREFECT_FLOW_RUN, "")
        found, state = flow_run(fr_id) if flow_run else (None, "not checked (no Prefect lookup given)")
        flow = {"id": fr_id, "found": found, "state": state}
        links.append(Link("prefect flow run", found is not False, f"Prefect flow run {fr_id or '—'}: {state}",
                          warning=found is None))
    finally:
        run.close()
    model = {"name": v.name, "version": v.version, "aliases": list(v.aliases), "created": v.created,
             "run_id": v.run_id}
    import datetime as dt

    return Audit(model, run_d, source, code, config, base, data, gx, sources, quarantine, flow, links,
                 str(root), dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), trained_on, suites)


# ------------------------------------------------------------------ reverse queries


# ------------------------------------------------------------------ output


