"""Lineage facts recorded on every model version: where the code, config, base model and
data came from. Plain functions over git, dvc.lock and files; no MLflow here."""

from __future__ import annotations

import hashlib
import json
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import yaml


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

    def tags(self) -> dict[str, str]:
        tags = {
            "ftpipe.git_commit": self.git_commit,
            "ftpipe.git_dirty": str(self.git_dirty).lower(),
            "ftpipe.config_hash": self.config_hash,
            "ftpipe.base_model": self.base_model,
            "ftpipe.base_model_revision": self.base_model_revision,
            "ftpipe.gx_verdict": self.gx_verdict,
            "ftpipe.prefect_flow_run": self.prefect_flow_run,
            "ftpipe.start_from": self.start_from,
        }
        for key, md5 in self.data_hashes.items():
            tags[f"ftpipe.dvc.{key}"] = md5
        for f in self.manifest.get("files", []):
            tags[f"ftpipe.source.{f['path']}"] = f"sha256:{f['sha256']} rows:{f['rows']}"
        return tags


def git_commit(root: Path) -> tuple[str, bool]:
    """(HEAD commit, whether tracked files differ from it); ('unknown', True) outside git."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
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
