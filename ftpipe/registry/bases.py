"""Base models in the registry, stored once: an adapter version (LoRA, QLoRA, DoRA) holds its
adapter and a pinned reference to its base (source, revision, the sha256 of every base file);
the base's files live in the artifact store once per content, so any machine that reaches the
registry loads any version from it alone, and keeps one verified local copy of each base.

    ref = store_base("models/base", "models/base", "sha256:…")   # at registration (reused if stored)
    folder = fetch_base(ref)                                     # wherever a version is loaded
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from ftpipe.files import sha256_path

EXPERIMENT = "ftpipe-bases"          # one MLflow run per stored base, its files under base/
DIGEST_TAG = "ftpipe.base.digest"
REF_FILE = "base.json"               # in an adapter version's artifacts


class BaseStoreError(RuntimeError):
    """A stored base that cannot be had whole: missing from the store, or its bytes changed."""


def base_files(folder: str | Path, remembered: bool = False) -> dict[str, str]:
    """{file name: sha256} of what a base folder holds for from_pretrained: its top-level files
    (config, weights and their index, tokenizer, chat template, generation config).

    remembered: a file whose path, size, modification time and inode are those of its last
    hashing on this machine takes the hash then taken ($FTPIPE_CACHE/bases/hashes.json), so
    registering another version on an unchanged 16 GB base reads none of it again. For
    registration only: checks of what a version pinned (check_files, the audit) always re-read."""
    folder = Path(folder)
    names = [p for p in sorted(folder.iterdir()) if p.is_file() and not p.name.startswith(".")]
    if not remembered:
        return {p.name: sha256_path(p) for p in names}
    memo_file = cache_root() / "hashes.json"
    try:
        memo = json.loads(memo_file.read_text())
    except (OSError, ValueError):
        memo = {}
    out, changed = {}, False
    for p in names:
        st = p.stat()
        key, stamp = str(p.resolve()), [st.st_size, st.st_mtime_ns, st.st_ino]
        known = memo.get(key)
        if known and known[:3] == stamp:
            out[p.name] = known[3]
        else:
            out[p.name] = sha256_path(p)
            memo[key] = stamp + [out[p.name]]
            changed = True
    if changed:   # atomically: processes registering at once each leave a whole file
        memo_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo_file.with_name(f".hashes-{os.getpid()}.json")
        tmp.write_text(json.dumps(memo))
        tmp.replace(memo_file)
    return out


def local_folder(path_or_id: str, revision: str | None = None) -> Path:
    """A base as a folder: a local checkpoint as it is, a hub id from the Hugging Face cache
    (downloaded when it is not there and the hub is reachable)."""
    if Path(path_or_id).is_dir():
        return Path(path_or_id)
    from huggingface_hub import snapshot_download

    rev = revision if revision and not revision.startswith(("sha256:", "unpinned")) else None
    return Path(snapshot_download(path_or_id, revision=rev))


def digest(files: dict[str, str]) -> str:
    """The content address of a base: one hash over its files' names and hashes."""
    import hashlib

    return hashlib.sha256("".join(f"{n}\0{h}\n" for n, h in sorted(files.items())).encode()).hexdigest()


def cache_root() -> Path:
    """Where verified bases are kept on this machine: $FTPIPE_CACHE/bases, else ~/.cache/ftpipe/bases."""
    return Path(os.environ.get("FTPIPE_CACHE") or Path.home() / ".cache" / "ftpipe") / "bases"


def _experiment(client) -> str:
    import mlflow

    exp = client.get_experiment_by_name(EXPERIMENT)
    if exp is not None:
        return exp.experiment_id
    uri = mlflow.get_tracking_uri()
    location = None
    if uri.startswith("sqlite:///"):          # no server: next to the database, as the runs' artifacts
        location = (Path(uri.removeprefix("sqlite:///")).parent / "artifacts").resolve().as_uri()
    try:
        return client.create_experiment(EXPERIMENT, artifact_location=location)
    except Exception:   # noqa: BLE001 - another process created it first
        return client.get_experiment_by_name(EXPERIMENT).experiment_id


def stored_run(client, base_digest: str) -> str | None:
    """The run whose artifacts hold this base, whole (a run that died uploading never counts)."""
    exp = client.get_experiment_by_name(EXPERIMENT)
    if exp is None:
        return None
    found = client.search_runs([exp.experiment_id], f"tags.`{DIGEST_TAG}` = '{base_digest}' and "
                               "attributes.status = 'FINISHED'", order_by=["attributes.start_time ASC"], max_results=1)
    return found[0].info.run_id if found else None


def store_base(folder: str | Path, source: str, revision: str | None,
               log: Callable[[str], None] = lambda msg: None) -> dict:
    """The reference an adapter version pins: the base's files uploaded once per content
    (a base already stored is only hashed here, never uploaded again)."""
    from ftpipe.registry.store import client

    c = client()
    files = base_files(folder, remembered=True)
    d = digest(files)
    run_id = stored_run(c, d)
    if run_id is None:
        run = c.create_run(_experiment(c), run_name=f"base-{d[:12]}",
                           tags={DIGEST_TAG: d, "ftpipe.base.source": str(source)[:500]})
        for name in files:
            c.log_artifact(run.info.run_id, str(Path(folder) / name), "base")
        c.set_terminated(run.info.run_id, "FINISHED")      # whole: from now on it is reused
        run_id = run.info.run_id
        log(f"base {source}: stored in the registry once ({_size(folder, files)}, sha256 {d[:12]}…, run {run_id[:12]})")
    else:
        log(f"base {source}: already in the registry (sha256 {d[:12]}…, run {run_id[:12]}), nothing uploaded")
    return {"source": str(source), "revision": revision, "digest": d, "run_id": run_id, "files": files}


def _size(folder: str | Path, files: dict[str, str]) -> str:
    return f"{sum((Path(folder) / n).stat().st_size for n in files) / 1e6:,.1f} MB in {len(files)} files"


def write_ref(ref: dict, path: Path) -> Path:
    path.write_text(json.dumps(ref, indent=2, sort_keys=True))
    return path


def read_ref(path: str | Path) -> dict:
    ref = json.loads(Path(path).read_text())
    for key in ("digest", "run_id", "files"):
        if key not in ref:
            raise BaseStoreError(f"{path}: a base reference without '{key}'")
    return ref


def check_files(folder: Path, ref: dict) -> list[str]:
    """What differs between a base folder and its reference (empty: byte for byte the same)."""
    problems = []
    for name, want in sorted(ref["files"].items()):
        f = folder / name
        got = sha256_path(f) if f.is_file() else None
        if got is None:
            problems.append(f"{name} missing")
        elif got != want:
            problems.append(f"{name} changed (sha256 {got[:16]}…, pinned {want[:16]}…)")
    return problems


def fetch_base(ref: dict) -> Path:
    """The base as a local folder from_pretrained loads: from this machine's cache, else
    downloaded from the registry's artifact store and verified file by file, then cached."""
    dst = cache_root() / ref["digest"]
    if (dst / ".complete").is_file():
        return dst
    import mlflow

    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{ref['digest'][:12]}-", dir=dst.parent))
    try:
        try:
            got = Path(mlflow.artifacts.download_artifacts(run_id=ref["run_id"], artifact_path="base",
                                                           dst_path=str(tmp)))
        except Exception as exc:   # noqa: BLE001
            raise BaseStoreError(f"the base {ref.get('source')} (sha256 {ref['digest'][:16]}…) is not in the "
                                 f"registry's artifact store (run {ref['run_id']}): {exc}") from exc
        problems = check_files(got, ref)
        if problems:
            raise BaseStoreError(f"the stored base {ref.get('source')} (run {ref['run_id']}) is not what the "
                                 f"version pinned: {'; '.join(problems)}")
        (got / ".complete").write_text(ref["digest"])
        if dst.exists() and not (dst / ".complete").is_file():   # a copy a killed process left half-done
            shutil.rmtree(dst, ignore_errors=True)
        try:
            got.rename(dst)
        except OSError:        # another process cached it first
            pass
        return dst
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def audit_stored(client, name: str, version: str, recorded: str) -> tuple[bool, str, dict]:
    """The base link of an adapter version, for the lineage audit: the reference the version
    stores names the base its record pinned ("sha256:DIGEST run:ID"), and the stored base's
    files re-hash to the reference. Returns (ok, detail, facts)."""
    import mlflow

    from ftpipe.registry.store import logged_model_id

    want = recorded.split()[0].removeprefix("sha256:")
    facts: dict = {"stored_digest": want, "stored_run": recorded.split("run:")[-1]}
    tmp = Path(tempfile.mkdtemp(prefix="ftpipe-audit-base-"))
    try:
        try:
            model_id = logged_model_id(client.get_model_version(name, version))
            local = Path(mlflow.artifacts.download_artifacts(
                artifact_uri=client.get_logged_model(model_id).artifact_location, dst_path=str(tmp / "version"),
                tracking_uri=client.tracking_uri))
            ref = read_ref(next(local.rglob(REF_FILE)))
        except Exception as exc:   # noqa: BLE001 - no reference, or not JSON
            return False, f"base model: the version's {REF_FILE} is missing or unreadable ({exc})", facts
        facts |= {"source": ref.get("source"), "files": len(ref["files"])}
        if ref["digest"] != want or digest(ref["files"]) != want:
            return False, (f"base model: the version's {REF_FILE} (sha256 {ref['digest'][:16]}…) is not the base "
                           f"its record pinned (sha256 {want[:16]}…)"), facts
        try:
            got = Path(client.download_artifacts(ref["run_id"], "base", str(tmp / "base")))
        except Exception as exc:   # noqa: BLE001 - deleted run, lost artifacts
            return False, f"base model {ref.get('source')}: not in the base store (run {ref['run_id']}: {exc})", facts
        problems = check_files(got, ref)
        if problems:
            return False, f"base model {ref.get('source')}: the stored base changed: {'; '.join(problems)}", facts
        return True, (f"base model {ref.get('source')} stored once (sha256 {want[:16]}…, run {ref['run_id'][:12]}): "
                      f"{len(ref['files'])} files re-hash"), facts
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
