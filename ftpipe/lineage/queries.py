"""The reverse questions of a deletion request: which model versions learned from this
source file, or this row (answered from what each version actually trained on), and the
versions trained from their weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from ftpipe import names as t
from ftpipe.data.versions import Store, split_rows
from ftpipe.files import iter_jsonl
from ftpipe.lineage.record import (
    TRAIN_FILE_ARTIFACT,
    _Run,
    all_versions,
    recorded_lineage,
)
from ftpipe.registry.store import VersionInfo


def versions_with_source(client, root: Path, path: str) -> list[dict]:
    """Every model version whose collected data included this source file: by its recorded
    path, or by the same bytes (sha256) under any path when the file is here."""
    from ftpipe.files import sha256_path

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
        for src, val in t.under(doc, t.SOURCE).items():
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


def started_from(doc: dict) -> str | None:
    """models:/NAME/V of the champion an incremental version trained from (its recorded
    `ftpipe.start_from: champion models:/NAME/V: ...`); None: from scratch."""
    import re

    m = re.match(r"champion (models:/[^/]+/\d+)", doc.get(t.START_FROM, ""))
    return m.group(1) if m else None


def with_descendants(client, hits: list[dict]) -> list[dict]:
    """Add every version trained from the weights of a version that learned it (incremental
    runs record `ftpipe.start_from: champion models:/NAME/V: ...`), transitively: it carries
    what they learned. A hit that did not train on the row itself (`trained` false: held out,
    or left out of an incremental run's training file) passes nothing on; it gets `via` when
    the weights it started from learned the row."""
    versions = all_versions(client)
    parent = {}
    for v in versions:
        src = started_from(recorded_lineage(client, v)[0])
        if src:
            name, _, version = src.removeprefix("models:/").rpartition("/")
            parent[(v.name, v.version)] = (name, version)
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


def trained_rows(client, v: VersionInfo, doc: dict) -> set[str] | str | None:
    """The `_hash` of every row an incremental version trained on (its run's training file,
    checked against the record's sha256); None when it trained on its whole train split; a
    string saying why the file cannot be read."""
    from ftpipe.files import sha256_path

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
        return {r["_hash"] for r in iter_jsonl(path)}
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


def is_feedback_drop(source: str) -> bool:
    """A source file `ftpipe feedback export` wrote (data/incoming/feedback-<stamp>-<format>.jsonl)."""
    name = source.rsplit("/", 1)[-1]
    return name.startswith("feedback-") and name.endswith(".jsonl")


def versions_with_request(client, root: Path, drops: list[str]) -> list[dict]:
    """Every version that learned from served request R: the versions whose data held a
    feedback drop R's feedback was exported into (drops: those files' names, from the serving
    store), then (with_descendants) every version trained from their weights."""
    hits = []
    for name in drops:
        hits += [h for h in versions_with_source(client, root, f"data/incoming/{name}") if h["matched_by"] != "folder"]
    return hits


def requests_of(client, root: Path, ref: str, stored: Callable[[str], list[str]] | None) -> list[dict]:
    """The served requests whose feedback fed version `ref`: each feedback drop among its sources
    with the request ids its rows carry (read from the file when it holds the recorded bytes,
    else from the serving store: stored(drop name)), then the same for the version whose
    weights it started from, and so on (`via`)."""
    from ftpipe.files import sha256_path
    from ftpipe.lineage.record import resolve

    out, v, via = [], resolve(client, ref), None
    seen = set()
    while v is not None and (v.name, v.version) not in seen:
        seen.add((v.name, v.version))
        doc, _, _ = recorded_lineage(client, v)
        for src, val in sorted(t.under(doc, t.SOURCE).items()):
            if not is_feedback_drop(src):
                continue
            digest = val.split()[0].removeprefix("sha256:")
            path = root / src
            if path.is_file() and sha256_path(path) == digest:
                ids, how = sorted({r for row in iter_jsonl(path) for r in row.get("request_ids", [])}), "the drop file"
            elif stored is not None:
                ids, how = stored(src.rsplit("/", 1)[-1]), "the serving store (the file is not here as recorded)"
            else:
                ids, how = [], "nowhere: neither the file as recorded nor a serving store"
            out.append({"model": v.name, "version": v.version, "drop": src, "sha256": digest, "request_ids": ids,
                        "read_from": how, "via": via})
        via = started_from(doc)
        if via is None:
            break
        v = resolve(client, via)
    return out
