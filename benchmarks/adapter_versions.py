"""What a version costs the artifact store at real size: a random-initialised model of a real
shape (default Qwen2.5-0.5B: 24 layers, hidden 896, vocab 151,936, tied embeddings) through
`ftpipe run` on CPU, a few LoRA r16 steps a version, then a full fine-tune.

    .venv/bin/python benchmarks/adapter_versions.py                       # ~15 min on 2 cores
    .venv/bin/python benchmarks/adapter_versions.py --shape qwen2-tiny    # a smoke run in ~2 min

For each version: bytes added to the artifact store (and what the merged model would have
been), the registration time as the flow logs it; then the time to load the champion for
scoring on a machine with an empty base cache (download + verify + assemble) and with the
base cached. Prints one JSON document (the figures go to benchmarks/RESULTS.md).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
BIN = Path(sys.executable).parent


def project(dest: Path, base: Path, steps: int) -> Path:
    for rel in ("ftpipe", "data/sources", "data/corpus", "dvc.yaml", ".dvcignore", ".gitignore"):
        src = REPO / rel
        (shutil.copytree(src, dest / rel, ignore=shutil.ignore_patterns("__pycache__")) if src.is_dir()
         else shutil.copy2(src, dest / rel))
    (dest / "data/incoming").mkdir(parents=True)
    (dest / ".dvc").mkdir()
    shutil.copy2(REPO / ".dvc/.gitignore", dest / ".dvc/.gitignore")
    (dest / ".dvc/config").write_text(f"[core]\n    remote = local\n['remote \"local\"']\n    url = {dest / 'dvc-remote'}\n")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["model"]["base"] = str(base)
    params["data"]["sources"] = [params["data"]["sources"][0]]
    params["train"] |= {"method": "lora", "max_steps": steps, "batch_size": 4, "max_seq_len": 128,
                        "log_every": 1, "checkpoint_every": 0, "warmup_steps": 0}
    params["eval"] |= {"max_examples": 8, "max_new_tokens": 8, "batch_size": 8, "regression_max_examples": 8}
    params["incremental"] = {"start_from": "scratch"}
    params["registry"]["promotion"] |= {"primary_metric": "eval_loss", "min_improvement": -1e9,
                                        "min_gain_over_base": -1e9, "thresholds": {}, "max_forgetting": 1e9}
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "-c", "user.name=b", "-c", "user.email=b@b",
                                                            "commit", "-qm", "bench"]):
        subprocess.run(cmd, cwd=dest, check=True)
    return dest


def store_files(p: Path) -> dict[str, int]:
    art = p / "mlflow" / "artifacts"
    return {str(f.relative_to(art)): f.stat().st_size for f in art.rglob("*") if f.is_file()} if art.is_dir() else {}


def store_bytes(p: Path) -> int:
    return sum(store_files(p).values())


def run(p: Path, *overrides: str) -> dict:
    before_files = store_files(p)
    before = sum(before_files.values())
    t0 = time.perf_counter()
    proc = subprocess.run([str(BIN / "ftpipe"), "run", *overrides, "--project", str(p)], cwd=p,
                          capture_output=True, text=True, env=os.environ | {"COLUMNS": "200"})
    out = proc.stdout + proc.stderr
    if proc.returncode:
        sys.exit(out[-5000:])
    reg = re.search(r"registered \S+ version (\d+) as challenger \((.*?)\) in ([\d.]+) s", out)
    model_dirs = sorted((p / "runs").glob("train-*/model"), key=lambda d: d.stat().st_mtime)
    merged = sum(f.stat().st_size for f in model_dirs[-1].iterdir() if f.is_file())
    return {"overrides": list(overrides), "version": reg.group(1), "registered": reg.group(2),
            "register_s": float(reg.group(3)), "store_bytes_added": store_bytes(p) - before,
            "merged_model_bytes": merged, "share_of_merged": round((store_bytes(p) - before) / merged, 4),
            "run_s": round(time.perf_counter() - t0, 1),
            "largest_added": sorted(((n.split("/artifacts/", 1)[-1], b) for n, b in store_files(p).items()
                                     if n not in before_files), key=lambda x: -x[1])[:6],
            "base_line": next((line.strip() for line in out.splitlines() if "base " in line and "registry" in line), "")}


def load_champion(p: Path, version: str, cache: Path) -> dict:
    """Time to load a version for scoring on a machine: download, base from cache or store, assemble."""
    code = f"""
import json, os, sys, time, tempfile
from pathlib import Path
t0 = time.perf_counter()
from ftpipe.registry import store
from ftpipe.evaluation.generation import load_for_eval
import mlflow
mlflow.set_tracking_uri("sqlite:///{p / 'mlflow/mlflow.db'}")
t1 = time.perf_counter()
local = store.download_model("ftpipe-dates", "{version}", Path(tempfile.mkdtemp()))
t2 = time.perf_counter()
load_for_eval(local.model_dir, adapter=local.adapter_dir)
t3 = time.perf_counter()
print(json.dumps({{"import_s": round(t1 - t0, 2), "download_s": round(t2 - t1, 2), "load_s": round(t3 - t2, 2)}}))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=os.environ | {"FTPIPE_CACHE": str(cache), "PYTHONPATH": str(REPO)})
    if proc.returncode:
        sys.exit(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="qwen2.5-0.5b")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    from ftpipe.training.families import random_model

    work = Path(tempfile.mkdtemp(prefix="ftpipe-bench-versions-"))
    os.environ.setdefault("FTPIPE_CACHE", str(work / "cache"))
    try:
        t0 = time.perf_counter()
        base = random_model("qwen2", work / "base", shape=args.shape, dtype="bfloat16")
        built = time.perf_counter() - t0
        p = project(work / "proj", base, args.steps)
        base_bytes = sum(f.stat().st_size for f in base.iterdir() if f.is_file())
        lora = [run(p), run(p, f"train.max_steps={args.steps + 1}"), run(p, f"train.max_steps={args.steps + 2}")]
        cold = load_champion(p, lora[-1]["version"], work / "cold-cache")
        warm = load_champion(p, lora[-1]["version"], work / "cold-cache")
        full = run(p, "train.method=full", "train.max_steps=1")
        doc = {"shape": args.shape, "base_bytes_bf16": base_bytes, "base_build_s": round(built, 1),
               "lora_r16_versions": lora, "load_for_scoring_empty_cache": cold, "load_for_scoring_cached": warm,
               "full_version": full}
        print(json.dumps(doc, indent=2))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
