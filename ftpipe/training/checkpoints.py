"""Checkpoints of a training run: the trainable weights, optimizer, scheduler, RNG and
step, written atomically with sha256 checksums, verified before use (a corrupt one is named
and skipped); FSDP shards gathered on rank 0.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Callable

from ftpipe.files import sha256_path


def is_fsdp(model) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def trainable_state(model) -> dict:
    """The trainable parameters as full CPU tensors. Under FSDP this is a collective: every
    rank must call it; rank 0 gets the tensors, the others an empty dict."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    if is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
        )

        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {n: full[n].contiguous() for n in names if n in full}
    params = dict(model.named_parameters())
    return {n: params[n].detach().to("cpu").contiguous() for n in names}


def full_state(model) -> dict:
    """The whole state dict gathered from FSDP shards (collective; rank 0 gets it)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
    )

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def optimizer_state(model, opt) -> dict:
    if is_fsdp(model):  # collective, like trainable_state
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_optimizer_state_dict,
        )

        return get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True,
                                                                            cpu_offload=True))
    return opt.state_dict()


def save_checkpoint(ckpt_dir: Path, step: int, model, opt, sched, state: dict, keep: int,
                     main: bool = True) -> None:
    """Write step-N atomically (a temp dir renamed into place), then prune old ones.
    Every rank calls it (FSDP gathers shards); only rank 0 writes."""
    import torch
    from safetensors.torch import save_file

    weights, optimizer = trainable_state(model), optimizer_state(model, opt)  # every rank
    if not main:
        return
    final = ckpt_dir / f"step-{step:07d}"
    tmp = ckpt_dir / f".tmp-step-{step:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(weights, str(tmp / "trainable.safetensors"))
    rng = {"torch": torch.get_rng_state(), "python": random.getstate(),
           "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}
    torch.save({"optimizer": optimizer, "scheduler": sched.state_dict(), "rng": rng},
               tmp / "optimizer.pt")
    (tmp / "state.json").write_text(json.dumps(state))
    # what resuming verifies first: a file cut short or flipped on disk is caught, not loaded
    (tmp / "checksums.json").write_text(json.dumps({f.name: sha256_path(f) for f in sorted(tmp.iterdir())}))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in sorted(ckpt_dir.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)



def verified_checkpoints(ckpt_dir: Path, fingerprint: str, say: Callable[[str], None]) -> list[Path]:
    """This recipe's checkpoints, newest first, each verified against its checksums; a
    corrupt one is named in the log and the next older one is used instead."""
    good = []
    for d in sorted(ckpt_dir.glob("step-*"), reverse=True):
        try:
            state = json.loads((d / "state.json").read_text())
            if state.get("fingerprint") != fingerprint:
                continue
            sums = json.loads((d / "checksums.json").read_text()) if (d / "checksums.json").exists() else {}
            bad = [name for name, digest in sums.items() if sha256_path(d / name) != digest]
            if bad:
                raise ValueError(f"{', '.join(bad)} does not match its checksum")
        except (OSError, ValueError) as exc:   # json errors are ValueErrors
            say(f"checkpoint {d} is corrupt ({exc}): skipped, an older one is used")
            continue
        good.append(d)
    return good


def load_trainable(model, path: Path) -> None:
    import torch
    from safetensors.torch import load_file

    saved = load_file(str(path))
    if is_fsdp(model):  # every rank loads the full tensors and keeps its shard
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
        )

        set_model_state_dict(model, saved, options=StateDictOptions(full_state_dict=True, strict=False))
        return
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in saved.items():
            params[name].copy_(tensor.to(params[name].device, params[name].dtype))
