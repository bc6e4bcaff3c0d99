"""Exact and near-duplicate detection that streams: one pass, a compact index.

Near duplicates: MinHash signatures of word n-grams (datasketch), banded as datasketch's
MinHashLSH would band them for the configured Jaccard threshold. The band tables are a
single dict of 64-bit band hashes -> row number instead of datasketch's set-per-bucket
storage, so the index costs ~100 bytes per band per kept row (3 bands at the default
threshold: ~0.3 GB per million rows) and the rows themselves never stay in memory.
"""

from __future__ import annotations

import re
from array import array

import numpy as np

from ftpipe.config import NearDupConfig

_WORD = re.compile(r"\w+")
SEED = 1


def lsh_params(cfg: NearDupConfig) -> tuple[int, int]:
    """(bands, rows per band) that datasketch picks for this threshold and num_perm."""
    from datasketch import MinHashLSH

    lsh = MinHashLSH(threshold=cfg.threshold, num_perm=cfg.num_perm)
    return lsh.b, lsh.r


def shingles(text: str, n: int) -> set[bytes] | None:
    words = _WORD.findall(text.casefold())
    if len(words) < n:
        return None
    return {" ".join(words[i: i + n]).encode() for i in range(len(words) - n + 1)}


def signatures(texts: list[str], cfg: NearDupConfig) -> list[np.ndarray | None]:
    """MinHash hash values of each text; None for texts too short to compare fuzzily."""
    from datasketch import MinHash

    sets = []
    for t in texts:
        s = shingles(t, cfg.shingle) if len(_WORD.findall(t)) >= cfg.min_words else None
        sets.append(s)
    todo = [s for s in sets if s]
    hashed = iter(MinHash.bulk(todo, num_perm=cfg.num_perm, seed=SEED)) if todo else iter(())
    return [next(hashed).hashvalues.astype(np.uint64) if s else None for s in sets]


def band_keys(hv: np.ndarray, bands: int, rows: int) -> list[int]:
    import xxhash

    return [xxhash.xxh64_intdigest(hv[b * rows: (b + 1) * rows].tobytes(), seed=b) for b in range(bands)]


class DedupIndex:
    """What has been kept so far: prompt keys (exact) and band hashes (near)."""

    def __init__(self, cfg: NearDupConfig):
        self.cfg = cfg
        self.bands, self.rows = lsh_params(cfg) if cfg.enabled else (0, 0)
        self.exact: dict[int, int] = {}
        self.near: dict[int, int] = {}
        self.files: list[str] = []
        self._file_ids: dict[str, int] = {}
        self.file_of = array("I")
        self.line_of = array("Q")

    def where(self, idx: int) -> str:
        return f"{self.files[self.file_of[idx]]}:{self.line_of[idx]}"

    def check_and_add(self, key: int, hv: np.ndarray | None, source: str, line: int) -> str | None:
        """None if the row is new (and now indexed); else the reason it is a duplicate."""
        if key in self.exact:
            return f"duplicate of {self.where(self.exact[key])}"
        bkeys = band_keys(hv, self.bands, self.rows) if (hv is not None and self.bands) else []
        for bk in bkeys:
            if bk in self.near:
                return (f"near-duplicate of {self.where(self.near[bk])} (MinHash Jaccard >= "
                        f"~{self.cfg.threshold})")
        idx = len(self.line_of)
        fid = self._file_ids.get(source)
        if fid is None:
            fid = self._file_ids[source] = len(self.files)
            self.files.append(source)
        self.file_of.append(fid)
        self.line_of.append(line)
        self.exact[key] = idx
        for bk in bkeys:
            self.near[bk] = idx
        return None
