"""Clean: normalise text, scrub or drop PII, enforce token limits, deduplicate exactly and
approximately — and quarantine every rejected row with its source, line and reason.
Counts always reconcile, overall and per source:

    rows read = rows kept + rows quarantined

The snapshot streams through in chunks: workers (one per core) do the per-row work
(normalise, PII, render + tokenize, MinHash) and the parent keeps only the dedup index and
writes rows out in input order, so the output is deterministic and memory stays flat.
"""

from __future__ import annotations

import json
import os
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from ftpipe.config import CleanConfig
from ftpipe.data.pii import scrub, scrub_all
from ftpipe.data.records import PREFERENCE, REQUIRED, dedup_key, is_pair, rejected_view, response_of, texts_of
from ftpipe.cores import share

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\u200b\ufeff]")
_TRAILING = re.compile(r"[ \t]+\n")
_BLANKS = re.compile(r"\n{3,}")


@dataclass(frozen=True)
class CleanResult:
    cleaned: str
    quarantine: str
    read: int
    kept: int
    quarantined: int
    reasons: dict[str, int]
    per_source: dict[str, dict[str, int]]
    pii: dict[str, int]


def normalize_text(text: str, form: str = "NFC") -> str:
    """Unicode form, no control characters, LF newlines, no trailing spaces, at most one
    blank line in a row, trimmed ends. Inner spacing (code indentation) is kept."""
    text = unicodedata.normalize(form, text).replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL.sub("", text)
    text = _TRAILING.sub("\n", text)
    return _BLANKS.sub("\n\n", text).strip()


TEXT_FIELDS = ("instruction", "input", "output", "prompt", "completion", "chosen", "rejected")


def _normalize_row(row: dict, form: str) -> None:
    if row.get("_format") in ("chat", "chat_preference") and isinstance(row.get("messages"), list):
        for m in row["messages"]:
            m["content"] = normalize_text(m["content"], form)
    for name in TEXT_FIELDS:
        if isinstance(row.get(name), str):
            row[name] = normalize_text(row[name], form)


def _structure_problem(row: dict, cfg: CleanConfig) -> tuple[str, str] | None:
    """(category, reason) when the row cannot train at all, else None."""
    if row.get("_error"):
        cat = "wrong type" if row["_error"].startswith(("field ", "messages[")) else "unparseable"
        return cat, row["_error"]
    fmt = row.get("_format")
    for name in REQUIRED.get(fmt, ()):
        if row.get(name) is None:
            return "missing field", f"missing field {name!r} (null or absent)"
    if fmt in PREFERENCE:
        if fmt == "chat_preference":
            msgs = row["messages"]
            if not msgs or msgs[-1]["role"] != "user":
                return "bad pair", "the shared conversation of a pair must end with a user turn"
            if any(not m["content"] for m in msgs):
                return "empty", "a turn has empty content"
        elif not row["prompt"]:
            return "empty", "empty prompt"
        for name in ("chosen", "rejected"):
            if len(row[name]) < max(cfg.min_output_chars, 1):
                return "empty", f"empty {name} answer (< data.clean.min_output_chars={max(cfg.min_output_chars, 1)})"
        if " ".join(row["chosen"].split()) == " ".join(row["rejected"].split()):
            return "bad pair", "chosen and rejected answers are the same"
    elif fmt == "chat":
        msgs = row["messages"]
        if not msgs:
            return "empty", "empty conversation"
        if msgs[-1]["role"] != "assistant":
            return "bad chat", "the conversation does not end with an assistant turn"
        if not any(m["role"] == "user" for m in msgs):
            return "bad chat", "the conversation has no user turn"
        if any(not m["content"] for m in msgs):
            return "empty", "a turn has empty content"
    elif fmt == "prompt_completion":
        if not row["prompt"]:
            return "empty", "empty prompt"
    elif not row["instruction"]:
        return "empty", "empty instruction"
    if len(response_of(row) or "") < cfg.min_output_chars:
        return "empty", f"empty output (< data.clean.min_output_chars={cfg.min_output_chars})"
    chars = sum(len(t) for t in texts_of(row))
    if chars > cfg.max_chars:
        return "too long", f"too long: {chars} characters > data.clean.max_chars={cfg.max_chars}"
    return None


def _scrub(row: dict, policy: str) -> list[str]:
    """Scrub PII in place (policy scrub) and return the kinds found."""
    from ftpipe.data.pii import find

    found: list[str] = []
    if policy == "keep":
        return found
    if row.get("_format") in ("chat", "chat_preference"):
        for m in row["messages"]:
            if policy == "scrub":
                m["content"], kinds = scrub(m["content"])
            else:
                kinds = find(m["content"])
            found += kinds
    for name in TEXT_FIELDS:
        if isinstance(row.get(name), str):
            if policy == "scrub":
                row[name], kinds = scrub(row[name])
            else:
                kinds = find(row[name])
            found += kinds
    return found


# ------------------------------------------------------------------ worker side

_TOKENIZER = None
SPECIAL_MARGIN = 8  # BOS/EOS and the like, added by the tokenizer on top of the text


def _init_worker(tokenizer_id: str | None, revision: str | None, trust_remote_code: bool) -> None:
    global _TOKENIZER
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if tokenizer_id is None:
        _TOKENIZER = None
        return
    from transformers import AutoTokenizer

    _TOKENIZER = AutoTokenizer.from_pretrained(tokenizer_id, revision=revision,
                                               trust_remote_code=trust_remote_code)


_LOCATION = ("_source", "_src", "_line")   # where a quarantined row came from: never rewritten


def _rejected(category: str, reason: str, row: dict, policy: str, kinds: list[str]) -> tuple:
    """A quarantine result. Under `scrub` and `drop` every text the row holds (its fields,
    a malformed line's raw text, a wrong-typed value) is scrubbed first: the quarantine is
    logged to MLflow and pushed with the data, and must hold no PII the policy removes. Its
    source, line and reason stay, so the original can be found in the source file."""
    if policy == "keep":
        return ("q", category, reason, row, kinds)
    body, found = scrub_all({k: v for k, v in row.items() if k not in _LOCATION})
    reason, _ = scrub(reason)
    return ("q", category, reason, {**{k: row[k] for k in _LOCATION if k in row}, **body},
            kinds or found)


def _process_chunk(args: tuple[list[bytes], CleanConfig]) -> list[tuple]:
    """Per-row work. Returns, in order, ("q", category, reason, row, pii_kinds) for rows
    rejected here, or ("c", key, signature, row, pii_kinds) for candidates the parent
    deduplicates. pii_kinds: the PII found in the row, whatever became of it."""
    import orjson

    from ftpipe.data.dedup import signatures
    from ftpipe.data.formatting import completion_of, prompt_of

    lines, cfg = args
    out: list = []
    candidates: list[int] = []
    rendered: list[str] = []
    alternates: list[str | None] = []   # a pair's prompt + rejected answer
    for raw in lines:
        row = orjson.loads(raw)
        _normalize_row(row, cfg.normalize) if not row.get("_error") else None
        problem = _structure_problem(row, cfg)
        kinds: list[str] = []
        if problem is None:
            kinds = _scrub(row, cfg.pii)
            if kinds and cfg.pii == "drop":
                problem = ("pii", "personal data or secret: " + ", ".join(sorted(set(kinds))))
        if problem is not None:
            out.append(_rejected(problem[0], problem[1], row, cfg.pii, kinds))
            continue
        try:
            prompt = prompt_of(row, _TOKENIZER)
            text = prompt + completion_of(row, _TOKENIZER)
            # a pair: each answer after the prompt must fit; near-duplicates compare the whole pair
            other = prompt + completion_of(rejected_view(row), _TOKENIZER) if is_pair(row) else None
        except Exception as exc:  # a chat template that rejects this conversation
            out.append(_rejected("bad chat", f"chat template failed: {exc}", row, cfg.pii, kinds))
            continue
        candidates.append(len(out))
        rendered.append(text)
        alternates.append(other)
        out.append(("c", dedup_key(row), None, row, kinds))
    if not candidates:
        return out
    # Token limits. Every token of a byte-level (or byte-fallback) tokenizer covers at
    # least one byte, so a text of B UTF-8 bytes has at most B + a few special tokens:
    # rows whose bytes prove them within max_tokens skip the tokenizer (exactly as safe,
    # ~150 us a row cheaper). `_tokens` is then that bound, flagged by `_tokens_exact`.
    longest = [t if o is None or len(t.encode("utf-8")) >= len(o.encode("utf-8")) else o
               for t, o in zip(rendered, alternates)]
    bounds = [len(t.encode("utf-8")) + SPECIAL_MARGIN for t in longest]
    lengths: list[int] = list(bounds)
    exact = [False] * len(rendered)
    need = [i for i, n in enumerate(bounds) if n > cfg.max_tokens]
    if need:
        texts = [t for i in need for t in (rendered[i], alternates[i] or "")]
        if _TOKENIZER is not None:
            counted = [len(ids) for ids in _TOKENIZER(texts, add_special_tokens=True)["input_ids"]]
        else:  # no tokenizer configured: count whitespace words (tests without a model)
            counted = [len(t.split()) for t in texts]
        for j, i in enumerate(need):
            lengths[i], exact[i] = max(counted[2 * j], counted[2 * j + 1]), True
    near = [t if o is None else t + o for t, o in zip(rendered, alternates)]
    sigs = signatures(near, cfg.near_dup) if cfg.near_dup.enabled else [None] * len(rendered)
    for pos, n_tokens, is_exact, sig in zip(candidates, lengths, exact, sigs):
        _, key, _, row, kinds = out[pos]
        if n_tokens > cfg.max_tokens:
            out[pos] = ("q", "too long", f"too long: {n_tokens} tokens > data.clean.max_tokens="
                        f"{cfg.max_tokens}", row, kinds)   # scrubbed above (or PII-free under drop)
            continue
        row["_tokens"] = n_tokens
        row["_tokens_exact"] = is_exact
        out[pos] = ("c", int(key[:16], 16), sig, row, kinds)
    return out


def _chunks(path: Path, size: int) -> Iterator[list[bytes]]:
    chunk: list[bytes] = []
    with path.open("rb") as f:
        for line in f:
            if line.strip():
                chunk.append(line)
                if len(chunk) >= size:
                    yield chunk
                    chunk = []
    if chunk:
        yield chunk


# ------------------------------------------------------------------ parent side

def clean(snapshot: Path, cfg: CleanConfig, out_dir: Path, tokenizer: str | None = None,
          revision: str | None = None, trust_remote_code: bool = False) -> CleanResult:
    import multiprocessing as mp

    import orjson

    from ftpipe.data.dedup import DedupIndex

    out_dir.mkdir(parents=True, exist_ok=True)
    cleaned_path, quarantine_path = out_dir / "clean.jsonl", out_dir / "quarantine.jsonl"
    index = DedupIndex(cfg.near_dup)
    reasons: Counter[str] = Counter()
    pii: Counter[str] = Counter()
    per_source: dict[str, Counter] = {}
    read = kept = quarantined = 0
    workers = cfg.workers or share()   # 0: this process's share of the cores
    size = snapshot.stat().st_size
    chunks = ((c, cfg) for c in _chunks(snapshot, cfg.chunk_rows))
    pool = None
    if workers > 1 and size > 4 << 20:  # below ~4 MB a pool costs more than it saves
        pool = mp.get_context("fork").Pool(workers, _init_worker, (tokenizer, revision, trust_remote_code))
        results = pool.imap(_process_chunk, chunks, chunksize=1)
    else:
        _init_worker(tokenizer, revision, trust_remote_code)
        results = map(_process_chunk, chunks)
    try:
        with cleaned_path.open("wb") as ok, quarantine_path.open("wb") as bad:
            for chunk in results:
                for res in chunk:
                    row = res[3]
                    src = row.get("_src") or row.get("_source")
                    counts = per_source.setdefault(src, Counter())
                    counts["read"] += 1
                    read += 1
                    pii.update(set(res[4]))   # rows holding each kind, kept (scrubbed) or quarantined
                    if res[0] == "c":
                        reason = index.check_and_add(res[1], res[2], row["_source"], row["_line"])
                        if reason is None:
                            row.pop("_error", None)
                            row.pop("_raw", None)
                            row["_key"] = f"{res[1]:016x}"
                            ok.write(orjson.dumps(row) + b"\n")
                            counts["kept"] += 1
                            kept += 1
                            continue
                        category = "near-duplicate" if reason.startswith("near") else "duplicate"
                    else:
                        category, reason = res[1], res[2]
                    bad.write(orjson.dumps({"source": row["_source"], "src": src, "line": row["_line"],
                                            "category": category, "reason": reason, "row": row}) + b"\n")
                    reasons[category] += 1
                    counts["quarantined"] += 1
                    quarantined += 1
    finally:
        if pool is not None:
            pool.terminate()
    assert read == kept + quarantined  # the invariant every report relies on
    report = {"read": read, "kept": kept, "quarantined": quarantined, "reasons": dict(reasons),
              "per_source": {s: {k: c.get(k, 0) for k in ("read", "kept", "quarantined")}
                             for s, c in per_source.items()},
              "pii": {"policy": cfg.pii, "found": dict(pii)}}
    (out_dir / "report.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    return CleanResult(str(cleaned_path), str(quarantine_path), read, kept, quarantined,
                       dict(reasons), report["per_source"], dict(pii))
