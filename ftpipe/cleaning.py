"""Clean: normalise text, drop what cannot train, deduplicate — and quarantine every
rejected row with its source, line and reason. Counts always reconcile:

    rows read = rows kept + rows quarantined   (overall and per source)
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from ftpipe.config import CleanConfig

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_SPACES = re.compile(r"[ \t]+")


@dataclass(frozen=True)
class CleanResult:
    cleaned: str
    quarantine: str
    read: int
    kept: int
    quarantined: int
    reasons: dict[str, int]
    per_source: dict[str, dict[str, int]]


def normalize_text(text: str) -> str:
    """NFC, no control characters, single spaces, trimmed lines and ends."""
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL.sub("", text)
    lines = [_SPACES.sub(" ", line).strip() for line in text.split("\n")]
    return "\n".join(lines).strip()


def reject_reason(row: dict, cfg: CleanConfig) -> str | None:
    if row.get("_error"):
        return row["_error"]
    for name in ("instruction", "output"):
        if row.get(name) is None:
            return f"missing field {name!r}"
    if not row["instruction"]:
        return "empty instruction"
    if len(row["output"]) < cfg.min_output_chars:
        return "empty output"
    length = len(row["instruction"]) + len(row.get("input") or "") + len(row["output"])
    if length > cfg.max_chars:
        return f"too long: {length} characters > data.clean.max_chars={cfg.max_chars}"
    return None


def clean(snapshot: Path, cfg: CleanConfig, out_dir: Path) -> CleanResult:
    out_dir.mkdir(parents=True, exist_ok=True)
    cleaned_path, quarantine_path = out_dir / "clean.jsonl", out_dir / "quarantine.jsonl"
    seen: dict[tuple[str, str], str] = {}
    reasons: Counter[str] = Counter()
    per_source: dict[str, Counter] = {}
    read = kept = quarantined = 0
    with snapshot.open(encoding="utf-8") as src, cleaned_path.open("w", encoding="utf-8") as ok, \
            quarantine_path.open("w", encoding="utf-8") as bad:
        for line in src:
            if not line.strip():
                continue
            row = json.loads(line)
            read += 1
            counts = per_source.setdefault(row["_source"], Counter())
            counts["read"] += 1
            for name in ("instruction", "input", "output"):
                if isinstance(row.get(name), str):
                    row[name] = normalize_text(row[name])
            reason = reject_reason(row, cfg)
            if reason is None:
                key = (row["instruction"].casefold(), (row.get("input") or "").casefold())
                if key in seen:
                    reason = f"duplicate of {seen[key]}"
                else:
                    seen[key] = f"{row['_source']}:{row['_line']}"
            if reason is not None:
                bad.write(json.dumps({"source": row["_source"], "line": row["_line"],
                                      "reason": reason, "row": row}, ensure_ascii=False) + "\n")
                reasons[reason.split(":")[0].split(" (")[0]] += 1
                counts["quarantined"] += 1
                quarantined += 1
                continue
            ok.write(json.dumps({"instruction": row["instruction"], "input": row.get("input") or "",
                                 "output": row["output"], "_source": row["_source"],
                                 "_line": row["_line"]}, ensure_ascii=False) + "\n")
            counts["kept"] += 1
            kept += 1
    assert read == kept + quarantined  # the invariant every report relies on
    report = {"read": read, "kept": kept, "quarantined": quarantined, "reasons": dict(reasons),
              "per_source": {s: dict(c) for s, c in per_source.items()}}
    (out_dir / "report.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    return CleanResult(str(cleaned_path), str(quarantine_path), read, kept, quarantined,
                       dict(reasons), report["per_source"])
