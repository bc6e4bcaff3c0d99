"""Exact and near-duplicate detection that streams: one pass, a compact index.

Near duplicates: MinHash signatures of word n-grams with datasketch's permutations and
its "legacy" formula ((a*h + b) mod 2^61-1, 32-bit), computed for a whole chunk of rows
at once with numpy (datasketch's per-row `update_batch` costs ~150 us a row; this ~20),
then banded as datasketch's MinHashLSH bands them for the configured Jaccard threshold.
The band tables are one dict of 64-bit band hashes -> row number instead of datasketch's
set-per-bucket storage, so the index costs ~100 bytes per band per kept row (3 bands at
the default threshold: ~0.3 GB per million rows) and the rows never stay in memory.
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


_PERMS: dict[int, tuple[np.ndarray, np.ndarray]] = {}
_PRIME = np.uint64((1 << 61) - 1)
_MAX32 = np.uint64((1 << 32) - 1)


def _permutations(num_perm: int) -> tuple[np.ndarray, np.ndarray]:
    if num_perm not in _PERMS:
        from datasketch import MinHash

        a, b = MinHash(num_perm=num_perm, seed=SEED, scheme="legacy").permutations
        _PERMS[num_perm] = (a.astype(np.uint64), b.astype(np.uint64))
    return _PERMS[num_perm]


def shingle_hashes(text: str, n: int) -> np.ndarray:
    """32-bit hashes of the word n-grams of a text (case-folded)."""
    import xxhash

    words = _WORD.findall(text.casefold())
    wh = np.fromiter((xxhash.xxh32_intdigest(w.encode()) for w in words), dtype=np.uint64, count=len(words))
    if len(words) < n:
        return wh[:0]
    g = wh[: len(words) - n + 1].copy()
    for k in range(1, n):
        g = g * np.uint64(0x100000001B3) ^ wh[k: len(words) - n + 1 + k]
    return g & _MAX32


def signatures(texts: list[str], cfg: NearDupConfig, batch: int = 256) -> list[np.ndarray | None]:
    """MinHash hash values of each text; None for texts too short to compare fuzzily."""
    a, b = _permutations(cfg.num_perm)
    out: list[np.ndarray | None] = [None] * len(texts)
    todo: list[tuple[int, np.ndarray]] = []
    for i, t in enumerate(texts):
        h = shingle_hashes(t, cfg.shingle)
        if len(h) and len(h) + cfg.shingle - 1 >= cfg.min_words:
            todo.append((i, h))
    with np.errstate(over="ignore"):
        for start in range(0, len(todo), batch):
            part = todo[start: start + batch]
            hv = np.concatenate([h for _, h in part])
            offsets = np.cumsum([0] + [len(h) for _, h in part[:-1]])
            phv = ((hv[:, None] * a[None, :] + b[None, :]) % _PRIME) & _MAX32
            mins = np.minimum.reduceat(phv, offsets, axis=0)
            for (i, _), row in zip(part, mins):
                out[i] = row
    return out


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
