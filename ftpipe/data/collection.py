"""Collect: read every configured source into one raw snapshot, with a manifest.

Nothing is dropped here. A row that cannot be parsed or has the wrong types still becomes
a snapshot row, with `_error` saying why and `_raw` holding its text, so the GX gate can
count bad rows and the clean step can quarantine them with their source and line. Every
row carries `_source` (its file), `_src` (the source's name) and `_line` (1-based line
or row number in that file). The snapshot is written as it is read: memory stays flat
whatever the row count.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from ftpipe.config import SourceConfig
from ftpipe.data.records import FormatError, canonical, detect_format
from ftpipe.data.sources import (
    SourceError,
    expand,
    file_type,
    read_items,
    redacted,
    size_of,
)
from ftpipe.files import sha256_path

PEEK = 200  # valid objects looked at to recognise a file's format


@dataclass(frozen=True)
class FileManifest:
    source: str
    path: str
    type: str
    format: str
    size: int
    sha256: str
    rows: int              # rows read (parsed or not)
    parse_errors: int


@dataclass(frozen=True)
class CollectResult:
    snapshot: str
    manifest: str
    rows: int
    parse_errors: int
    files: list[FileManifest]
    skipped: list[dict] = field(default_factory=list)


def _rows_of_file(path: Path, rel: str, src: SourceConfig, kind: str):
    """(format, iterator of snapshot rows) for one file."""
    items = read_items(path, kind, src)
    columns = dict(src.columns)
    head, found = [], {}
    for item in items:
        head.append(item)
        if item.obj is not None:
            for k in item.obj:
                found.setdefault(k, None)
            if sum(1 for h in head if h.obj is not None) >= PEEK:
                break
    if not head:
        raise SourceError(f"{rel}: no rows (the file holds nothing but blank lines)")
    if not found:
        # not one parseable object (say, an undecodable file): there are no columns to check
        # the format against, and every row is quarantined with its own error
        fmt = "unknown" if src.format == "auto" else src.format
    else:
        if "conversations" in found and "messages" not in found and "messages" not in columns:
            columns = {**columns, "messages": "conversations"}  # ShareGPT's column name
        try:
            fmt = detect_format(list(found), columns, src.format)
        except FormatError as exc:
            raise SourceError(f"{rel}: {exc}") from None

    def rows():
        import itertools

        for item in itertools.chain(head, items):
            base = {"_source": rel, "_src": src.label, "_line": item.line}
            if item.obj is None:
                yield {**base, "_format": fmt, "_error": item.error, "_raw": item.raw}
                continue
            row = {**base, **canonical(item.obj, fmt, columns)} if fmt != "unknown" else \
                {**base, "_format": fmt, "_error": "format unknown"}
            if src.slice and "slice" not in row:
                row["slice"] = src.slice
            if "_error" in row:
                row["_raw"] = json.dumps(item.obj, ensure_ascii=False, default=str)
            yield row

    return fmt, rows()


def collect(root: Path, sources: list[SourceConfig], out_dir: Path,
            log: Callable[[str], None] = print) -> CollectResult:
    import orjson

    out_dir.mkdir(parents=True, exist_ok=True)
    snapshot = out_dir / "snapshot.jsonl"
    files: list[FileManifest] = []
    per_source: list[dict] = []
    skipped: list[dict] = []
    total = errors_total = 0
    with snapshot.open("wb") as out:
        for src in sources:
            exp = expand(root, src)
            for s in exp.skipped:
                log(f"{s['path']}: skipped, {s['why']}")
            skipped.extend({**s, "source": src.label} for s in exp.skipped)
            src_rows = src_errors = 0
            for path in exp.files:
                rel = str(path.relative_to(root.resolve()))
                kind = "jsonl" if src.type == "sql" else file_type(path, src.type)
                fmt, rows = _rows_of_file(path, rel, src, kind)
                n = errors = 0
                for row in rows:
                    n += 1
                    if "_error" in row:
                        errors += 1
                        if errors <= 20:
                            log(f"{rel}:{row['_line']}: {row['_error']} (kept for quarantine)")
                    out.write(orjson.dumps(row) + b"\n")
                if errors > 20:
                    log(f"{rel}: {errors} bad rows in all (kept for quarantine)")
                files.append(FileManifest(src.label, rel, kind, fmt, size_of(path), sha256_path(path),
                                          n, errors))
                src_rows += n
                src_errors += errors
            entry = {"name": src.label, "type": src.type, "rows": src_rows, "parse_errors": src_errors,
                     "files": [f.path for f in files if f.source == src.label]}
            if src.type == "sql":
                entry |= {"url": redacted(src.url or ""), "query": src.query}
            per_source.append(entry)
            total += src_rows
            errors_total += src_errors
    manifest = out_dir / "manifest.json"
    manifest.write_text(json.dumps({
        "rows": total, "parse_errors": errors_total, "sources": per_source,
        "files": [asdict(f) for f in files], "skipped": skipped,
    }, indent=2, sort_keys=True) + "\n")
    return CollectResult(str(snapshot), str(manifest), total, errors_total, files, skipped)
