"""Files as ftpipe reads and pins them: content hashes and JSON Lines, written once here."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterator


def sha256_path(path: str | Path) -> str:
    """sha256 of a file, or of a folder (its files' relative names and bytes, sorted)."""
    path = Path(path)
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        if path.is_dir():
            h.update(str(f.relative_to(path)).encode() + b"\0")
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def folder_bytes(path: str | Path) -> int:
    """The bytes of the files in a folder (all levels), or of one file."""
    path = Path(path)
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def read_json(path: str | Path) -> dict:
    """A JSON file's object; {} when there is no such file."""
    import json

    path = Path(path)
    return json.loads(path.read_text()) if path.is_file() else {}


def iter_jsonl(source: str | Path | bytes) -> Iterator[dict]:
    """The objects of a JSON Lines file (or of its bytes), one at a time; blank lines skipped."""
    import orjson

    if isinstance(source, bytes):
        yield from (orjson.loads(line) for line in source.splitlines() if line.strip())
        return
    with open(source, "rb") as f:
        for line in f:
            if line.strip():
                yield orjson.loads(line)


def read_jsonl(path: str | Path) -> list[dict]:
    return list(iter_jsonl(path))
