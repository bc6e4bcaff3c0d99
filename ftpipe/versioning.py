"""DVC: reproduce the data stages and read the hashes it recorded in dvc.lock.

DVC owns the data versions; ftpipe only asks it to bring a stage up to date (which skips
the stage when its deps, params and outs match dvc.lock) and reads the result.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

from ftpipe.lineage import dvc_lock_hashes


@dataclass(frozen=True)
class StageResult:
    stage: str
    ran: bool                    # False: DVC found it up to date and skipped it
    hashes: dict[str, str]       # "stage:path" -> md5, from dvc.lock


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

    with Repo(str(root)) as repo:
        ran = repo.reproduce(stage)
    names = {getattr(s, "name", str(s)) for s in ran or []}
    return StageResult(stage, stage in names, dvc_lock_hashes(root, [stage]))
