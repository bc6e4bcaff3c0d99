"""`ftpipe serve` under load on localhost: N concurrent clients for M seconds against the real
app (uvicorn, the bounded queue and batcher, the SQLite request store), each client posting a
correction on every answer it gets. Reports requests/s, p50/p95 latency, the 503s (a full
queue: documented, with Retry-After, which the clients honour), any other error, and feedback
rows lost (posted and acknowledged, but not in the store).

    .venv/bin/python benchmarks/serve_load.py                      # the default model's shape, 3 scenarios
    .venv/bin/python benchmarks/serve_load.py --model runs/.../merged --seconds 30

Without --model it builds the embedded default base model's shape (1.9M-parameter Llama,
untrained: answers run the full max_new_tokens). The server runs in its own process; prints
one JSON document (figures go to benchmarks/RESULTS.md).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SERVER = """
import sys, uvicorn
from ftpipe.evaluation.generation import generate, load_for_eval
from ftpipe.serving.app import Loaded, create_app
from ftpipe.serving.records import Records
from ftpipe.serving.versions import prompt_text

model_dir, db, port, queue, batch, tokens = sys.argv[1:7]
model, tok = load_for_eval(model_dir)
loaded = Loaded("models:/bench/1", "1", lambda rows, n: generate(model, tok, [prompt_text(r, tok) for r in rows], n),
                lambda row: prompt_text(row, tok))
app = create_app(lambda m: loaded, Records.open(f"sqlite:///{db}"), queue_size=int(queue), max_batch=int(batch),
                 max_new_tokens=int(tokens))
uvicorn.run(app, host="127.0.0.1", port=int(port), log_level="warning")
"""


def default_shape(dest: Path) -> Path:
    import yaml

    from ftpipe.config import BuildConfig
    from ftpipe.training.basemodel import build_base_model

    build = yaml.safe_load((REPO / "params.yaml").read_text())["model"]["build"] | {"pretrain_steps": 0}
    build_base_model(REPO / "data/corpus/corpus.jsonl", dest, BuildConfig(**build), log=lambda m: None)
    return dest


def scenario(model_dir: Path, clients: int, seconds: float, queue: int, batch: int, tokens: int) -> dict:
    import socket

    import sqlalchemy as sa

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    work = Path(tempfile.mkdtemp(prefix="serve-load-"))
    db = work / "requests.db"
    server = subprocess.Popen([sys.executable, "-c", SERVER, str(model_dir), str(db), str(port), str(queue),
                               str(batch), str(tokens)], cwd=REPO, env=os.environ | {"PYTHONPATH": str(REPO)})
    try:
        deadline = time.time() + 120
        while True:
            try:
                c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                c.request("GET", "/health")
                if c.getresponse().status == 200:
                    break
            except OSError:
                pass
            if time.time() > deadline or server.poll() is not None:
                raise RuntimeError("the server did not start")
            time.sleep(0.2)

        lat, busy, other, acked = [], [0], [], [0]
        lock = threading.Lock()
        stop_at = time.perf_counter() + seconds

        def client(i: int) -> None:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
            n = 0
            while time.perf_counter() < stop_at:
                n += 1
                body = json.dumps({"instruction": f"Convert {2000 + i}-{1 + n % 12:02d}-{1 + n % 28:02d} to words."})
                t0 = time.perf_counter()
                conn.request("POST", "/v1/generate", body, {"Content-Type": "application/json"})
                r = conn.getresponse()
                data = r.read()
                if r.status == 503:
                    with lock:
                        busy[0] += 1
                    time.sleep(float(r.getheader("Retry-After", "1")))
                    continue
                if r.status != 200:
                    with lock:
                        other.append((r.status, data[:200]))
                    continue
                took = time.perf_counter() - t0
                rid = json.loads(data)["request_id"]
                conn.request("POST", "/v1/feedback", json.dumps({"request_id": rid, "kind": "correction",
                                                                 "correction": "January 1, 2000"}),
                             {"Content-Type": "application/json"})
                fr = conn.getresponse()
                fr.read()
                with lock:
                    lat.append(took)
                    if fr.status == 200:
                        acked[0] += 1
                    else:
                        other.append((fr.status, b"feedback"))

        started = time.perf_counter()
        threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - started
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        c.request("GET", "/health")
        health = json.loads(c.getresponse().read())
    finally:
        server.terminate()
        server.wait(30)
    engine = sa.create_engine(f"sqlite:///{db}")
    with engine.connect() as con:
        stored = con.exec_driver_sql("SELECT count(*) FROM feedback").scalar_one()
        requests = con.exec_driver_sql("SELECT count(*) FROM requests").scalar_one()
    lat.sort()
    return {"clients": clients, "seconds": round(wall, 1), "queue_size": queue, "max_batch": batch,
            "max_new_tokens": tokens, "answered": len(lat), "requests_per_s": round(len(lat) / wall, 2),
            "p50_ms": round(1000 * statistics.median(lat), 1) if lat else None,
            "p95_ms": round(1000 * lat[int(0.95 * (len(lat) - 1))], 1) if lat else None,
            "busy_503": busy[0], "other_errors": len(other), "error_samples": [str(o) for o in other[:3]],
            "feedback_acked": acked[0], "feedback_stored": stored, "feedback_lost": acked[0] - stored,
            "requests_recorded": requests, "largest_batch": health["largest_batch"], "batches": health["batches"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, help="a model folder (default: the default base model's shape)")
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--out", type=Path, default=REPO / f"benchmarks/results/serve_load_{time.strftime('%Y-%m-%d')}.json")
    args = ap.parse_args()
    model = args.model or default_shape(Path(tempfile.mkdtemp(prefix="serve-model-")) / "base")
    runs = [
        ("8 clients, batching (queue 64, max_batch 16)", 8, 64, 16),
        ("8 clients, no batching (max_batch 1)", 8, 64, 1),
        ("overload: 64 clients, queue 16", 64, 16, 16),
    ]
    out = {"date": time.strftime("%Y-%m-%d"), "model": str(args.model or "default base shape (untrained)"),
           "cpu_count": os.cpu_count(), "scenarios": {}}
    for label, clients, queue, batch in runs:
        out["scenarios"][label] = scenario(model, clients, args.seconds, queue, batch, args.tokens)
        print(label, json.dumps(out["scenarios"][label]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
