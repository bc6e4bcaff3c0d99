"""Read source files, row by row, whatever their type: JSONL, JSON, CSV, Parquet, a
`datasets.save_to_disk` folder, a drop folder of those, or the export of a SQL query.

Readers stream (a chunk at a time) and never drop a row: a line that cannot be parsed is
yielded as an `Item` with `error` and its raw text, so the clean step can quarantine it
with file and line. A file that cannot be read at all (binary, undecodable CSV, no such
file) raises `SourceError` naming it.
"""

from __future__ import annotations

import codecs
import csv
import glob as globlib
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from ftpipe.config import SourceConfig
from ftpipe.files import sha256_path

EXTENSIONS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv",
              ".parquet": "parquet", ".pq": "parquet"}
SQL_EXPORTS = Path("data/sources/sql")
_BOMS = [(codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"),
         (codecs.BOM_UTF8, "utf-8-sig"), (codecs.BOM_UTF16_LE, "utf-16"),
         (codecs.BOM_UTF16_BE, "utf-16")]
_PARTIAL = re.compile(r"(^[._~])|(\.(part|tmp|crdownload|partial|swp)$)", re.I)


class SourceError(ValueError):
    """A source cannot be read at all; the message names the file and why."""


@dataclass
class Item:
    line: int                 # 1-based line (JSONL, CSV, JSON) or row number (Parquet, saved, SQL)
    obj: dict | None
    error: str | None = None
    raw: str | None = None



def size_of(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _inside(root: Path, path: Path, shown: str) -> Path:
    full = path.resolve()
    if not full.is_relative_to(root.resolve()):
        raise SourceError(f"source {shown!r} resolves to {full}, outside the project {root.resolve()}")
    return full


def file_type(path: Path, declared: str) -> str:
    if declared not in ("auto", "drop"):
        return declared
    if path.is_dir():
        if any((path / n).exists() for n in ("dataset_info.json", "dataset_dict.json", "state.json")):
            return "saved"
        raise SourceError(f"{path}: a folder, but not a datasets.save_to_disk dataset "
                          "(no dataset_info.json / dataset_dict.json)")
    kind = EXTENSIONS.get(path.suffix.lower())
    if kind is None:
        raise SourceError(f"{path}: cannot tell the file type from the extension {path.suffix!r}; "
                          f"use one of {sorted(EXTENSIONS)} or set type: in the source")
    return kind


@dataclass
class Expanded:
    files: list[Path]
    skipped: list[dict]       # {"path", "why"}: drop-folder files not read, and why


def locate(root: Path, src: SourceConfig) -> tuple[Path, list[Path] | None]:
    """(the source's path, a glob's matching files or None): raises SourceError when the path
    is missing, leaves the project, or the glob matches nothing. Reads no file."""
    assert src.path is not None
    full = root / src.path
    if globlib.has_magic(src.path):
        matches = sorted(Path(p) for p in globlib.glob(str(full), recursive=True))
        files = [_inside(root, p, str(p)) for p in matches if p.is_file()]
        if not files:
            raise SourceError(f"source {src.label!r}: the glob {src.path!r} matches no files")
        return full, files
    _inside(root, full, src.path)
    if not full.exists():
        raise SourceError(f"source {src.label!r}: {src.path} not found")
    return full, None


def expand(root: Path, src: SourceConfig) -> Expanded:
    """The files of a source: one file or folder, a glob's matches, a drop folder's files."""
    if src.type == "sql":
        path = root / SQL_EXPORTS / f"{src.name}.jsonl"
        if not path.is_file():
            raise SourceError(f"sql source {src.name!r}: no export at {path.relative_to(root)}; "
                              "`ftpipe run` (or `ftpipe data fetch`) runs the query first")
        return Expanded([path], [])
    full, matches = locate(root, src)
    if matches is not None:
        return Expanded(matches, [])
    is_drop = src.type == "drop" or (src.type == "auto" and full.is_dir()
                                     and file_type_or_none(full) is None)
    if not is_drop:
        return Expanded([full.resolve()], [])
    # A drop folder: every data file in it, in name order. Files still being written
    # (hidden, .part, .tmp) wait for the next run; a byte-identical re-delivery of a file
    # already here is skipped, so a drop is ingested once.
    files, skipped, seen = [], [], {}
    for p in sorted(q for q in full.rglob("*") if q.is_file()):
        rel = str(p.relative_to(root))
        if _PARTIAL.search(p.name) or any(part.startswith(".") for part in p.relative_to(full).parts[:-1]):
            skipped.append({"path": rel, "why": "hidden or still being written"})
            continue
        if p.suffix.lower() not in EXTENSIONS:
            if p.name.lower() not in ("readme.md", ".gitkeep"):
                skipped.append({"path": rel, "why": f"not a data file ({p.suffix or 'no extension'})"})
            continue
        if p.stat().st_size == 0:
            skipped.append({"path": rel, "why": "empty file (0 bytes)"})
            continue
        digest = sha256_path(p)
        if digest in seen:
            skipped.append({"path": rel, "why": f"same bytes as {seen[digest]} (re-delivery)"})
            continue
        seen[digest] = rel
        files.append(_inside(root, p, rel))
    return Expanded(files, skipped)


def file_type_or_none(path: Path) -> str | None:
    try:
        return file_type(path, "auto")
    except SourceError:
        return None


# ---------------------------------------------------------------- text decoding

# C0 control bytes that text files do not hold (tab, newlines, form feed, escape do occur).
_CONTROL_BYTES = bytes(b for b in range(32) if b not in b"\t\n\r\f\v\x1b") + b"\x7f"
SNIFF_BYTES = 1 << 16


def binary_reason(head: bytes) -> str | None:
    """Why these bytes are not text, or None. A NUL says it at once; compressed or
    encrypted data without one still has ~10% control bytes where text has almost none
    (text in any 8-bit code page, Latin-1 included, stays below 1%)."""
    nul = head.find(b"\x00")
    if nul >= 0:
        return f"NUL byte at offset {nul}"
    controls = len(head) - len(head.translate(None, _CONTROL_BYTES))
    if controls >= 8 and controls > 0.03 * len(head):
        return f"{controls:,} control bytes in its first {len(head):,} ({controls / len(head):.0%})"
    return None


def _sniff(path: Path, encoding: str) -> str:
    """The codec to read a text file with: a BOM wins; content that is not text (NUL or
    control bytes) fails the file as binary, whatever its extension."""
    with path.open("rb") as f:
        head = f.read(SNIFF_BYTES)
    for bom, codec in _BOMS:
        if head.startswith(bom):
            return codec
    why = binary_reason(head)
    if why:
        raise SourceError(f"{path}: binary content ({why}), not a text file")
    return "utf-8-sig" if encoding.lower().replace("_", "-") in ("utf-8", "utf8") else encoding


def _decode_hint(path: Path, exc: UnicodeDecodeError, lineno: int, src_encoding: str) -> str:
    byte = exc.object[exc.start: exc.start + 1].hex()
    return (f"not valid {src_encoding} (byte 0x{byte} at column {exc.start + 1} of line {lineno}); "
            f"if {path.name} is Latin-1/cp1252, set encoding: cp1252 on its source")


def _first_decode_error(path: Path, codec: str, src_encoding: str) -> str | None:
    """The hint for the first line `codec` cannot decode. A whole-file decode error only
    knows its byte offset; decoding line by line names the line and column."""
    return next((err for _, _, err in _text_lines(path, codec, src_encoding) if err), None)


def _text_lines(path: Path, codec: str, src_encoding: str) -> Iterator[tuple[int, str | None, str | None]]:
    """(line number, text, error) for each non-blank line."""
    if codec in ("utf-16", "utf-32"):
        # Multi-byte encodings can't be split on b"\n": decode the stream as text.
        try:
            with path.open(encoding=codec, newline="") as f:
                for lineno, line in enumerate(f, start=1):
                    if line.strip():
                        yield lineno, line.rstrip("\r\n"), None
        except UnicodeDecodeError as exc:
            raise SourceError(f"{path}: not valid {codec} despite its byte-order mark ({exc.reason})") from None
        return
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if lineno == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8):]
            if not raw.strip():
                continue
            try:
                yield lineno, raw.decode("utf-8" if codec == "utf-8-sig" else codec).rstrip("\r\n"), None
            except UnicodeDecodeError as exc:
                yield lineno, raw.decode("utf-8", errors="backslashreplace").rstrip("\r\n"), \
                    _decode_hint(path, exc, lineno, src_encoding)


# ---------------------------------------------------------------- readers

def _jsonl(path: Path, encoding: str) -> Iterator[Item]:
    import orjson

    codec = _sniff(path, encoding)
    for lineno, text, err in _text_lines(path, codec, encoding):
        if err:
            yield Item(lineno, None, err, text)
            continue
        try:
            obj = orjson.loads(text)
        except orjson.JSONDecodeError as exc:
            msg = str(exc).split(":", 1)[0]
            yield Item(lineno, None, f"malformed JSON ({msg})", text)
            continue
        if not isinstance(obj, dict):
            yield Item(lineno, None, f"expected a JSON object, got {type(obj).__name__}", text)
            continue
        yield Item(lineno, obj)


def _json(path: Path, encoding: str) -> Iterator[Item]:
    """A JSON array of objects (or {"key": [objects]}). A truncated file yields every
    complete object and the rest as one error item: nothing is lost."""
    codec = _sniff(path, encoding)
    try:
        text = path.read_bytes().decode("utf-8" if codec == "utf-8-sig" else codec)
    except UnicodeDecodeError as exc:
        hint = _first_decode_error(path, codec, encoding) or _decode_hint(path, exc, 1, encoding)
        raise SourceError(f"{path}: {hint}") from None
    text = text.lstrip("\ufeff")
    dec = json.JSONDecoder()
    stripped = text.lstrip()
    start = len(text) - len(stripped)
    counted = [0, 1]  # (position, line) reached so far: positions only move forward

    def line_of(pos: int) -> int:  # counting from the start each time made big files quadratic
        counted[1] += text.count("\n", counted[0], pos)
        counted[0] = pos
        return counted[1]

    if stripped.startswith("{"):
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            yield Item(exc.lineno, None, f"malformed JSON: {exc.msg} (line {exc.lineno} column {exc.colno})", text)
            return
        lists = [v for v in obj.values() if isinstance(v, list)]
        if len(lists) == 1 and all(isinstance(x, dict) for x in lists[0]):
            obj_items = lists[0]
            for i, o in enumerate(obj_items, start=1):
                yield Item(i, o)
        else:
            yield Item(1, obj)
        return
    if not stripped.startswith("["):
        yield Item(1, None, "expected a JSON array of objects", text[:10000])
        return
    pos = start + 1
    n = len(text)
    index = 0
    ws = re.compile(r"[\s,]*")
    while True:
        pos = ws.match(text, pos).end()
        if pos >= n:
            yield Item(line_of(pos), None, "truncated JSON: the array is never closed", "")
            return
        if text[pos] == "]":
            return
        index += 1
        try:
            obj, end = dec.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            yield Item(line_of(pos), None, f"truncated or malformed JSON at element {index}: {exc.msg}",
                       text[pos:])
            return
        if isinstance(obj, dict):
            yield Item(line_of(pos), obj)
        else:
            yield Item(line_of(pos), None, f"element {index} is {type(obj).__name__}, expected an object",
                       text[pos:end])
        pos = end


def _csv(path: Path, encoding: str) -> Iterator[Item]:
    codec = _sniff(path, encoding)
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    try:
        with path.open(encoding=codec, newline="") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if not header or not any(h.strip() for h in header):
                raise SourceError(f"{path}: no header row")
            header = [h.strip() for h in header]
            last = reader.line_num
            for values in reader:
                start, last = last + 1, reader.line_num
                if not values:
                    continue
                if len(values) != len(header):
                    why = f"{len(values)} fields where the header has {len(header)}"
                    if last > start and any("\n" in v for v in values):   # a quote that never closed
                        why = (f"unterminated quote: a quoted field opened on line {start} runs to line "
                               f"{last}, taking the lines in between with it ({why})")
                    yield Item(start, None, why, json.dumps(values, ensure_ascii=False))
                    continue
                yield Item(start, dict(zip(header, values)))
    except UnicodeDecodeError as exc:
        # The reader decodes ahead in blocks, so its line number is not where the byte is.
        hint = _first_decode_error(path, codec, encoding) or (
            f"not valid {encoding} (byte 0x{exc.object[exc.start:exc.start + 1].hex()}); if it is "
            "Latin-1/cp1252, set encoding: cp1252 on its source")
        raise SourceError(f"{path}: {hint}") from None
    except csv.Error as exc:
        raise SourceError(f"{path}: CSV error at line {reader.line_num}: {exc}") from None


def _parquet(path: Path) -> Iterator[Item]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises ArrowInvalid and friends
        raise SourceError(f"{path}: not a readable Parquet file ({exc})") from None
    n = 0
    for batch in pf.iter_batches(batch_size=4096):
        for obj in batch.to_pylist():
            n += 1
            yield Item(n, obj)


def _saved(path: Path, split: str | None) -> Iterator[Item]:
    from datasets import DatasetDict, load_from_disk

    try:
        ds = load_from_disk(str(path))
    except Exception as exc:
        raise SourceError(f"{path}: not a datasets.save_to_disk folder ({exc})") from None
    if isinstance(ds, DatasetDict):
        if split is None or split not in ds:
            raise SourceError(f"{path}: a DatasetDict with splits {sorted(ds)}; set split: on the source")
        ds = ds[split]
    n = 0
    for batch in ds.iter(batch_size=2048):
        keys = list(batch)
        for values in zip(*(batch[k] for k in keys)):
            n += 1
            yield Item(n, dict(zip(keys, values)))


def read_items(path: Path, kind: str, src: SourceConfig) -> Iterator[Item]:
    if path.is_file() and path.stat().st_size == 0:
        raise SourceError(f"{path}: empty file (0 bytes)")
    if kind == "jsonl":
        return _jsonl(path, src.encoding)
    if kind == "json":
        return _json(path, src.encoding)
    if kind == "csv":
        return _csv(path, src.encoding)
    if kind == "parquet":
        return _parquet(path)
    if kind == "saved":
        return _saved(path, src.split)
    raise SourceError(f"{path}: unsupported type {kind!r}")


# ---------------------------------------------------------------- SQL

def _jsonable(value):
    import datetime
    import decimal

    if isinstance(value, (datetime.date, datetime.datetime, datetime.time)):
        return value.isoformat()
    if isinstance(value, decimal.Decimal):
        return str(value)
    if isinstance(value, (bytes, memoryview)):
        return bytes(value).decode("utf-8", errors="replace")
    return value


def redacted(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(os.path.expandvars(url)).render_as_string(hide_password=True)


@dataclass(frozen=True)
class SqlExport:
    name: str
    path: str
    rows: int
    changed: bool


def _sql_error(src: SourceConfig, exc: Exception) -> SourceError:
    """One line naming the source (password hidden). ftpipe.retry.is_transient reads it: a
    refused or timed-out connection is retried, a bad query or password never is."""
    return SourceError(f"sql source {src.name!r} ({redacted(src.url or '')}): {str(exc).strip().splitlines()[0]}")


def check_sql(src: SourceConfig) -> None:
    """Connect and start the query without reading its rows (a server-side cursor where the
    database has one): a wrong URL, password, table or column fails here, in a second."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.exc import SQLAlchemyError

    try:
        engine = create_engine(os.path.expandvars(src.url or ""))
        try:
            with engine.connect() as conn:
                conn.execution_options(stream_results=True, yield_per=1).execute(text(src.query or "")).close()
        finally:
            engine.dispose()
    except SQLAlchemyError as exc:
        raise _sql_error(src, exc) from None


def fetch_sql(root: Path, src: SourceConfig) -> SqlExport:
    """Run a SQL source's query (streamed) into data/sources/sql/<name>.jsonl. The file is
    replaced only when its bytes change, so an unchanged table keeps DVC's collect stage
    skipped."""
    import orjson
    from sqlalchemy import create_engine, text
    from sqlalchemy.exc import SQLAlchemyError

    out = root / SQL_EXPORTS / f"{src.name}.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".jsonl.tmp")
    rows = 0
    try:
        engine = create_engine(os.path.expandvars(src.url or ""))
        with engine.connect() as conn, tmp.open("wb") as f:
            result = conn.execution_options(stream_results=True, yield_per=5000).execute(text(src.query or ""))
            keys = list(result.keys())
            for part in result.partitions(5000):
                for values in part:
                    f.write(orjson.dumps({k: _jsonable(v) for k, v in zip(keys, values)}) + b"\n")
                    rows += 1
        engine.dispose()
    except SQLAlchemyError as exc:
        tmp.unlink(missing_ok=True)
        raise _sql_error(src, exc) from None
    changed = not out.exists() or sha256_path(out) != sha256_path(tmp)
    if changed:
        os.replace(tmp, out)
    else:
        tmp.unlink()
    return SqlExport(src.name or "", str(out.relative_to(root)), rows, changed)


