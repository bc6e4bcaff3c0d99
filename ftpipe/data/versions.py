"""Data versions, owned by DVC: reproduce a stage (skipped when its deps, params and outs
match dvc.lock), push outputs to the remote, read the hashes in dvc.lock, and read objects
back from the cache or the remote (the one reader of DVC's store: listings, files re-hashed
on read, presence, a splits version's row hashes).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ftpipe.data.quality import QualityResult
from ftpipe.files import iter_jsonl, read_json
from ftpipe.lineage.record import AuditError
from ftpipe.names import SPLITS_OUTPUT
from ftpipe.training.models import BaseModelRef


@dataclass(frozen=True)
class StageResult:
    stage: str
    ran: bool                    # False: DVC found it up to date and skipped it
    hashes: dict[str, str]       # "stage:path" -> md5, from dvc.lock


class StageFailed(RuntimeError):
    """A DVC stage's command failed; the message is the stage's own error (file, line, why)."""


def reproduce(root: Path, stage: str) -> StageResult:
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    # Stage commands say `python`: make that the interpreter running ftpipe, whatever the PATH.
    bindir = str(Path(sys.executable).parent)
    if not os.environ.get("PATH", "").startswith(bindir + os.pathsep):
        os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")
    import logging

    from dvc.repo import Repo

    # DVC prints its own progress; don't let it echo a second time through the root logger.
    logging.getLogger("dvc").propagate = False

    import tempfile

    from dvc.exceptions import DvcException

    # The stage command writes its error here (ftpipe.data.stages), so the run can show the
    # real reason, not just "failed to reproduce".
    fd, err_file = tempfile.mkstemp(prefix="ftpipe-stage-", suffix=".err")
    os.close(fd)
    os.environ["FTPIPE_STAGE_ERROR"] = err_file
    try:
        with Repo(str(root)) as repo:
            ran = repo.reproduce(stage)
    except DvcException as exc:
        detail = Path(err_file).read_text().strip()
        raise StageFailed(f"DVC stage '{stage}' failed: {detail or exc}") from None
    finally:
        os.environ.pop("FTPIPE_STAGE_ERROR", None)
        Path(err_file).unlink(missing_ok=True)
    names = {getattr(s, "name", str(s)) for s in ran or []}
    return StageResult(stage, stage in names, dvc_lock_hashes(root, [stage]))


# ------------------------------------------------------------------ the remote, and what the store holds

DATA_STAGES = ("collect", "clean", "split")


def _repo(root: Path):
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    import logging

    from dvc.repo import Repo

    logging.getLogger("dvc").propagate = False
    return Repo(str(root))


def remote_of(root: Path, remote: str | None = None) -> dict[str, str]:
    """{"name", "url"} of the remote data versions go to (the default unless named), its URL
    as DVC resolves it (~ expanded, a relative path made absolute); {} when none."""
    with _repo(root) as repo:
        name = remote or repo.config["core"].get("remote")
        url = (repo.config["remote"].get(name) or {}).get("url") if name else None
    return {"name": name, "url": str(url)} if name and url else {}


@dataclass(frozen=True)
class PushResult:
    remote: str
    pushed: int          # objects transferred (0: the remote had them all)


def push(root: Path, stages: list[str], remote: str | None = None) -> PushResult:
    """Push the outputs of these stages (as dvc.lock records them) to the DVC remote."""
    with _repo(root) as repo:
        name = remote or repo.config["core"].get("remote")
        if not name:
            raise RuntimeError("no DVC remote configured: `dvc remote add -d NAME URL` "
                               "(the repo ships one, 'local', in .dvc/config)")
        n = repo.push(targets=list(stages), remote=name)
    return PushResult(name, int(n or 0))


def workspace_changes(root: Path, stages: tuple[str, ...] = DATA_STAGES) -> dict:
    """What `dvc status` says differs from dvc.lock for these stages ({} when in sync)."""
    with _repo(root) as repo:
        return repo.status(targets=list(stages))


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

    def presence(self, md5: str) -> dict[str, bool | None]:
        """Whether the cache and the remote hold an output (a directory: its listing and every
        file in it), by presence, not re-hashing (`ftpipe data status`); remote None: none set."""
        listing = self.listing(md5) if md5.endswith(".dir") else []
        if listing is None:
            return {"cache": False, "remote": False if self.remote else None}
        oids = [md5] + [e["md5"] for e in listing]
        in_cache = all(Path(self.local.oid_to_path(o)).is_file() for o in oids)
        in_remote = set(self.remote.oids_exist(oids)) == set(oids) if self.remote else None
        return {"cache": in_cache, "remote": in_remote}


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
        rows |= {r["_hash"]: e["relpath"][:-len(".jsonl")] for r in iter_jsonl(data)}
    return rows


@dataclass(frozen=True)
class DataVersion:
    """The data half of a run, as the rest of it needs it: the DVC hash of every stage output,
    the source manifest, both GX verdicts, the splits, the base model, where it was pushed."""
    hashes: dict[str, str]          # "stage:path" -> md5 (dvc.lock)
    manifest: dict                  # every source file: path, size, sha256, rows
    raw: QualityResult
    cleaned: QualityResult
    splits: dict[str, str]          # train / validation / test -> path
    base: BaseModelRef
    pushed: str | None              # the DVC remote it went to (None: data.push is false)
    clean_report: dict = field(default_factory=dict)   # read = kept + quarantined, per source and reason
    split_counts: dict = field(default_factory=dict)

    @property
    def splits_md5(self) -> str:
        return self.hashes.get(SPLITS_OUTPUT, "")

    @property
    def gx_verdict(self) -> str:
        return f"passed (raw_snapshot {self.raw.evaluated} + cleaned {self.cleaned.evaluated} expectations)"

    @property
    def passed(self) -> bool:
        return self.raw.success and self.cleaned.success


def data_version(root: Path, hashes: dict[str, str], raw: QualityResult, cleaned: QualityResult,
                 base: BaseModelRef, pushed: str | None) -> DataVersion:
    """The DataVersion of a project whose stages just ran: manifest, reports and splits read
    from their DVC outputs."""
    from ftpipe.data.stages import CLEANED, COLLECTED, SPLITS

    return DataVersion(hashes, read_json(root / COLLECTED / "manifest.json"), raw, cleaned,
                       {n: str(root / SPLITS / f"{n}.jsonl") for n in ("train", "validation", "test")}, base, pushed,
                       read_json(root / CLEANED / "report.json"), read_json(root / SPLITS / "counts.json"))


def dvc_lock_hashes(root: Path, stages: list[str] | None = None) -> dict[str, str]:
    """md5 of every output of the given stages, as dvc.lock records it."""
    lock = root / "dvc.lock"
    if not lock.is_file():
        return {}
    doc = yaml.safe_load(lock.read_text()) or {}
    out = {}
    for stage, body in (doc.get("stages") or {}).items():
        if stages and stage not in stages:
            continue
        for o in body.get("outs", []):
            out[f"{stage}:{o['path']}"] = o.get("md5", "")
    return out
