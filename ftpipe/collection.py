"""Collect: read every configured source into one raw snapshot, with a manifest.

Nothing is dropped here. A line that cannot be parsed still becomes a snapshot row, with
`_error` saying why and `_raw` holding its text, so the GX gate can count bad rows and
the clean step can quarantine them with their source and line. Every row carries
`_source` and `_line` (1-based line number in its file).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from ftpipe.config import SourceConfig

ALPACA_FIELDS = ("instruction", "input", "output")


class SourceError(ValueError):
    """A source cannot be read at all (missing, outside the project)."""


@dataclass(frozen=True)
class SourceManifest:
    path: str
    size: int
    sha256: str
    rows: int          # non-blank lines read
    parse_errors: int


@dataclass(frozen=True)
class CollectResult:
    snapshot: str
    manifest: str
    rows: int
    parse_errors: int
    sources: list[SourceManifest]


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def resolve_source(root: Path, path: str) -> Path:
    """A source path inside the project; `..` or absolute paths that leave it are refused."""
    full = (root / path).resolve()
    if not full.is_relative_to(root.resolve()):
        raise SourceError(f"source {path!r} resolves to {full}, outside the project {root}")
    if not full.is_file():
        raise SourceError(f"source {path!r}: file not found ({full})")
    return full


def read_alpaca_jsonl(path: Path, rel: str, columns: dict[str, str]) -> tuple[list[dict], int]:
    """Rows of one JSONL file; unparseable lines become rows with `_error`."""
    rows: list[dict] = []
    errors = 0
    raw_bytes = path.read_bytes()
    for lineno, raw_line in enumerate(raw_bytes.split(b"\n"), start=1):
        if not raw_line.strip():
            continue
        base = {"_source": rel, "_line": lineno}
        try:
            text = raw_line.decode("utf-8")
        except UnicodeDecodeError as exc:
            errors += 1
            rows.append({**base, "_error": f"not UTF-8 ({exc.reason} at byte {exc.start})",
                         "_raw": raw_line.decode("utf-8", errors="replace")})
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            errors += 1
            rows.append({**base, "_error": f"malformed JSON: {exc.msg} (column {exc.colno})",
                         "_raw": text})
            continue
        if not isinstance(obj, dict):
            errors += 1
            rows.append({**base, "_error": f"expected a JSON object, got {type(obj).__name__}",
                         "_raw": text})
            continue
        row = dict(base)
        for name in ALPACA_FIELDS:
            value = obj.get(columns.get(name, name))
            row[name] = value if value is None or isinstance(value, str) else json.dumps(value)
        rows.append(row)
    return rows, errors


def collect(root: Path, sources: list[SourceConfig], out_dir: Path, log=print) -> CollectResult:
    out_dir.mkdir(parents=True, exist_ok=True)
    snapshot = out_dir / "snapshot.jsonl"
    manifests: list[SourceManifest] = []
    total = errors_total = 0
    with snapshot.open("w", encoding="utf-8") as out:
        for src in sources:
            path = resolve_source(root, src.path)
            rows, errors = read_alpaca_jsonl(path, src.path, src.columns)
            for row in rows:
                if "_error" in row:
                    log(f"{src.path}:{row['_line']}: {row['_error']} (kept for quarantine)")
                out.write(json.dumps(row, ensure_ascii=False) + "\n")
            manifests.append(SourceManifest(path=src.path, size=path.stat().st_size,
                                            sha256=sha256_file(path), rows=len(rows),
                                            parse_errors=errors))
            total += len(rows)
            errors_total += errors
    manifest = out_dir / "manifest.json"
    manifest.write_text(json.dumps({
        "rows": total, "parse_errors": errors_total,
        "sources": [m.__dict__ for m in manifests],
    }, indent=2, sort_keys=True) + "\n")
    return CollectResult(str(snapshot), str(manifest), total, errors_total, manifests)
