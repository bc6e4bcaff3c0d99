"""Exporting a version for other servers: its PEFT adapter folder (what vLLM's LoRA serving and
`PeftModel.from_pretrained` read), or a merged Hugging Face folder (sharded safetensors,
tokenizer, chat template, generation config) that `AutoModelForCausalLM.from_pretrained`
loads without peft.

    ftpipe export models:/ftpipe-dates@champion --to out/adapter
    ftpipe export models:/ftpipe-dates@champion --to out/merged --merged
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

@dataclass(frozen=True)
class Exported:
    path: str
    kind: str            # "adapter" | "merged" | "full"
    files: int
    bytes: int


def _summary(dst: Path, kind: str) -> Exported:
    files = [p for p in dst.rglob("*") if p.is_file()]
    return Exported(str(dst), kind, len(files), sum(p.stat().st_size for p in files))


def _fresh(dst: Path) -> Path:
    if dst.exists() and any(dst.iterdir()):
        raise FileExistsError(f"{dst} exists and is not empty: export into a new folder")
    dst.mkdir(parents=True, exist_ok=True)
    return dst


def export_adapter(adapter_dir: str, base_ref: dict, dst: Path) -> Exported:
    """The adapter as PEFT saved it, its tokenizer, and the base it needs: adapter_config.json
    names the base by its source (hub id or path) and base.json pins its files by sha256."""
    dst = _fresh(Path(dst))
    for f in Path(adapter_dir).iterdir():
        if f.is_file():
            shutil.copy2(f, dst / f.name)
    cfg_path = dst / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = base_ref.get("source") or cfg.get("base_model_name_or_path")
    if base_ref.get("revision") and not str(base_ref["revision"]).startswith(("sha256:", "unpinned")):
        cfg["revision"] = base_ref["revision"]
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True))
    (dst / "base.json").write_text(json.dumps(base_ref, indent=2, sort_keys=True))
    return _summary(dst, "adapter")


def export_merged(model_dir: str, adapter_dir: str | None, dst: Path, max_shard_size: str = "2GB") -> Exported:
    """A full checkpoint: base + adapter merged in fp32, saved in the base's own dtype as
    sharded safetensors with an index, with the tokenizer (and its chat template) and the
    generation config."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dst = _fresh(Path(dst))
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, use_safetensors=True)
    saved_dtype = _checkpoint_dtype(model_dir)
    if adapter_dir:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    model = model.to(saved_dtype)
    model.save_pretrained(dst, max_shard_size=max_shard_size, safe_serialization=True)
    from ftpipe.training.models import tokenizer_dir

    AutoTokenizer.from_pretrained(tokenizer_dir(model_dir, adapter_dir)).save_pretrained(dst)
    return _summary(dst, "merged" if adapter_dir else "full")


def _checkpoint_dtype(model_dir: str):
    """The dtype a checkpoint's config says its weights are in (fp32 when it says nothing)."""
    import torch

    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    name = cfg.get("dtype") or cfg.get("torch_dtype") or "float32"
    return getattr(torch, str(name).removeprefix("torch."), torch.float32)
