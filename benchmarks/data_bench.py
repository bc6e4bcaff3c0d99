"""Data benchmark: collect + GX raw suite + clean + GX cleaned suite on N synthetic rows.

    .venv/bin/python benchmarks/data_bench.py --rows 1000000          # the figure in RESULTS.md
    .venv/bin/python benchmarks/data_bench.py --rows 250000 --rows 1000000   # memory vs rows
    .venv/bin/python benchmarks/data_bench.py --json-array 60000             # JSON array reading: linear

Rows are alpaca examples of about 500 characters (instruction ~150, input ~100, output
~250) drawn from a 20,000-word vocabulary, with the mess real data has: 0.5% malformed
lines, 1% exact duplicates, 0.5% near duplicates (one instruction word changed), 0.2% with an email or
card number. The tokenizer is the default base model's (models/base; `dvc repro
base_model` builds it). Wall time is per phase; peak memory is the largest sum of RSS over
this process and its workers, sampled every 0.2 s (so it includes the clean workers).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import string
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def make_rows(path: Path, n: int, seed: int = 0) -> None:
    rnd = random.Random(seed)
    vocab = ["".join(rnd.choices(string.ascii_lowercase, k=rnd.randint(3, 9))) for _ in range(20000)]
    words = lambda k: " ".join(rnd.choices(vocab, k=k))  # noqa: E731
    recent: list[dict] = []
    with path.open("w", encoding="utf-8") as f:
        for i in range(n):
            u = rnd.random()
            if u < 0.005:
                f.write('{"instruction": "' + words(10) + '", "output": \n')  # malformed
                continue
            if u < 0.015 and recent:
                row = rnd.choice(recent)                                      # exact duplicate
            elif u < 0.02 and recent:
                row = dict(rnd.choice(recent))                                # near duplicate
                ins = row["instruction"].split()
                ins[rnd.randrange(2, len(ins))] = rnd.choice(vocab)           # one word changed
                row["instruction"] = " ".join(ins)
            else:
                row = {"instruction": f"Task {i}: " + words(20), "input": words(14), "output": words(38)}
                if u > 0.998:
                    row["output"] += rnd.choice([" contact jane.doe@example.com", " card 4111 1111 1111 1111"])
            recent = (recent + [row])[-1000:]
            f.write(json.dumps(row) + "\n")


class PeakRSS:
    """Largest total RSS of this process and its children, sampled in a thread."""

    def __init__(self, every: float = 0.2):
        self.every, self.peak, self._stop = every, 0, threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        me = psutil.Process()
        while not self._stop.is_set():
            total = 0
            for p in [me] + me.children(recursive=True):
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            time.sleep(self.every)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


def bench(n: int, tokenizer: str, workdir: Path) -> dict:
    from ftpipe.data.cleaning import clean
    from ftpipe.data.collection import collect
    from ftpipe.config import load_config, parse_config
    from ftpipe.data.quality import validate_cleaned, validate_raw

    base = load_config(REPO / "params.yaml")
    raw = base.model_dump(mode="json")
    raw["data"]["sources"] = [{"name": "bench", "path": "data/sources/bench.jsonl", "format": "alpaca"}]
    raw["quality"]["min_rows"] = 100
    # ~500-character rows run ~600 tokens with this tiny 512-token vocabulary
    raw["data"]["clean"]["max_tokens"] = 1024
    cfg = parse_config(raw)
    src = workdir / "data/sources/bench.jsonl"
    src.parent.mkdir(parents=True, exist_ok=True)
    t = time.time()
    make_rows(src, n)
    gen = time.time() - t
    times: dict[str, float] = {}
    with PeakRSS() as mem:
        t0 = t = time.time()
        col = collect(workdir, list(cfg.data.sources), workdir / "data/collected", log=lambda m: None)
        times["collect"] = time.time() - t
        t = time.time()
        rq = validate_raw(Path(col.snapshot), cfg.quality, workdir / "data/reports")
        times["gx_raw"] = time.time() - t
        t = time.time()
        cl = clean(Path(col.snapshot), cfg.data.clean, workdir / "data/cleaned", tokenizer=tokenizer)
        times["clean"] = time.time() - t
        t = time.time()
        cq = validate_cleaned(Path(cl.cleaned), cfg.quality, cfg.data.clean, cfg.data.split,
                              workdir / "data/reports")
        times["gx_cleaned"] = time.time() - t
        total = time.time() - t0
    return {"rows": n, "bytes": src.stat().st_size, "generate_s": round(gen, 1),
            "phases_s": {k: round(v, 1) for k, v in times.items()}, "total_s": round(total, 1),
            "peak_rss_gib": round(mem.peak / 2**30, 2), "read": cl.read, "kept": cl.kept,
            "quarantined": cl.quarantined, "reasons": cl.reasons,
            "gx_raw": rq.success, "gx_cleaned": cq.success, "cpus": os.cpu_count()}


def json_array(n: int, workdir: Path) -> dict:
    """Reading a JSON array source of n and 4n elements (indent=2): each element's line number
    must not cost a scan from the start of the file, so 4x the elements take ~4x the time."""
    from ftpipe.config import SourceConfig
    from ftpipe.data.sources import read_items

    out = {}
    for k in (n, 4 * n):
        path = workdir / f"data/sources/array-{k}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps([{"instruction": f"Convert item {i}.", "input": "", "output": f"answer {i}"}
                                    for i in range(k)], indent=2))
        t = time.perf_counter()
        items = sum(1 for _ in read_items(path, "json", SourceConfig(path=str(path.relative_to(workdir)))))
        out[k] = round(time.perf_counter() - t, 2)
        assert items == k
    return {"json_array_elements_s": out, "ratio_4x": round(out[4 * n] / max(out[n], 1e-9), 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, action="append", help="row count (repeatable)")
    ap.add_argument("--tokenizer", default=str(REPO / "models/base"))
    ap.add_argument("--json-array", type=int, help="time reading a JSON array source of N and 4N elements")
    args = ap.parse_args()
    if args.json_array:
        with tempfile.TemporaryDirectory(prefix="ftpipe-bench-") as tmp:
            print(json.dumps(json_array(args.json_array, Path(tmp))), flush=True)
        return
    for n in args.rows or [1_000_000]:
        with tempfile.TemporaryDirectory(prefix="ftpipe-bench-") as tmp:
            print(json.dumps(bench(n, args.tokenizer, Path(tmp))), flush=True)


if __name__ == "__main__":
    main()
