"""A model reference (`model.base`, a champion's folder): a local checkpoint folder or a hub
id, and what it must hold before anything runs — a config, weights ftpipe may load
(safetensors, or pickles only where allowed), a tokenizer. Checked up front so that a
missing or weightless base fails in a second, naming the path and what is missing, instead
of after the data stages."""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ftpipe.config import ModelConfig

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


def pick_dtype(precision: str):
    """bf16 where the GPU supports it, fp16 on older GPUs, fp32 on CPU — unless set."""
    import torch

    if precision == "fp32":
        return torch.float32
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def load_base(model_cfg: ModelConfig, dtype, for_training: bool = True, device_index: int = 0):
    """The base model and tokenizer through the one `from_pretrained` path (hub id or dir)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    check_weights(model_cfg.base, model_cfg.allow_pickle_weights)

    kwargs = dict(revision=model_cfg.revision, trust_remote_code=model_cfg.trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(model_cfg.base, **kwargs)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    quant = None
    if for_training and model_cfg.quantization == "nf4":
        compute = dtype if model_cfg.compute_dtype == "auto" else pick_dtype(model_cfg.compute_dtype)
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                   bnb_4bit_use_double_quant=model_cfg.double_quant,
                                   bnb_4bit_compute_dtype=compute)
    elif for_training and model_cfg.quantization == "int8":
        quant = BitsAndBytesConfig(load_in_8bit=True)
    device_map = {"": device_index} if torch.cuda.is_available() else None
    extra = {"attn_implementation": model_cfg.attn_implementation} if model_cfg.attn_implementation else {}
    model = AutoModelForCausalLM.from_pretrained(
        model_cfg.base, dtype=dtype, quantization_config=quant, device_map=device_map,
        use_safetensors=None if model_cfg.allow_pickle_weights else True, **kwargs, **extra)
    return model, tokenizer


def base_model_revision(base: str, revision: str | None, root: Path) -> str:
    """The revision asked for, else a content hash of a local checkpoint's weights."""
    if revision:
        return revision
    path = (root / base) if not Path(base).is_absolute() else Path(base)
    if path.is_dir():
        h = hashlib.sha256()
        for f in sorted(path.glob("*.safetensors")):
            h.update(f.name.encode())
            h.update(f.read_bytes())
        return "sha256:" + h.hexdigest()[:16]
    return "unpinned"


@dataclass(frozen=True)
class BaseModelRef:
    """The base model of a run, as lineage records it."""
    path: str           # what from_pretrained gets: a local folder or a hub id
    id: str             # model.base as written in params.yaml
    revision: str       # model.revision, else a content hash of a local checkpoint's weights
    built: bool | None  # the default built (True) or up to date (False); None: not ours to build


def resolve_base(model: ModelConfig, root: Path) -> BaseModelRef:
    """The tiny default built by the DVC stage base_model (skipped when up to date) when
    params.yaml points at it; any other model.base as it is (ftpipe.data.preflight checked it
    before the run started)."""
    from ftpipe.data.stages import BASE_MODEL_DIR
    from ftpipe.data.versions import reproduce

    local = root / model.base
    if local.resolve() == (root / BASE_MODEL_DIR).resolve():
        ran = reproduce(root, "base_model").ran
        return BaseModelRef(str(local), model.base, base_model_revision(model.base, None, root), ran)
    path = str(local) if local.exists() else model.base
    return BaseModelRef(path, model.base, base_model_revision(path, model.revision, root), None)


def tokenizer_dir(model_dir: str, adapter: str | None) -> str:
    """Where a version's tokenizer is: its adapter's own (saved with it at training), else the base's."""
    return adapter if adapter and (Path(adapter) / "tokenizer_config.json").is_file() else model_dir


def merged_copy(base: str, adapter: str, dst: Path) -> str:
    """base + adapter merged and saved as a full checkpoint (once: reused when dst is whole)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dst = Path(dst)
    if (dst / ".complete").is_file():
        return str(dst)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, use_safetensors=True)
    PeftModel.from_pretrained(model, adapter).merge_and_unload().save_pretrained(dst)
    AutoTokenizer.from_pretrained(tokenizer_dir(base, adapter)).save_pretrained(dst)
    (dst / ".complete").write_text("")
    return str(dst)
