"""A model reference (`model.base`, a champion's folder): a local checkpoint folder or a hub
id, and what it must hold before anything runs — a config, weights ftpipe may load
(safetensors, or pickles only where allowed), a tokenizer. Checked up front so that a
missing or weightless base fails in a second, naming the path and what is missing, instead
of after the data stages."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class ModelRefError(ValueError):
    """A model reference that cannot be loaded; the message names it and what is missing."""


class UnsafeWeights(ModelRefError):
    """A checkpoint whose weights are pickles, refused unless model.allow_pickle_weights."""


def check_weights(path: str | Path, allow_pickle: bool = False) -> None:
    """A local checkpoint must hold safetensors weights unless pickles are allowed: loading a
    pickle (pytorch_model.bin) runs whatever code it carries."""
    p = Path(path)
    if allow_pickle or not p.is_dir() or any(p.glob("*.safetensors")):
        return
    pickles = sorted(f.name for f in p.iterdir() if f.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise UnsafeWeights(f"{p} holds no safetensors weights, only {', '.join(pickles)} (pickle, which runs code "
                            "when loaded). Convert it to safetensors, or set model.allow_pickle_weights: true "
                            "if you trust where it came from.")


def check_checkpoint(folder: Path, allow_pickle: bool = False, field: str = "model.base") -> None:
    """A Hugging Face checkpoint folder: config.json, weights (every shard an index names),
    a tokenizer."""
    if not folder.is_dir():
        raise ModelRefError(f"{field}: {folder} is a file, not a checkpoint folder")
    missing = []
    if not (folder / "config.json").is_file():
        missing.append("config.json")
    check_weights(folder, allow_pickle)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError):
            raise ModelRefError(f"{field}: {index} is not a safetensors index (no weight_map)") from None
        absent = [s for s in shards if not (folder / s).is_file()]
        if absent:
            missing.append(f"weight shard(s) {', '.join(absent)} named in {index.name}")
    elif not any(folder.glob("*.safetensors")) and not (
            allow_pickle and any(f.suffix in PICKLE_SUFFIXES for f in folder.iterdir())):
        missing.append("weights (*.safetensors)")
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        missing.append(f"a tokenizer ({' / '.join(TOKENIZER_FILES)})")
    if missing:
        raise ModelRefError(f"{field}: {folder} is not a usable checkpoint: no {'; no '.join(missing)}")


def check_model(ref: str, root: Path, revision: str | None = None, allow_pickle: bool = False,
                field: str = "model.base") -> str:
    """Where `from_pretrained` will load `ref` from (a local folder, or the hub id itself);
    raises ModelRefError naming what is wrong. A relative path is looked up in the project."""
    local = Path(ref) if Path(ref).is_absolute() else root / ref
    if local.exists():
        check_checkpoint(local, allow_pickle, field)
        return str(local)
    if not _HUB_ID.match(ref):
        raise ModelRefError(f"{field}: {ref}: no such folder ({local} does not exist), and not a hub id")
    try:   # a hub id: fine if the local Hugging Face cache has it, or it can be downloaded
        from huggingface_hub import snapshot_download

        cached = Path(snapshot_download(ref, revision=revision, local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached (or no such repo): the hub decides, if reachable
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
        if offline:
            raise ModelRefError(f"{field}: {ref!r} is not a local folder ({local} does not exist) and not in the "
                                "Hugging Face cache, and HF_HUB_OFFLINE is set: nothing can be downloaded") from None
        return ref
    check_checkpoint(cached, allow_pickle, field)
    return ref
