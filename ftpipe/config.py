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
from ftpipe.data.params import (  # noqa: F401 - the data stages' sections, re-exported
    SOURCE_ROOTS,
    BuildConfig,
    CleanConfig,
    DataConfig,
    NearDupConfig,
    SourceConfig,
    SplitConfig,
    no_literal_password,
    Section,
)
from pydantic import (
    Field,
    ValidationError,
    field_validator,
    model_validator,
)


class RawQualityConfig(Section):
    # Share of raw rows that must parse, carry the required text columns and have text types.
    mostly: float = Field(0.95, gt=0, le=1)


class CleanedQualityConfig(Section):
    # Share of cleaned rows that must meet length bounds, have no PII and a non-empty response.
    mostly: float = Field(1.0, gt=0, le=1)
    split_tolerance: float = Field(0.05, ge=0, lt=1, description="observed split share vs data.split")
    # Per-source floor: each source must keep at least this share of its rows through cleaning
    # (rows quarantined as exact or near duplicates are not counted: a drop that repeats old
    # rows is not a quality loss). Pooled `mostly` thresholds hide a whole source lost to, say,
    # an encoding problem; this names it. A source that keeps no rows always fails (> 0).
    min_source_share: float = Field(0.5, gt=0, le=1)


class QualityConfig(Section):
    min_rows: int = Field(50, ge=1)
    raw: RawQualityConfig = RawQualityConfig()
    cleaned: CleanedQualityConfig = CleanedQualityConfig()


class ModelConfig(Section):
    base: str = Field("models/base", description="hub id or local path, loaded with from_pretrained")
    revision: str | None = None
    quantization: Literal["none", "nf4", "int8"] = "none"
    double_quant: bool = True             # nf4: quantize the quantization constants too
    compute_dtype: Literal["auto", "bf16", "fp16", "fp32"] = "auto"  # nf4 matmuls; auto = train.precision
    attn_implementation: str | None = None  # None: transformers' default (sdpa); or flash_attention_2
    trust_remote_code: bool = False       # run the model repo's own Python code: only for repos you trust
    allow_pickle_weights: bool = False    # load .bin/.pt weights (pickle: can run code); safetensors only if false
    build: BuildConfig = BuildConfig()


class LoraConfig(Section):
    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: str | list[str] = "all-linear"
    use_dora: bool = False
    use_rslora: bool = False


class DpoConfig(Section):
    """Direct preference optimisation on preference pairs (train.objective: dpo)."""
    beta: float = Field(0.1, gt=0, description="how far the policy may move from the reference (the start weights)")
    loss: Literal["sigmoid", "ipo"] = "sigmoid"   # sigmoid: the DPO paper's; ipo: squared, on mean token log-probs


class TrainConfig(Section):
    method: Literal["full", "lora", "qlora"] = "lora"
    # sft: learn the answers (a preference pair's chosen one); dpo: prefer each pair's chosen
    # answer over its rejected one, relative to the start weights (train.dpo)
    objective: Literal["sft", "dpo"] = "sft"
    dpo: DpoConfig = DpoConfig()
    max_steps: int = Field(800, ge=1)
    batch_size: int = Field(16, ge=1, description="examples per optimizer step (x grad_accum)")
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(2e-3, gt=0)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="cosine/linear decay ends at lr x this")
    warmup_steps: int = Field(40, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    max_seq_len: int = Field(256, ge=8)
    seed: int = 0
    neftune_alpha: float | None = Field(None, gt=0)
    completion_only_loss: bool = True
    # Packing: a step's examples are laid end to end in rows of max_seq_len tokens with
    # position ids restarting per example, so attention never crosses examples and the
    # loss equals the padded batch's; only the padding work disappears.
    # auto: on for GPU runs (the fast path), off on CPU.
    packing: bool | Literal["auto"] = "auto"
    # Attention for packed rows: "auto" = varlen flash attention (PyTorch's varlen_attn, one
    # row per micro-batch, no padding, no mask) unless model.attn_implementation says
    # otherwise; "rows" = rows of max_seq_len with transformers' own packed-sequence masks.
    packing_attention: Literal["auto", "rows"] = "auto"
    # Cross-entropy from hidden states in chunks of this many labelled tokens (at most 2^28
    # logits a chunk), each chunk's gradient computed in the forward pass: large vocabularies
    # never hold full fp32 logits; prompt positions cost no output projection at all.
    # 0: the model's own logits.
    loss_chunk_tokens: int = Field(4096, ge=0)
    # Liger kernels (RMSNorm, SwiGLU, RoPE) when installed and on
    # a GPU: auto uses them if present; none never does.
    kernels: Literal["auto", "none"] = "auto"
    # torch.compile each decoder layer (one compiled graph reused by every layer; dynamic
    # shapes, so packed micro-batches of any length reuse it). Fewer kernel launches and
    # fused elementwise work on a GPU; costs a compile at the start (~20-45 s). CUDA only.
    # auto: on for a one-GPU run; off on CPU and under torchrun (multi-GPU measured eager).
    compile: bool | Literal["auto"] = "auto"
    gradient_checkpointing: bool = False
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    log_every: int = Field(20, ge=1)
    # Loss above this (or NaN/inf) stops the run before anything is registered.
    max_loss: float = Field(1e4, gt=0)
    # Checkpoints (trainable weights, optimizer, scheduler, RNG, step) every N steps; a
    # killed run started again with the same settings and data resumes from the last one.
    checkpoint_every: int = Field(200, ge=0, description="0: no checkpoints")
    keep_checkpoints: int = Field(2, ge=1)
    resume: bool = True
    # Validation loss every N steps (0: only at the end); with patience, training stops
    # after that many evaluations without improvement; the best checkpoint is exported.
    eval_every: int = Field(0, ge=0)
    early_stopping_patience: int | None = Field(None, ge=1)
    early_stopping_min_delta: float = Field(0.0, ge=0)
    # Devices: 1 trains in-process (GPU 0 or CPU); N or "auto" (all visible GPUs) launches
    # the same recipe under torchrun, one process per device.
    devices: int | Literal["auto"] = 1
    strategy: Literal["ddp", "fsdp"] = "ddp"
    # Stages: one run trains several in order, each from the weights the one before it left
    # (e.g. SFT then DPO). Each stage is a partial train section over this one; [] trains once.
    stages: list[dict[str, Any]] = Field(default_factory=list)

    def stage_configs(self) -> list["TrainConfig"]:
        """Each stage's whole train section (this one with the stage's keys; a stage's dpo
        keys over this dpo section); [] when the run trains in one stage."""
        return [TrainConfig.model_validate(self._stage(stage)) for stage in self.stages]

    def _stage(self, stage: dict) -> dict:
        base = self.model_dump(exclude={"stages"})
        return base | stage | ({"dpo": base["dpo"] | stage["dpo"]} if isinstance(stage.get("dpo"), dict) else {})

    def resolved(self, cuda: bool, world: int = 1) -> "TrainConfig":
        """This config with every `auto` speed setting decided for the device it runs on."""
        update = {}
        if self.packing == "auto":
            update["packing"] = cuda and self.objective == "sft"   # DPO pairs train padded
        if self.compile == "auto":
            update["compile"] = cuda and world == 1
        return self.model_copy(update=update)

    @model_validator(mode="after")
    def _checks(self) -> "TrainConfig":
        problems = []
        if self.early_stopping_patience and not self.eval_every:
            problems.append("train.early_stopping_patience needs train.eval_every > 0")
        if isinstance(self.devices, int) and self.devices < 1:
            problems.append("train.devices must be >= 1 or 'auto'")
        if self.objective == "dpo":
            if self.neftune_alpha:
                problems.append("train.neftune_alpha does not apply to train.objective=dpo (NEFTune noises the "
                                "embeddings of answers being learned; DPO compares fixed answers): set it to null")
            if not self.completion_only_loss:
                problems.append("train.completion_only_loss=false does not apply to train.objective=dpo (DPO "
                                "compares the answers' log-probs; the prompt is shared): set it to true")
            if self.devices != 1:
                problems.append("train.objective=dpo trains on one device for now: set train.devices to 1")
            if self.packing is True:
                problems.append("train.packing=true does not apply to train.objective=dpo (pairs train as padded "
                                "batches): set it to auto or false")
        problems += self._stage_problems()
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def _stage_problems(self) -> list[str]:
        problems = []
        for i, stage in enumerate(self.stages, 1):
            fixed = sorted(set(stage) & STAGE_FIXED)
            if fixed:
                problems.append(f"train.stages[{i}]: {', '.join(fixed)} cannot change between stages (one model "
                                "set-up, one device plan): set it in the train section")
                continue
            try:
                TrainConfig.model_validate(self._stage(stage))
            except ValidationError as exc:
                problems += [f"train.stages[{i}]{''.join('.' + str(k) for k in e['loc'])}: "
                             f"{e['msg'].removeprefix('Value error, ')}" for e in exc.errors()]
        return problems


# train keys a stage cannot set: the chain shares one adapter (or full weights) and one device plan
STAGE_FIXED = {"method", "devices", "strategy", "stages"}


class EvalConfig(Section):
    batch_size: int = Field(64, ge=1)
    max_new_tokens: int = Field(24, ge=1)
    max_examples: int | None = Field(None, ge=1)
    # Every earlier data version's test set is a regression set; each is scored on at most
    # this many examples (the first ones, so every run scores the same rows).
    regression_max_examples: int | None = Field(200, ge=1)
    # Behaviour suites (README "Behaviour, safety and fairness"): the folder of suite files,
    # relative to the project, run on the candidate and the champion; null: none.
    behaviour_dir: str | None = "data/behaviour"
    # Memorisation probes (a privacy suite built each run): at most this many of the rows the
    # candidate trained on that held personal data, each cut before it; 0: none.
    memorisation_probes: int = Field(32, ge=0)


def _known_metrics(metrics: list[str]) -> None:
    import re

    from ftpipe.names import METRICS, SLICE_METRICS

    pattern = re.compile(r"^(?:slice\.[^.]+\.(?:" + "|".join(SLICE_METRICS + ("perplexity",)) + ")|"
                         + "|".join(METRICS) + ")$")
    bad = [m for m in metrics if not pattern.match(m)]
    if bad:
        raise ValueError(f"unknown metric(s) {', '.join(bad)}: use one of {', '.join(METRICS)} "
                         "or slice.<name>.<metric>")


GATE_CHECKS = ("data_gate", "finite_metrics", "non_empty_outputs", "no_pii_in_outputs")


class BehaviourRules(Section):
    """Behaviour suites as promotion rules."""
    # Per tag the least share of its cases the candidate must pass ("all": every case).
    min_pass_rate: dict[str, float] = Field(default_factory=dict)
    # Tags on which the candidate may not fail a case the champion passes.
    must_not_regress: list[str] = Field(default_factory=list)

    @field_validator("min_pass_rate")
    @classmethod
    def _rates(cls, rates: dict[str, float]) -> dict[str, float]:
        bad = [t for t, r in rates.items() if not 0 <= r <= 1]
        if bad:
            raise ValueError(f"a pass rate is a share from 0 to 1 ({', '.join(bad)})")
        return rates


class PromotionConfig(Section):
    """The promotion policy: what a candidate must show to become champion."""
    primary_metric: str = "exact_match"
    # higher | lower | auto (lower for eval_loss, perplexity and pii_outputs, else higher)
    direction: Literal["auto", "higher", "lower"] = "auto"
    # The candidate must beat the champion's primary metric by at least this much.
    min_improvement: float = 0.01
    min_gain_over_base: float = 0.0
    # Absolute floors ("exact_match": 0.5) or ceilings for lower-is-better metrics; any
    # metric the evaluation reports, slices included ("slice.dates.exact_match": 0.9).
    thresholds: dict[str, float] = Field(default_factory=dict)
    # Largest allowed drop of the primary metric on any earlier test set (regression set),
    # candidate vs champion; null: not checked.
    max_forgetting: float | None = Field(0.05, ge=0)
    # The metric forgetting compares on earlier test sets; null: the primary metric. A DPO run
    # gated on reward_accuracy keeps checking the SFT test sets on e.g. eval_loss or exact_match.
    forgetting_metric: str | None = None
    # Preference pairs in the test set: the least share of them on which the candidate's log-prob
    # ratio of chosen over rejected must beat the champion's (win_rate); null: not checked.
    min_win_rate: float | None = Field(None, ge=0, le=1)
    # Checks that must pass: data_gate (GX gates), finite_metrics (no NaN/inf, no diverged
    # run), non_empty_outputs (every generation non-empty: min_non_empty share), and
    # no_pii_in_outputs (no generation holds PII its prompt did not).
    required_checks: list[Literal["data_gate", "finite_metrics", "non_empty_outputs", "no_pii_in_outputs"]] = \
        Field(default_factory=lambda: list(GATE_CHECKS))
    min_non_empty: float = Field(1.0, ge=0, le=1)
    behaviour: BehaviourRules = BehaviourRules()
    # Fairness across slices of the test set, on the primary metric: the largest allowed gap
    # between the candidate's best and worst slice, and the largest allowed drop of its worst
    # slice below the champion's worst slice; null: not checked.
    max_slice_gap: float | None = Field(None, ge=0)
    max_worst_slice_drop: float | None = Field(None, ge=0)
    # A stale promotion lock (a crashed flow) is broken after this many seconds.
    lock_timeout_s: int = Field(600, ge=1)

    @field_validator("primary_metric", "forgetting_metric")
    @classmethod
    def _known_metric(cls, metric: str | None) -> str | None:
        if metric is not None:
            _known_metrics([metric])
        return metric

    @property
    def forgetting_on(self) -> str:
        return self.forgetting_metric or self.primary_metric

    @field_validator("thresholds")
    @classmethod
    def _known_threshold_metrics(cls, thresholds: dict[str, float]) -> dict[str, float]:
        _known_metrics(list(thresholds))
        return thresholds

    def higher_is_better(self, metric: str | None = None) -> bool:
        from ftpipe.names import lower_is_better

        metric = metric or self.primary_metric
        if metric == self.primary_metric and self.direction != "auto":
            return self.direction == "higher"
        return not lower_is_better(metric)


class RegistryConfig(Section):
    tracking_uri: str | None = None  # None: MLFLOW_TRACKING_URI, else sqlite under mlflow/; ${VARS} expanded
    experiment: str = "ftpipe"
    model_name: str = "ftpipe-dates"
    promotion: PromotionConfig = PromotionConfig()
    # Tasks that talk to MLflow / DVC remotes are retried on transient failures (a server
    # restarting, a dropped connection) after 5, 10, 20 s; never on deterministic ones.
    io_retries: int = Field(3, ge=0, le=10)
    io_retry_delay_s: float = Field(5.0, ge=0)

    @field_validator("tracking_uri")
    @classmethod
    def no_literal_password(cls, uri: str | None) -> str | None:
        return no_literal_password(uri, "write it as ${MLFLOW_DB_PASSWORD} (any variable name) and set that "
                                         "variable, or leave tracking_uri null and export MLFLOW_TRACKING_URI")
    # Written into every version's model card.
    intended_use: str = ("Research and internal evaluation of fine-tuned instruction following on the "
                         "training data's task. Not evaluated for safety, bias or out-of-domain use.")


class ScheduleConfig(Section):
    cron: str = "0 3 * * *"
    timezone: str = "UTC"
    # A scheduled or --if-new-data run with fewer new rows (by content hash, since the
    # champion's data version) ends as "skipped" before training.
    min_new_rows: int = Field(1, ge=0)

    @field_validator("cron")
    @classmethod
    def _cron(cls, cron: str) -> str:
        if len(cron.split()) != 5:
            raise ValueError(f"{cron!r} is not a 5-field cron expression")
        return cron

    @field_validator("timezone")
    @classmethod
    def _timezone(cls, timezone: str) -> str:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(timezone)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {timezone!r} (e.g. UTC, Europe/Paris)") from None
        return timezone


class IncrementalConfig(Section):
    # champion: with a champion and new rows, train from the champion's weights on the new
    # training rows plus a replay sample of earlier ones; scratch: from model.base on all rows.
    start_from: Literal["champion", "scratch"] = "champion"
    # Share of an incremental training set drawn from rows the champion already saw.
    replay_ratio: float = Field(0.5, ge=0, lt=1)
    # Steps of an incremental run; null: train.max_steps scaled to the incremental set's size
    # (the same number of epochs a full run makes).
    max_steps: int | None = Field(None, ge=1)


class ParamRange(Section):
    """A sampled range of one sweep parameter: ints when low and high are ints."""
    low: int | float
    high: int | float
    log: bool = False                     # sample on a log scale (learning rates)
    step: int | float | None = None       # a grid within the range (not with log)

    @model_validator(mode="after")
    def _order(self) -> "ParamRange":
        if not self.low < self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError("log: true needs low > 0")
        if self.log and self.step is not None:
            raise ValueError("a log range takes no step")
        return self

    @property
    def is_int(self) -> bool:
        return all(isinstance(v, int) for v in (self.low, self.high, self.step if self.step is not None else 1))


class PrunerConfig(Section):
    # A trial is stopped at an evaluation point when its validation loss there is worse than
    # the median of earlier trials at the same step (Optuna's MedianPruner).
    enabled: bool = True
    startup_trials: int = Field(2, ge=0)  # trials that finish before any trial is pruned
    warmup_steps: int = Field(0, ge=0)    # no pruning before this training step


# Sweep parameters are recipe keys: the data stages (DVC) and the base model are not swept.
SWEEPABLE = ("train.", "lora.")


class SweepConfig(Section):
    study: str | None = None              # None: <model_name>-sweep-<hash of space, recipe and data>
    # Optuna's storage: None is SQLite in optuna/optuna.db of the project; a team's is
    # postgresql://user:${OPTUNA_DB_PASSWORD}@host/db (${VARS} expanded, never a literal password)
    storage: str | None = None
    sampler: Literal["tpe", "random", "grid"] = "tpe"
    objective: Literal["val_loss", "exact_match", "token_f1", "rouge_l"] = "val_loss"   # on the validation split
    trials: int = Field(8, ge=1)          # finished (complete or pruned) trials in the study
    timeout_s: float | None = Field(None, gt=0)   # no new trial starts after this many seconds
    parallel: int | Literal["auto"] = "auto"      # trials at once here: auto = one per GPU, 1 on CPU
    eval_points: int = Field(4, ge=1)     # validation loss this many times a trial (the pruning points)
    objective_examples: int | None = Field(200, ge=1)   # validation rows generated for a metric objective
    seed: int = 0                         # the sampler's
    heartbeat_s: int = Field(30, ge=1)    # a trial silent for 4x this (its worker died) is failed and retried once
    pruner: PrunerConfig = PrunerConfig()
    # dotted recipe key -> a list of values (grid / categorical) or {low, high, log, step}
    space: dict[str, Any] = Field(default_factory=dict)

    def params(self) -> dict[str, "list[Any] | ParamRange"]:
        """The space, each entry a list of values or a ParamRange."""
        return {k: v if isinstance(v, list) else ParamRange.model_validate(v) for k, v in self.space.items()}

    @field_validator("storage")
    @classmethod
    def no_literal_password(cls, url: str | None) -> str | None:
        return no_literal_password(url, "write it as ${OPTUNA_DB_PASSWORD} (any variable name) and set that "
                                        "variable where the sweep runs")

    @model_validator(mode="after")
    def _space(self) -> "SweepConfig":
        problems = [] if self.parallel == "auto" or self.parallel >= 1 else ["parallel must be >= 1 or 'auto'"]
        for key, values in self.space.items():
            if not key.startswith(SWEEPABLE) or key.count(".") != 1:
                problems.append(f"space key {key!r}: only train.* and lora.* recipe keys are swept "
                                "(data and the base model are DVC's)")
                continue
            section, field = key.split(".")
            cls = TrainConfig if section == "train" else LoraConfig
            if field not in cls.model_fields:
                problems.append(f"space key {key!r}: {section} has no field {field!r}")
                continue
            if isinstance(values, list) and not values:
                problems.append(f"space key {key!r}: an empty list")
                continue
            if not isinstance(values, list):
                try:
                    values = ParamRange.model_validate(values)
                except ValidationError as exc:
                    problems.append(f"space key {key!r}: " + "; ".join(
                        (".".join(str(p) for p in e["loc"]) + ": " if e["loc"] else "")
                        + e["msg"].removeprefix("Value error, ") for e in exc.errors())
                        + " (a list of values, or {low, high, log, step})")
                    continue
            for value in (values if isinstance(values, list) else [values.low, values.high]):
                try:
                    cls.model_validate({field: value})
                except ValidationError as exc:
                    problems.append(f"space key {key!r}: {value!r} is not a valid {key} "
                                    f"({exc.errors()[0]['msg'].removeprefix('Value error, ')})")
            if self.sampler == "grid" and not isinstance(values, list):
                problems.append(f"space key {key!r}: sampler grid needs a list of values, not a range")
        if problems:
            raise ValueError("; ".join(problems))
        return self


class ServeConfig(Section):
    """`ftpipe serve`: what it records, how much it queues, who may talk to it."""
    # Where requests and feedback are recorded: null = SQLite at serving/requests.db in the
    # project; a PostgreSQL URL for a team (a password as ${VAR}, never a literal).
    store: str | None = None
    capture: bool = True                  # false: requests are answered, not recorded (feedback then has nothing to refer to)
    queue_size: int = Field(64, ge=1)     # waiting generation requests; a full queue answers 503 with Retry-After
    max_batch: int = Field(16, ge=1)      # concurrent prompts generated together on one model
    batch_wait_ms: float = Field(5.0, ge=0)   # how long the first prompt of a batch waits for company
    max_new_tokens: int = Field(48, ge=1)
    max_body_bytes: int = Field(65536, ge=1024)   # a larger request body answers 413
    # Bound anywhere but 127.0.0.1 / localhost, every request needs this token (Authorization:
    # Bearer, or the page's cookie). Written as ${VAR}: the value lives in the environment.
    token: str | None = None

    @field_validator("store")
    @classmethod
    def _no_password(cls, url: str | None) -> str | None:
        return no_literal_password(url, "write it as ${SERVE_DB_PASSWORD} (any variable name)")

    @field_validator("token")
    @classmethod
    def _token_from_env(cls, token: str | None) -> str | None:
        if token is not None and not (token.startswith("${") and token.endswith("}") or token.startswith("$")):
            raise ValueError("serve.token must be an environment variable reference, e.g. ${FTPIPE_SERVE_TOKEN}: "
                             "the config is logged to MLflow and Prefect, the token's value never is")
        return token


class PipelineConfig(Section):
    data: DataConfig
    quality: QualityConfig = QualityConfig()
    model: ModelConfig = ModelConfig()
    lora: LoraConfig = LoraConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    registry: RegistryConfig = RegistryConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    incremental: IncrementalConfig = IncrementalConfig()
    sweep: SweepConfig = SweepConfig()
    serve: ServeConfig = ServeConfig()

    @model_validator(mode="after")
    def _cross_field(self) -> "PipelineConfig":
        problems = cross_section_problems(self.model_dump())
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def hash(self) -> str:
        """Content hash of the config that trains (the same settings give the same hash); the
        sweep section, which only says how to search, is not part of it."""
        return config_digest(self.model_dump(mode="json"))


def cross_section_problems(doc: dict) -> list[str]:
    """Rules across sections, over a plain dict (a validated config or raw YAML with
    defaults missing), so they are checked even when another field is invalid."""
    def get(section: str, key: str, default: str) -> Any:
        value = (doc.get(section) or {}).get(key, default) if isinstance(doc.get(section, {}), dict) else default
        return value if isinstance(value, str) else default

    method, quant = get("train", "method", "lora"), get("model", "quantization", "none")
    problems = []
    if method == "qlora" and quant == "none":
        problems.append("train.method=qlora needs model.quantization nf4 or int8 (it is 'none')")
    if method == "full" and quant != "none":
        problems.append(f"train.method=full cannot train a quantized model (model.quantization={quant}); use qlora")
    if method == "lora" and quant != "none":
        problems.append("train.method=lora with a quantized base is qlora: set train.method=qlora")
    return problems


def digest(value: Any, length: int = 16) -> str:
    """The content hash ftpipe keys things by (a config, a recipe, its data): sha256 of the
    canonical JSON, cut to `length` hex digits."""
    blob = json.dumps(value, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


def config_digest(doc: dict) -> str:
    """The config hash of a config document (a run's logged params.yaml), its sweep and serve
    sections (how to search, how to serve: neither changes what trains) left out."""
    return digest({k: v for k, v in doc.items() if k not in ("sweep", "serve")})


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
        parts: list = [int(p) if p.isdigit() else p for p in key.strip().split(".")]
        node = out
        for part in parts[:-1]:   # sections, and list items by index (data.sources.0.encoding)
            if isinstance(node, list) and isinstance(part, int) and part < len(node):
                node = node[part]
            elif isinstance(node, dict) and isinstance(node.setdefault(part, {}), (dict, list)):
                node = node[part]
            elif isinstance(node, list):
                problems.append(f"override {key!r}: no item {part!r} in that list (it has {len(node)})")
                break
            else:
                problems.append(f"override {key!r}: {part!r} is not a section")
                break
        else:
            if isinstance(node, list) and not (isinstance(parts[-1], int) and parts[-1] < len(node)):
                problems.append(f"override {key!r}: no item {parts[-1]!r} in that list")
            else:
                node[parts[-1]] = _coerce(value)
    if problems:
        raise ConfigError("\n".join(problems))
    return out


def _drop(doc: Any, loc: tuple) -> bool:
    """Remove the field at loc from a nested dict/list (never a whole section); False if
    there is no such field."""
    if not loc:
        return False
    *parents, last = loc
    for part in parents:
        try:
            doc = doc[part]
        except (KeyError, IndexError, TypeError):
            return False
    if isinstance(doc, dict) and last in doc and not isinstance(doc[last], dict):
        del doc[last]
        return True
    return False


def parse_config(raw: dict, origin: str = "config", overrides: dict[str, str] | None = None) -> PipelineConfig:
    """The validated config, or a ConfigError listing every problem at once.

    pydantic stops at a section whose fields are invalid: its own cross-field rules (and the
    config-wide ones) never run. So each invalid field is set aside (back to its default)
    and the rest validated again, until no new problem appears: a wrong type and a bad
    combination elsewhere are reported together. `overrides` (key -> `key=value` as typed)
    says which problems come from the command line rather than the file."""
    doc = json.loads(json.dumps(raw))
    problems: list[tuple[tuple, str]] = []
    for _ in range(20):
        try:
            cfg = PipelineConfig.model_validate(doc)
        except ValidationError as exc:
            new = [(tuple(e["loc"]), e["msg"]) for e in exc.errors() if (tuple(e["loc"]), e["msg"]) not in problems
                   and not (e["type"] == "missing" and any(loc == tuple(e["loc"]) for loc, _ in problems))]
            problems += new
            if not [loc for loc, _ in new if _drop(doc, loc)]:
                break
        else:
            if not problems:
                return cfg
            break
    problems += [((), m) for m in cross_section_problems(doc) if not any(m in seen for _, seen in problems)]
    lines = [f"{origin}: {len(problems)} problem(s)"]
    for loc, msg in problems:
        where = ".".join(str(p) for p in loc) or "(top level)"
        msg = msg.removeprefix("Value error, ")
        given = next((typed for key, typed in (overrides or {}).items()   # a rule across fields: named in msg
                      if where == key or where.startswith(key + ".") or (not loc and f"{key}=" in msg)), None)
        if len(loc) > 2 and loc[:2] == ("data", "sources") and isinstance(loc[2], int):
            try:
                name = raw["data"]["sources"][loc[2]].get("name")
            except (KeyError, IndexError, TypeError, AttributeError):
                name = None
            msg += f" (source {name!r})" if name else ""
        lines.append(f"  - {where}: {msg}" + (f" (from the command line: {given})" if given else ""))
    raise ConfigError("\n".join(lines))


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
    typed = {o.split("=", 1)[0].strip(): o for o in overrides or [] if "=" in o}
    return parse_config(apply_overrides(raw, overrides or []),
                        origin=f"{path}" + (" + command line" if typed else ""), overrides=typed)
