"""DVC: reproduce the data stages and read the hashes it recorded in dvc.lock.

DVC owns the data versions; ftpipe only asks it to bring a stage up to date (which skips
the stage when its deps, params and outs match dvc.lock) and reads the result.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from ftpipe.lineage.record import dvc_lock_hashes


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


# ------------------------------------------------------------------ remote and data status

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


def _dir_entries(odb, md5: str) -> list[dict] | None:
    path = Path(odb.oid_to_path(md5))
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def object_status(root: Path, md5: str, remote: str | None = None) -> dict[str, bool | None]:
    """Whether the local cache and the remote hold an output (a dir: its listing and every
    file in it). None for the remote when none is configured."""
    with _repo(root) as repo:
        local = repo.cache.local
        oids = [md5]
        entries = _dir_entries(local, md5) if md5.endswith(".dir") else []
        oids += [e["md5"] for e in entries or []]
        in_cache = entries is not None and all(Path(local.oid_to_path(o)).is_file() for o in oids)
        name = remote or repo.config["core"].get("remote")
        in_remote = None
        if name:
            odb = repo.cloud.get_remote_odb(name)
            if md5.endswith(".dir") and entries is None:
                # the listing is not cached here: read it from the remote
                try:
                    with odb.fs.open(odb.oid_to_path(md5)) as f:
                        entries = json.loads(f.read())
                    oids += [e["md5"] for e in entries]
                except FileNotFoundError:
                    return {"cache": False, "remote": False}
            in_remote = set(odb.oids_exist(oids)) == set(oids)
    return {"cache": bool(in_cache), "remote": in_remote}


def split_row_hashes(root: Path, splits_md5: str) -> set[str] | None:
    """Row hashes (`_hash`) of every example in a data/splits version, read from the DVC
    cache; None when the cache does not hold it."""
    with _repo(root) as repo:
        local = repo.cache.local
        entries = _dir_entries(local, splits_md5)
        if entries is None:
            return None
        hashes: set[str] = set()
        for e in entries:
            if not e["relpath"].endswith(".jsonl"):
                continue
            path = Path(local.oid_to_path(e["md5"]))
            if not path.is_file():
                return None
            with path.open("rb") as f:
                for line in f:
                    if line.strip():
                        hashes.add(json.loads(line)["_hash"])
    return hashes


def workspace_changes(root: Path, stages: tuple[str, ...] = DATA_STAGES) -> dict:
    """What `dvc status` says differs from dvc.lock for these stages ({} when in sync)."""
    with _repo(root) as repo:
        return repo.status(targets=list(stages))
