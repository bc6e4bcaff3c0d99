"""Candidates as model versions: each trained candidate is registered once (its training key
is the version tag ftpipe.candidate), with every registration fact in the immutable lineage
record and the few people filter on as version tags."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ftpipe import names as t
from ftpipe.config import RegistryConfig
from ftpipe.lineage.record import Lineage, write_record
from ftpipe.registry import bases, store


@dataclass(frozen=True)
class Registered:
    """The version that already holds a candidate's weights, and its gate decision ('' when
    a run registered it and stopped before the gate)."""
    version: store.VersionInfo
    decision: str

    def skip(self, model_name: str) -> str | None:
        """Why a run with these weights trains nothing more: decided already (None: undecided,
        the gate decides on this version now)."""
        return (f"skipped: {model_name} v{self.version.version} already holds these weights (same recipe, "
                f"same data; decided '{self.decision}'), nothing registered") if self.decision else None


def training_key(model_dir: str) -> str:
    """A candidate's training key: the folder runs/train-KEY its weights were trained in."""
    return Path(model_dir).parent.name


def find_registered(reg: RegistryConfig, model_dir: str, run_id: str) -> Registered | None:
    """The version that already holds these weights (same training key: same recipe, same
    data): a run started again never registers the same candidate twice. Noted on the run."""
    key = training_key(model_dir)
    for mv in store.versions_tagged(reg.model_name, {t.CANDIDATE: key})[:1]:
        c = store.client()
        c.set_tag(run_id, t.RUN_MODEL_VERSION, str(mv.version))
        c.set_tag(run_id, t.RUN_REUSED_VERSION, f"{reg.model_name} v{mv.version}")
        return Registered(store.VersionInfo.of(mv),
                          (mv.tags or {}).get(t.DECISION, ""))
    return None


def register(reg: RegistryConfig, run_id: str, model_dir: str, lineage: Lineage, metrics: dict[str, float],
             method: str, test_sha: str, adapter_dir: str | None = None,
             base: tuple[str, str, str | None] | None = None,
             log: Callable[[str], None] = lambda msg: None) -> store.VersionInfo:
    """A new version (alias challenger): every fact in the immutable record, the few people
    filter on also as version tags (`ftpipe lineage` names any of them edited later).

    With adapter_dir and base (its folder, source, revision), an adapter version: the
    adapter and a pinned reference to the base, stored once per registry (bases.store_base)."""
    facts = lineage.tags() | {t.METHOD: method, t.TEST_SET: test_sha, t.CANDIDATE: training_key(model_dir)}
    ref = None
    if adapter_dir and base:
        ref = bases.store_base(bases.local_folder(base[0], base[2]), base[1], base[2], log)
        facts[t.BASE_STORED] = f"sha256:{ref['digest']} run:{ref['run_id']}"
    facts |= {t.METRIC + k: f"{v:.6g}" for k, v in metrics.items() if not k.startswith("slice.")}
    tags = t.version_tags(facts, reg.promotion.primary_metric)
    write_record(store.client(), run_id, facts, tags)
    version = store.log_model(run_id, model_dir, reg.model_name, tags, adapter_dir if ref else None, ref)
    store.client().set_tag(run_id, t.RUN_MODEL_VERSION, version.version)
    return version
