"""The names ftpipe writes and reads: the metrics the evaluation reports, and the keys it
writes on MLflow model versions (and which of them stay version tags).

A version's registration facts (lineage, recipe, metrics) all go into its immutable record
(the run artifact lineage/lineage.json, digest in the run param ftpipe.lineage_sha256,
ftpipe.lineage.audit). Only the few a person filters on in the registry, or the code queries, are
also version tags (VERSION_TAGS); the audit names any of those edited after registration.
The gate adds its decision tags (DECISION ...) afterwards.
"""

from __future__ import annotations

# metrics: every one the evaluation reports (per model and set); the first four also per slice
# ("slice.NAME.METRIC"); non_empty and pii_outputs are gate checks
# on the test set's preference pairs (ftpipe.evaluation.metrics)
PREFERENCE_METRICS = ("pref_accuracy", "reward_accuracy", "reward_margin", "win_rate")
METRICS = ("exact_match", "token_f1", "rouge_l", "eval_loss", "perplexity", "non_empty", "pii_outputs",
           *PREFERENCE_METRICS)
SLICE_METRICS = ("exact_match", "token_f1", "rouge_l", "eval_loss")
LOWER_IS_BETTER = frozenset({"eval_loss", "perplexity", "pii_outputs"})


def lower_is_better(metric: str) -> bool:
    return metric.rsplit(".", 1)[-1] in LOWER_IS_BETTER


def under(keys: dict[str, str], prefix: str) -> dict[str, str]:
    """The entries of a tag or record dict under a key prefix (DVC, SOURCE), the prefix cut off."""
    return {k[len(prefix):]: v for k, v in keys.items() if k.startswith(prefix)}


def fmt(value) -> str:
    """A metric as tables show it: 4 decimals, — when missing."""
    if value is None:
        return "—"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


# lineage: where the code, config, base model and data came from
GIT_COMMIT = "ftpipe.git_commit"
GIT_DIRTY = "ftpipe.git_dirty"
CONFIG_HASH = "ftpipe.config_hash"
BASE_MODEL = "ftpipe.base_model"
BASE_MODEL_REVISION = "ftpipe.base_model_revision"
GX_VERDICT = "ftpipe.gx_verdict"
PREFECT_FLOW_RUN = "ftpipe.prefect_flow_run"
START_FROM = "ftpipe.start_from"          # "scratch" | "champion models:/NAME/V: N new training rows + M replayed"
SWEEP = "ftpipe.sweep"                    # a sweep's winner: "study NAME trial N (objective=VALUE)"
TRAIN_FILE = "ftpipe.train_file"          # an incremental run's training file: "sha256:HEX rows:N"
BASE_STORED = "ftpipe.base_stored"        # an adapter version's base in the base store: "sha256:DIGEST run:ID"
DVC = "ftpipe.dvc."                       # + "stage:path" -> DVC md5
SPLITS_OUTPUT = "split:data/splits"         # the DVC output a version trains and tests on
SPLITS = DVC + SPLITS_OUTPUT
SOURCE = "ftpipe.source."                 # + path -> "sha256:HEX rows:N"
BEHAVIOUR = "ftpipe.behaviour."           # + suite file -> "sha256:HEX cases:N": the suites that gated the version
LINEAGE_KEYS = (GIT_COMMIT, GIT_DIRTY, CONFIG_HASH, BASE_MODEL, BASE_MODEL_REVISION, GX_VERDICT,
                PREFECT_FLOW_RUN, START_FROM)

# registration: the candidate itself
METHOD = "ftpipe.method"
CANDIDATE = "ftpipe.candidate"            # the training key (runs/train-KEY): one version per trained candidate
TEST_SET = "ftpipe.test_set"              # sha256 of the test set it was scored on
METRIC = "ftpipe.metric."                 # + metric name -> its score on TEST_SET

# the gate (written after registration)
DECISION = "ftpipe.decision"              # promote | refuse | manual-promote
DECISION_REASONS = "ftpipe.decision.reasons"
DECISION_SUMMARY = "ftpipe.decision.summary"   # older versions: the full summary (now in the description)
CHAMPION_COMPARED = "ftpipe.champion_compared"
CHAMPION_METRIC = "ftpipe.champion_metric."    # + primary metric -> the champion's score on TEST_SET
FORGETTING = "ftpipe.forgetting"
MANUAL_REASON = "ftpipe.manual.reason"

# the gate's manual overrides and moves of the champion
MANUAL_BY = "ftpipe.manual.by"
MANUAL_AT = "ftpipe.manual.at"
GATE_DECISION = "ftpipe.gate_decision"    # what the gate had said before a manual promotion
ROLLED_BACK = "ftpipe.rolled_back"
CHAMPION_EVENT = "ftpipe.champion."       # + time -> "gate|manual|rollback: reason"
HISTORY = "ftpipe.champion_history"       # registered-model tag: every champion move, newest last

# run tags (the MLflow run of a flow run)
RUN_SKIPPED = "ftpipe.skipped"
RUN_MODEL_VERSION = "ftpipe.model_version"
RUN_REUSED_VERSION = "ftpipe.reused_version"
RUN_NEW_ROWS = "ftpipe.new_rows"
RUN_STAGES = "ftpipe.train_stages"         # a staged run: "1: sft steps 1-120 -> 2: dpo steps 121-180"
SWEEP_STUDY = "ftpipe.sweep.study"       # a sweep's parent run and each trial's child run: the Optuna study
SWEEP_TRIAL = "ftpipe.sweep.trial"       # a trial's child run: its number in the study
SWEEP_STATE = "ftpipe.sweep.state"       # complete | pruned | fail
SWEEP_RESUMES = "ftpipe.sweep.resumes"   # a resumed sweep's parent run: the parent run it continues
RECORD_PARAM = "ftpipe.lineage_sha256"    # run param: the digest of the immutable lineage record

# in the record: which of its keys were also written as version tags
RECORD_TAGGED = "ftpipe.tagged"

VERSION_TAGS = (METHOD, CANDIDATE, CONFIG_HASH, SPLITS, BASE_MODEL, BASE_MODEL_REVISION, START_FROM, TEST_SET, SWEEP)


def is_registered(key: str) -> bool:
    """A key that registration writes (in the record; some also as tags), not the gate."""
    return key in LINEAGE_KEYS or key in (TRAIN_FILE, SWEEP, BASE_STORED, METHOD, CANDIDATE, TEST_SET) \
        or key.startswith((DVC, SOURCE, METRIC))


def version_tags(registered: dict[str, str], primary_metric: str) -> dict[str, str]:
    """The registration facts that also become version tags: the ones people filter on and
    the code queries, plus the primary metric."""
    keep = set(VERSION_TAGS) | {METRIC + primary_metric}
    return {k: v for k, v in registered.items() if k in keep}
