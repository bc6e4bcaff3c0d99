"""Split by content hash: an example's split depends only on its prompt text and the salt,
so it keeps its split across retrains, new data never leaks old test prompts into train,
and old test sets stay comparable.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from ftpipe.config import SplitConfig

SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class SplitResult:
    directory: str
    counts: dict[str, int]


def row_hash(row: dict) -> str:
    """The content hash of a row (instruction, input, output): lineage and dedup key."""
    blob = json.dumps([row.get("instruction"), row.get("input") or "", row.get("output")],
                      ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()


def split_of(row: dict, cfg: SplitConfig) -> str:
    key = json.dumps([row.get("instruction", ""), row.get("input") or ""], ensure_ascii=False)
    bucket = int(hashlib.sha256((cfg.salt + key).encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    if bucket < cfg.test:
        return "test"
    if bucket < cfg.test + cfg.validation:
        return "validation"
    return "train"


def split_examples(cleaned: Path, cfg: SplitConfig, out_dir: Path) -> SplitResult:
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {name: (out_dir / f"{name}.jsonl").open("w", encoding="utf-8") for name in SPLITS}
    counts = dict.fromkeys(SPLITS, 0)
    try:
        with cleaned.open(encoding="utf-8") as src:
            for line in src:
                if not line.strip():
                    continue
                row = json.loads(line)
                row["_hash"] = row_hash(row)
                name = split_of(row, cfg)
                files[name].write(json.dumps(row, ensure_ascii=False) + "\n")
                counts[name] += 1
    finally:
        for f in files.values():
            f.close()
    (out_dir / "counts.json").write_text(json.dumps(counts, indent=2) + "\n")
    return SplitResult(str(out_dir), counts)
