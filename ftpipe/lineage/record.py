"""Lineage facts recorded on every model version: where the code, config, base model and
data came from. Plain functions over git, dvc.lock and files; no MLflow here."""

from __future__ import annotations

import hashlib
import json
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ftpipe.registry import tags as t


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

    def tags(self) -> dict[str, str]:
        """The lineage as ftpipe.* keys (ftpipe.registry.tags): all go into the immutable record, a few
        also onto the version (ftpipe.registry.tags.version_tags)."""
        tags = {
            t.GIT_COMMIT: self.git_commit,
            t.GIT_DIRTY: str(self.git_dirty).lower(),
            t.CONFIG_HASH: self.config_hash,
            t.BASE_MODEL: self.base_model,
            t.BASE_MODEL_REVISION: self.base_model_revision,
            t.GX_VERDICT: self.gx_verdict,
            t.PREFECT_FLOW_RUN: self.prefect_flow_run,
            t.START_FROM: self.start_from,
        } | ({t.TRAIN_FILE: self.train_file} if self.train_file else {})
        for key, md5 in self.data_hashes.items():
            tags[t.DVC + key] = md5
        for f in self.manifest.get("files", []):
            tags[t.SOURCE + f["path"]] = f"sha256:{f['sha256']} rows:{f['rows']}"
        return tags


def file_pin(path: str | Path) -> str:
    """A JSONL file as a record pins it: 'sha256:HEX rows:N'."""
    from ftpipe.data.sources import sha256_path

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


def base_model_revision(base: str, revision: str | None, root: Path) -> str:
    """The revision asked for, else a content hash of a local checkpoint's weights."""
    if revision:
        return revision
    path = (root / base) if not Path(base).is_absolute() else Path(base)
    if path.is_dir():
        h = hashlib.sha256()
        for f in sorted(path.glob("*.safetensors")):
            h.update(f.name.encode())
            h.update(f.read_bytes())
        return "sha256:" + h.hexdigest()[:16]
    return "unpinned"


def read_manifest(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}
