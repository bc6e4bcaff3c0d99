"""The settings the DVC stages read, with their defaults: the `data:` and `model.build:`
sections of params.yaml. This file is a dependency of every data stage in dvc.yaml, so a
changed default (say data.clean.near_dup.num_perm) re-runs the stages it shapes, as a
changed value in params.yaml does.

    dvc repro        # the data stages; `ftpipe run` reproduces them first
"""

from __future__ import annotations

from typing import Literal
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)


class Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


SOURCE_ROOTS = ("data/sources", "data/incoming")  # the folders dvc.yaml's collect stage watches


def no_literal_password(url: str | None, how: str) -> str | None:
    """A URL field's validator: a password must be a ${VAR} reference, never a literal."""
    from ftpipe.secrets import literal_password

    if literal_password(url):
        raise ValueError(f"holds a literal password: {how}")
    return url


class SourceConfig(Section):
    """One data source. `type: auto` reads the file extension (a folder under data/incoming
    is a drop folder, one with dataset_info.json a `save_to_disk` dataset)."""
    name: str | None = None
    type: Literal["auto", "jsonl", "json", "csv", "parquet", "saved", "drop", "sql"] = "auto"
    path: str | None = Field(None, description="file, glob or folder under data/sources or data/incoming")
    format: Literal["auto", "alpaca", "prompt_completion", "chat", "preference", "chat_preference"] = "auto"
    # Canonical field -> your column: {"instruction": "question", "output": "answer"}.
    columns: dict[str, str] = Field(default_factory=dict)
    encoding: str = "utf-8"
    split: str | None = None          # which split of a saved DatasetDict
    # Evaluation slice of every row from this source (metrics are reported per slice); a
    # row's own `slice` (or `task`) column, or the column named in columns.slice, wins.
    slice: str | None = None
    # Training mix: weight 0.5 keeps a hash-chosen half of this source's train rows, 2.0
    # repeats them twice; max_rows caps them. Validation and test rows are never reweighted.
    weight: float = Field(1.0, gt=0, le=100)
    max_rows: int | None = Field(None, ge=1)
    # SQL sources: a SQLAlchemy URL ($VARS expanded at run time, so no password in git)
    # and a query; `ftpipe run` exports the result to data/sources/sql/<name>.jsonl.
    url: str | None = None
    query: str | None = None

    @field_validator("encoding")
    @classmethod
    def _known_encoding(cls, encoding: str) -> str:
        import codecs

        try:
            codecs.lookup(encoding)
        except LookupError:
            raise ValueError(f"unknown encoding {encoding!r} (e.g. utf-8, cp1252, latin-1, utf-16)") from None
        return encoding

    @field_validator("url")
    @classmethod
    def no_literal_password(cls, url: str | None) -> str | None:
        return no_literal_password(url, "write it as ${DB_PASSWORD} (any variable name) and set that variable "
                                         "where the pipeline runs; the config is logged to MLflow and Prefect, "
                                         "the variable's value never is")

    @model_validator(mode="after")
    def _shape(self) -> "SourceConfig":
        import posixpath

        if self.type == "sql":
            if not (self.url and self.query):
                raise ValueError("a sql source needs url and query")

            if not self.name:
                raise ValueError("a sql source needs a name (its export is data/sources/sql/<name>.jsonl)")
            if self.path:
                raise ValueError("a sql source takes url and query, not path")
            return self
        if not self.path:
            raise ValueError(f"a {self.type} source needs a path")
        if self.url or self.query:
            raise ValueError("url and query are for type: sql only")
        norm = posixpath.normpath(self.path.replace("\\", "/"))
        if norm.startswith("/") or norm == ".." or norm.startswith("../"):
            raise ValueError(f"path {self.path!r} leaves the project (it resolves to {norm!r}); "
                             "sources must live inside it")
        if not any(norm == r or norm.startswith(r + "/") for r in SOURCE_ROOTS):
            raise ValueError(f"path {self.path!r} is not under {' or '.join(SOURCE_ROOTS)}, the "
                             "folders the collect stage in dvc.yaml watches; move the data there")
        return self

    @property
    def label(self) -> str:
        return self.name or self.path or "sql"


class NearDupConfig(Section):
    enabled: bool = True
    # datasketch's LSH banding for 0.8 with 64 permutations (5 bands x 11 rows) catches a
    # pair sharing 90% of its word 3-grams 85% of the time, 95%: 99%, 70%: 10%.
    threshold: float = Field(0.8, gt=0, le=1, description="estimated Jaccard of word 3-grams")
    num_perm: int = Field(64, ge=16, le=512)
    shingle: int = Field(3, ge=1, le=10)
    min_words: int = Field(12, ge=1, description="shorter texts are only exact-deduplicated")


class CleanConfig(Section):
    normalize: Literal["NFC", "NFKC"] = "NFC"
    max_chars: int = Field(20000, gt=0, description="rows longer than this are rejected before tokenizing")
    # Token limits use the tokenizer of model.base on the rendered prompt + completion.
    max_tokens: int = Field(256, gt=0)
    min_output_chars: int = Field(1, ge=1)
    pii: Literal["scrub", "drop", "keep"] = "scrub"
    near_dup: NearDupConfig = NearDupConfig()
    workers: int = Field(0, ge=0, description="0: this process's share of the cores (OMP_NUM_THREADS, else all)")
    chunk_rows: int = Field(4000, ge=100)


class SplitConfig(Section):
    validation: float = Field(0.1, ge=0, lt=1)
    test: float = Field(0.1, gt=0, lt=1)
    salt: str = "ftpipe-v1"

    @model_validator(mode="after")
    def _fractions(self) -> "SplitConfig":
        if self.validation + self.test >= 1:
            raise ValueError("split.validation + split.test must leave room for train (< 1)")
        return self


class DataConfig(Section):
    sources: list[SourceConfig] = Field(min_length=1)
    clean: CleanConfig = CleanConfig()
    split: SplitConfig = SplitConfig()
    remote: str | None = Field(None, description="DVC remote to push data versions to (None: the default remote)")
    push: bool = True

    @model_validator(mode="after")
    def _unique_names(self) -> "DataConfig":
        seen = {}
        for i, src in enumerate(self.sources):
            if src.name and src.name in seen:
                raise ValueError(f"sources[{i}].name {src.name!r} repeats sources[{seen[src.name]}]")
            if src.name:
                seen[src.name] = i
        return self


class BuildConfig(Section):
    """How the DVC stage `base_model` builds the tiny default base model."""
    seed: int = 0
    vocab_size: int = Field(512, ge=300)
    hidden_size: int = 192
    layers: int = 4
    heads: int = 4
    intermediate_size: int = 512
    block_size: int = 128
    pretrain_steps: int = Field(60, ge=0)
    pretrain_batch_size: int = 32
    pretrain_lr: float = 3e-3
