"""Canonical records: every source row, whatever its file type and column names, becomes
one of three shapes before anything else looks at it.

    alpaca             instruction, input, output
    prompt_completion  prompt, completion
    chat               messages: [{"role": "system"|"user"|"assistant", "content": str}, ...]
    preference         prompt, chosen, rejected                  (a DPO pair)
    chat_preference    messages (the shared conversation, ending with a user turn), chosen, rejected

`_format` says which. A pair's response is its chosen answer (exact match compares with it);
TRL's conversational pairs (prompt: a list of turns, chosen / rejected: one assistant turn
each) become chat_preference rows. The prompt key (what the model is asked) drives deduplication and
the split; the row hash (prompt and answer) is the row's identity in lineage.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

FIELDS = {
    "alpaca": ("instruction", "input", "output"),
    "prompt_completion": ("prompt", "completion"),
    "chat": ("messages",),
    "preference": ("prompt", "chosen", "rejected"),
    "chat_preference": ("messages", "chosen", "rejected"),
}
PREFERENCE = ("preference", "chat_preference")
REQUIRED = {
    "alpaca": ("instruction", "output"),
    "prompt_completion": ("prompt", "completion"),
    "chat": ("messages",),
    "preference": ("prompt", "chosen", "rejected"),
    "chat_preference": ("messages", "chosen", "rejected"),
}
ROLES = {"system": "system", "user": "user", "assistant": "assistant",
         # ShareGPT spellings
         "human": "user", "gpt": "assistant", "bot": "assistant", "model": "assistant"}


class FormatError(ValueError):
    """The columns of a source match none of the formats."""


def detect_format(found: list[str], columns: dict[str, str], declared: str = "auto") -> str:
    """The format whose required columns (after mapping) are all present.

    Raises FormatError naming the columns found and what each format needs."""
    present = set(found)

    def has(fmt: str) -> bool:
        return all(columns.get(f, f) in present for f in REQUIRED[fmt])

    if declared != "auto":
        if has(declared):
            return declared
        missing = [columns.get(f, f) for f in REQUIRED[declared] if columns.get(f, f) not in present]
        raise FormatError(f"format {declared} needs column(s) {missing}; columns found: {sorted(present)}")
    for fmt in ("chat_preference", "preference", "chat", "prompt_completion", "alpaca"):
        if has(fmt):
            return fmt
    raise FormatError(
        f"cannot recognise the format; columns found: {sorted(present)}. Expected alpaca "
        "(instruction, input, output), prompt_completion (prompt, completion), chat "
        "(messages), or preference pairs (prompt or messages, chosen, rejected); map yours in params.yaml, e.g. columns: {instruction: question, output: answer}")


def _text(value: Any, field: str) -> tuple[str | None, str | None]:
    """(value, error): text stays text, null stays null, anything else is a type error."""
    if value is None or isinstance(value, str):
        return value, None
    kind = {bool: "boolean", int: "integer", float: "number", list: "list", dict: "object"}.get(
        type(value), type(value).__name__)
    return None, f"field {field!r} is {kind}, expected text"


def _messages(value: Any) -> tuple[list | None, str | None]:
    if value is None:
        return None, None
    if isinstance(value, str):  # a JSON-encoded list (CSV, SQL text column)
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            return None, f"field 'messages' is text but not JSON ({exc.msg})"
    if hasattr(value, "tolist"):
        value = value.tolist()
    if not isinstance(value, list):
        return None, f"field 'messages' is {type(value).__name__}, expected a list of turns"
    out = []
    for i, turn in enumerate(value):
        if not isinstance(turn, dict):
            return None, f"messages[{i}] is {type(turn).__name__}, expected an object"
        role = turn.get("role", turn.get("from"))
        content = turn.get("content", turn.get("value"))
        if role not in ROLES:
            return None, f"messages[{i}].role {role!r} is not system, user or assistant"
        if not isinstance(content, str):
            return None, f"messages[{i}].content is {type(content).__name__}, expected text"
        out.append({"role": ROLES[role], "content": content})
    return out, None


def _answer(value: Any, field: str) -> tuple[Any, str | None]:
    """A pair's chosen / rejected answer: text, or (TRL's conversational pairs) a list of
    turns whose last is the assistant's answer."""
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return value, None
    if isinstance(value, list) or hasattr(value, "tolist"):
        turns, err = _messages(value)
        if err:
            return value, f"field {field!r}: " + err
        if not turns or turns[-1]["role"] != "assistant":
            return value, f"field {field!r} is a list of turns that does not end with an assistant turn"
        return turns[-1]["content"], None
    return _text(value, field)


def canonical(obj: dict, fmt: str, columns: dict[str, str]) -> dict:
    """The canonical fields of one source object. A value of the wrong type is kept as it
    came (the raw GX suite reports it) and `_error` names every such field."""
    if fmt == "preference" and isinstance(obj.get(columns.get("prompt", "prompt")), list):
        # TRL's conversational pair: the prompt is the conversation so far
        obj = {**obj, columns.get("messages", "messages"): obj[columns.get("prompt", "prompt")]}
        fmt = "chat_preference"
    row: dict[str, Any] = {"_format": fmt}
    errors = []
    for field in FIELDS[fmt]:
        raw = obj.get(columns.get(field, field))
        if field in ("chosen", "rejected"):
            value, err = _answer(raw, columns.get(field, field))
        elif field == "messages":
            value, err = _messages(raw)
        else:
            value, err = _text(raw, columns.get(field, field))
        row[field] = value if err is None else raw
        if err:
            errors.append(err)
    if errors:
        row["_error"] = "; ".join(errors)
    # The evaluation slice: columns.slice names it, else a `slice` or `task` column.
    sl = obj.get(columns["slice"]) if "slice" in columns else obj.get("slice", obj.get("task"))
    if isinstance(sl, (str, int)) and not isinstance(sl, bool) and str(sl).strip():
        row["slice"] = str(sl).strip()[:100]
    return row


def json_type(value: Any) -> str:
    if value is None:
        return "null"
    return {str: "string", bool: "boolean", int: "integer", float: "number", list: "array",
            dict: "object"}.get(type(value), type(value).__name__)


def prompt_field(row: dict) -> Any:
    """The raw value the prompt comes from: instruction, prompt or messages."""
    return row.get({"chat": "messages", "prompt_completion": "prompt", "preference": "prompt",
                    "chat_preference": "messages"}.get(row.get("_format"), "instruction"))


def response_field(row: dict) -> Any:
    fmt = row.get("_format")
    if fmt in PREFERENCE:
        return row.get("chosen")
    if fmt == "chat":
        msgs = row.get("messages")
        if isinstance(msgs, list) and msgs and isinstance(msgs[-1], dict):
            return msgs[-1].get("content")
        return None
    return row.get("completion" if fmt == "prompt_completion" else "output")


def prompt_parts(row: dict) -> list:
    fmt = row.get("_format", "alpaca")
    if fmt == "chat_preference":
        return [[m["role"], m["content"]] for m in row.get("messages") or []]
    if fmt == "preference":
        return [row.get("prompt") or ""]
    if fmt == "chat":
        msgs = row.get("messages") or []
        return [[m["role"], m["content"]] for m in msgs[:-1]]
    if fmt == "prompt_completion":
        return [row.get("prompt") or ""]
    return [row.get("instruction") or "", row.get("input") or ""]


def response_of(row: dict) -> str | None:
    """The text the model must learn to produce (and exact match compares with): a pair's chosen answer."""
    fmt = row.get("_format", "alpaca")
    if fmt in PREFERENCE:
        return row.get("chosen")
    if fmt == "chat":
        msgs = row.get("messages") or []
        return msgs[-1]["content"] if msgs and msgs[-1]["role"] == "assistant" else None
    if fmt == "prompt_completion":
        return row.get("completion")
    return row.get("output")


def texts_of(row: dict) -> list[str]:
    """Every text of the row (for PII checks and normalisation)."""
    if row.get("_format") == "chat":
        return [m["content"] for m in row.get("messages") or []]
    if row.get("_format") == "chat_preference":
        return [m["content"] for m in row.get("messages") or []] + \
            [row[f] for f in ("chosen", "rejected") if isinstance(row.get(f), str)]
    return [row[f] for f in FIELDS[row.get("_format", "alpaca")] if isinstance(row.get(f), str)]


def _folded_hash(value: Any) -> str:
    blob = json.dumps(value, ensure_ascii=False).casefold()
    return hashlib.blake2b(blob.encode(), digest_size=16).hexdigest()


def prompt_key(row: dict) -> str:
    """Hash of what the model is asked, case-folded: two rows asking the same thing are
    duplicates (keeping both would train two answers to one question)."""
    return _folded_hash(prompt_parts(row))


def is_pair(row: dict) -> bool:
    return row.get("_format") in PREFERENCE


def rejected_view(row: dict) -> dict:
    """A pair as the row whose answer is the rejected one (to encode and score it like any row)."""
    return {**row, "chosen": row.get("rejected")}


def dedup_key(row: dict) -> str:
    """A row's identity for deduplication: its prompt_key, or for a pair the prompt and both
    answers (one prompt may have many pairs; the same pair twice is a duplicate)."""
    if is_pair(row):
        return _folded_hash([prompt_parts(row), row.get("chosen"), row.get("rejected")])
    return prompt_key(row)


def row_hash(row: dict) -> str:
    """The content hash of a row: lineage's identity of an example. Alpaca rows hash as
    [instruction, input, output], as they always have."""
    fmt = row.get("_format", "alpaca")
    if fmt == "alpaca":
        parts = [row.get("instruction"), row.get("input") or "", row.get("output")]
    elif fmt in PREFERENCE:
        parts = [fmt, prompt_parts(row), row.get("chosen"), row.get("rejected")]
    else:
        parts = [fmt, prompt_parts(row), response_of(row)]
    blob = json.dumps(parts, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()


def public(row: dict) -> dict:
    """The canonical fields of a row for its format (no bookkeeping)."""
    return {f: row.get(f) for f in FIELDS[row.get("_format", "alpaca")]}
