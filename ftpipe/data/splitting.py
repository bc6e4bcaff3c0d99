"""Split by content hash: an example's split depends only on its prompt and the salt, so
it keeps its split across retrains, new data never leaks old test prompts into train, and
old test sets stay comparable.

Then the training mix: each source's `weight` and `max_rows` reshape only its train rows
(weight 0.5 keeps a hash-chosen half, 2.0 repeats each row twice, max_rows keeps the
hash-first N). Validation and test are never reweighted, so evaluation stays comparable.
"""

from __future__ import annotations

import hashlib
import heapq
import json
from dataclasses import dataclass
from pathlib import Path

from ftpipe.config import SourceConfig, SplitConfig
from ftpipe.data.records import prompt_parts, row_hash

SPLITS = ("train", "validation", "test")

__all__ = ["SPLITS", "SplitResult", "row_hash", "split_of", "split_examples"]


@dataclass(frozen=True)
class SplitResult:
    directory: str
    counts: dict[str, int]
    mix: dict[str, dict]


def _unit(text: str) -> float:
    return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF


def split_of(row: dict, cfg: SplitConfig) -> str:
    bucket = _unit(cfg.salt + json.dumps(prompt_parts(row), ensure_ascii=False))
    if bucket < cfg.test:
        return "test"
    if bucket < cfg.test + cfg.validation:
        return "validation"
    return "train"


def _copies(row: dict, weight: float, salt: str) -> int:
    """floor(weight) copies, plus one more with probability frac(weight), by hash."""
    whole = int(weight)
    frac = weight - whole
    return whole + (1 if frac and _unit("w" + salt + row["_hash"]) < frac else 0)


def split_examples(cleaned: Path, cfg: SplitConfig, out_dir: Path,
                   sources: list[SourceConfig] | None = None) -> SplitResult:
    out_dir.mkdir(parents=True, exist_ok=True)
    by_name = {s.label: s for s in sources or []}
    capped = {name for name, s in by_name.items() if s.max_rows}
    # Pass 1 (only for capped sources): the hash-first max_rows train rows of each.
    chosen: dict[str, set[str]] = {}
    if capped:
        heaps: dict[str, list] = {n: [] for n in capped}
        with cleaned.open(encoding="utf-8") as src:
            for line in src:
                row = json.loads(line)
                if row.get("_src") in capped and split_of(row, cfg) == "train":
                    h = row_hash(row)
                    heap, cap = heaps[row["_src"]], by_name[row["_src"]].max_rows
                    item = (-_unit("c" + cfg.salt + h), h)
                    if len(heap) < cap:
                        heapq.heappush(heap, item)
                    elif item > heap[0]:
                        heapq.heapreplace(heap, item)
        chosen = {n: {h for _, h in heap} for n, heap in heaps.items()}
    files = {name: (out_dir / f"{name}.jsonl").open("w", encoding="utf-8") for name in SPLITS}
    counts = dict.fromkeys(SPLITS, 0)
    mix: dict[str, dict] = {}
    try:
        with cleaned.open(encoding="utf-8") as src:
            for line in src:
                if not line.strip():
                    continue
                row = json.loads(line)
                row["_hash"] = row_hash(row)
                name = split_of(row, cfg)
                copies = 1
                if name == "train":
                    s = by_name.get(row.get("_src"))
                    m = mix.setdefault(row.get("_src", "?"), {"rows": 0, "train_rows": 0,
                                                             "weight": s.weight if s else 1.0,
                                                             "max_rows": s.max_rows if s else None})
                    m["rows"] += 1
                    if s is not None:
                        copies = 0 if (s.label in chosen and row["_hash"] not in chosen[s.label]) \
                            else _copies(row, s.weight, cfg.salt)
                    m["train_rows"] += copies
                text = json.dumps(row, ensure_ascii=False) + "\n"
                for _ in range(copies):
                    files[name].write(text)
                counts[name] += copies
    finally:
        for f in files.values():
            f.close()
    (out_dir / "counts.json").write_text(json.dumps({"splits": counts, "train_mix": mix},
                                                    indent=2, sort_keys=True) + "\n")
    return SplitResult(str(out_dir), counts, mix)
