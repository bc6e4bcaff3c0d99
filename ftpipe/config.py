"""The one config: `PipelineConfig`, read from params.yaml plus dotted overrides.

    ftpipe run --config params.yaml train.max_steps=200 lora.r=32

Every section is frozen and forbids unknown keys; `load_config` reports every problem at
once (a typo, a wrong type and a bad combination all in one message).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class SourceConfig(_Section):
    path: str
    format: Literal["alpaca"] = "alpaca"
    # Column mapping for alpaca-style rows: {"instruction": "question", "output": "answer"}.
    columns: dict[str, str] = Field(default_factory=dict)


class CleanConfig(_Section):
    max_chars: int = Field(2000, gt=0, description="longest instruction+input+output kept")
    min_output_chars: int = Field(1, ge=1)


class SplitConfig(_Section):
    validation: float = Field(0.1, ge=0, lt=1)
    test: float = Field(0.1, gt=0, lt=1)
    salt: str = "ftpipe-v1"

    @model_validator(mode="after")
    def _fractions(self) -> "SplitConfig":
        if self.validation + self.test >= 1:
            raise ValueError("split.validation + split.test must leave room for train (< 1)")
        return self


class DataConfig(_Section):
    sources: list[SourceConfig] = Field(min_length=1)
    clean: CleanConfig = CleanConfig()
    split: SplitConfig = SplitConfig()


class QualityConfig(_Section):
    min_rows: int = Field(50, ge=1)
    # Share of raw rows that may be unusable (unparseable, missing fields) before the
    # GX gate stops the run; below it those rows are quarantined and the run proceeds.
    max_bad_fraction: float = Field(0.05, ge=0, le=1)
    max_chars: int = Field(4000, gt=0)


class BuildConfig(_Section):
    """How the DVC stage `base_model` builds the tiny default base model."""
    seed: int = 0
    vocab_size: int = Field(512, ge=300)
    hidden_size: int = 192
    layers: int = 4
    heads: int = 4
    intermediate_size: int = 512
    block_size: int = 128
    pretrain_steps: int = Field(120, ge=0)
    pretrain_batch_size: int = 32
    pretrain_lr: float = 3e-3


class ModelConfig(_Section):
    base: str = Field("models/base", description="hub id or local path, loaded with from_pretrained")
    revision: str | None = None
    quantization: Literal["none", "nf4", "int8"] = "none"
    trust_remote_code: bool = False
    build: BuildConfig = BuildConfig()


class LoraConfig(_Section):
    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: str | list[str] = "all-linear"
    use_dora: bool = False
    use_rslora: bool = False


class TrainConfig(_Section):
    method: Literal["full", "lora", "qlora"] = "lora"
    max_steps: int = Field(1200, ge=1)
    batch_size: int = Field(32, ge=1)
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(2e-3, gt=0)
    warmup_steps: int = Field(40, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    max_seq_len: int = Field(256, ge=8)
    seed: int = 0
    neftune_alpha: float | None = Field(None, gt=0)
    completion_only_loss: bool = True
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    log_every: int = Field(20, ge=1)
    # Loss above this (or NaN/inf) stops the run before anything is registered.
    max_loss: float = Field(1e4, gt=0)


class EvalConfig(_Section):
    batch_size: int = Field(64, ge=1)
    max_new_tokens: int = Field(24, ge=1)
    max_examples: int | None = Field(None, ge=1)


class PromotionConfig(_Section):
    primary_metric: Literal["exact_match", "eval_loss", "perplexity"] = "exact_match"
    # The candidate must beat the champion's primary metric by at least this much.
    min_improvement: float = 0.01
    # Absolute floors ("exact_match": 0.5) or ceilings for loss-like metrics.
    thresholds: dict[str, float] = Field(default_factory=dict)
    min_gain_over_base: float = 0.0
    require_data_gate: bool = True


class RegistryConfig(_Section):
    tracking_uri: str | None = None  # None: MLFLOW_TRACKING_URI, else sqlite under mlflow/
    experiment: str = "ftpipe"
    model_name: str = "ftpipe-dates"
    promotion: PromotionConfig = PromotionConfig()


class ScheduleConfig(_Section):
    cron: str = "0 3 * * *"
    timezone: str = "UTC"
    min_new_rows: int = Field(1, ge=0)


class PipelineConfig(_Section):
    data: DataConfig
    quality: QualityConfig = QualityConfig()
    model: ModelConfig = ModelConfig()
    lora: LoraConfig = LoraConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    registry: RegistryConfig = RegistryConfig()
    schedule: ScheduleConfig = ScheduleConfig()

    @model_validator(mode="after")
    def _cross_field(self) -> "PipelineConfig":
        problems = []
        if self.train.method == "qlora" and self.model.quantization == "none":
            problems.append("train.method=qlora needs model.quantization nf4 or int8 "
                            "(it is 'none')")
        if self.train.method == "full" and self.model.quantization != "none":
            problems.append("train.method=full cannot train a quantized model "
                            f"(model.quantization={self.model.quantization}); use qlora")
        if self.train.method == "lora" and self.model.quantization != "none":
            problems.append("train.method=lora with a quantized base is qlora: set "
                            "train.method=qlora")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def hash(self) -> str:
        """Content hash of the whole config: the same settings give the same hash."""
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


class ConfigError(ValueError):
    """An invalid config: the message lists every problem, one per line."""


def _coerce(text: str) -> Any:
    """'2' -> 2, 'true' -> True, '[a, b]' -> list: the YAML reading of a CLI value."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply `a.b.c=value` strings to a nested dict (a copy)."""
    out = json.loads(json.dumps(raw))
    problems = []
    for item in overrides:
        if "=" not in item:
            problems.append(f"override {item!r}: expected key=value, e.g. train.max_steps=200")
            continue
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        node = out
        for part in parts[:-1]:
            if not isinstance(node.setdefault(part, {}), dict):
                problems.append(f"override {key!r}: {part!r} is not a section")
                break
            node = node[part]
        else:
            node[parts[-1]] = _coerce(value)
    if problems:
        raise ConfigError("\n".join(problems))
    return out


def parse_config(raw: dict, origin: str = "config") -> PipelineConfig:
    try:
        return PipelineConfig.model_validate(raw)
    except ValidationError as exc:
        lines = [f"{origin}: {exc.error_count()} problem(s)"]
        for err in exc.errors():
            where = ".".join(str(p) for p in err["loc"]) or "(top level)"
            lines.append(f"  - {where}: {err['msg']}")
        raise ConfigError("\n".join(lines)) from None


def load_config(path: str | Path = "params.yaml", overrides: list[str] | None = None) -> PipelineConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    return parse_config(apply_overrides(raw, overrides or []), origin=str(path))
