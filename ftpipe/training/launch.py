"""Run the training recipe on N devices: in-process for one, under torchrun for more.

    python -m ftpipe.training.launch spec.json        # one process of a torchrun job (or alone)

`train.devices: 1` (the default) calls ftpipe.training.recipe.fine_tune in this process (GPU 0
or the CPU). `train.devices: N` or `auto` (every visible GPU) starts
`torchrun --standalone --nproc_per_node N -m ftpipe.training.launch spec.json`: the same recipe,
one process per device (DDP, or FSDP with train.strategy: fsdp). Rank 0 prints its log
lines and `@@metric {json}` lines, which this launcher streams back to the caller.

Multi-node is torchrun's own rendezvous, not ours: run on every node
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d \\
             --rdzv_endpoint HEAD_HOST:29500 -m ftpipe.training.launch spec.json
with the spec (written by `ftpipe run --dry-run`-style tooling or by hand) on shared storage.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable

from ftpipe.config import LoraConfig, ModelConfig, TrainConfig
from ftpipe.training.recipe import TrainResult, fine_tune
from ftpipe.cores import split_among

METRIC = "@@metric "


def die_with_parent() -> None:
    """Linux: have the kernel SIGKILL this process when its parent dies. torchrun starts its
    workers in their own sessions, so a killed launcher would otherwise leave them training
    (and finishing, and deleting checkpoints) behind the back of the run that resumes."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def resolve_devices(devices: int | str) -> int:
    if devices == "auto":
        try:
            import torch

            return max(1, torch.cuda.device_count())
        except ImportError:  # pragma: no cover
            return 1
    return int(devices)


def write_spec(path: Path, model: ModelConfig, lora: LoraConfig, train: TrainConfig,
               train_path: str, val_path: str | None, out_dir: str, val_batch_size: int = 64,
               start_adapter: str | None = None) -> Path:
    path.write_text(json.dumps({"model": model.model_dump(mode="json"), "lora": lora.model_dump(mode="json"),
                                "train": train.model_dump(mode="json"), "train_path": str(train_path),
                                "val_path": str(val_path) if val_path else None, "out_dir": str(out_dir),
                                "val_batch_size": val_batch_size, "start_adapter": start_adapter}, indent=2))
    return path


def finished(out_dir: str | Path) -> TrainResult | None:
    """The result of a training that completed in out_dir (runs/train-KEY is keyed by recipe and
    data, so it is this training): a sweep's winning trial, or a run started again."""
    out_dir = Path(out_dir)
    if not ((out_dir / "train_result.json").is_file() and (out_dir / "model" / "config.json").is_file()):
        return None
    try:
        doc = json.loads((out_dir / "train_result.json").read_text())
    except (OSError, ValueError):
        return None
    adapter = out_dir / "adapter"
    return TrainResult(**doc | {
        "model_dir": str(out_dir / "model"), "adapter_dir": str(adapter) if doc.get("adapter_dir") else None,
        "loss_history": [tuple(h) for h in doc.get("loss_history", [])],
        "val_history": [tuple(h) for h in doc.get("val_history", [])]})


def train(model: ModelConfig, lora: LoraConfig, train_cfg: TrainConfig, train_path: str,
          val_path: str | None, out_dir: str | Path, log: Callable[[str], None] = print,
          on_metrics: Callable[[int, dict], None] | None = None, val_batch_size: int = 64,
          start_adapter: str | None = None) -> TrainResult:
    """One process, or torchrun with one per device. start_adapter: a LoRA adapter that
    training continues (an incremental start from an adapter version) instead of a new one."""
    done = finished(out_dir)
    if done is not None:
        log(f"this recipe already trained on this data: reusing {done.model_dir}")
        return done
    n = resolve_devices(train_cfg.devices)
    if n == 1:
        return fine_tune(model, lora, train_cfg, train_path, val_path, out_dir, log=log, on_metrics=on_metrics,
                         val_batch_size=val_batch_size, start_adapter=start_adapter)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    spec = write_spec(out_dir / "spec.json", model, lora, train_cfg, train_path, val_path, str(out_dir),
                      val_batch_size, start_adapter)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
           "-m", "ftpipe.training.launch", str(spec)]
    log(f"launching {n} processes: {' '.join(cmd[2:])}")
    # each process its share of this one's cores (torchrun's own default is 1 thread each)
    env = os.environ | {"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(split_among(n))}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            preexec_fn=die_with_parent)
    tail: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        line = line.rstrip("\n")
        if line.startswith(METRIC):
            step, metrics = json.loads(line[len(METRIC):])
            if on_metrics:
                on_metrics(step, metrics)
            continue
        tail = (tail + [line])[-40:]
        log(line)
    if proc.wait() != 0:
        from ftpipe.training.recipe import TrainingDiverged

        text = "\n".join(tail)
        if "TrainingDiverged" in text:
            raise TrainingDiverged(next((t.split("TrainingDiverged: ", 1)[1] for t in tail
                                         if "TrainingDiverged: " in t), text))
        raise RuntimeError(f"torchrun exited with {proc.returncode}:\n{text}")
    data = json.loads((out_dir / "train_result.json").read_text())
    return TrainResult(**{k: (tuple(map(tuple, v)) if k in ("loss_history", "val_history") else v)
                          for k, v in data.items()})


def main(argv: list[str]) -> int:
    spec = json.loads(Path(argv[0]).read_text())
    if "LOCAL_RANK" in os.environ:
        die_with_parent()  # a worker of torchrun: never outlive it
    rank0 = os.environ.get("RANK", "0") == "0"

    def log(msg: str) -> None:
        if rank0:
            print(msg, flush=True)

    def on_metrics(step: int, metrics: dict) -> None:
        print(METRIC + json.dumps([step, metrics]), flush=True)

    fine_tune(ModelConfig(**spec["model"]), LoraConfig(**spec["lora"]), TrainConfig(**spec["train"]),
              spec["train_path"], spec["val_path"], spec["out_dir"], log=log, on_metrics=on_metrics,
              progress=False, val_batch_size=spec.get("val_batch_size", 64), start_adapter=spec.get("start_adapter"))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
