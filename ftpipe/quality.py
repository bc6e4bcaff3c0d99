"""The data-quality gates: two Great Expectations 1.x suites.

- raw_snapshot, on data/collected/snapshot.jsonl: provenance, parseability, recognised
  format, text types and non-null prompt/response, row count.
- cleaned, on data/cleaned/clean.jsonl with each row's split: token length bounds,
  unique prompts, no PII patterns, non-empty responses, split proportions.

GX owns the verdict. To keep memory flat at any row count, rows stream into a SQLite
file and GX runs its expectations as SQL there (SQLite's REGEXP is Python's `re`). The
`mostly` thresholds come from params.yaml (`quality.raw.mostly`, `quality.cleaned.mostly`).
Results JSON and Data Docs HTML land in data/reports/. A failing gate raises
`QualityGateFailed` whose message is a table of failed expectations and observed values.
"""

from __future__ import annotations

import json
import os
import sqlite3
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from ftpipe.config import CleanConfig, QualityConfig, SplitConfig
from ftpipe.records import json_type, prompt_field, response_field, texts_of

FORMATS = ["alpaca", "prompt_completion", "chat"]
REPORTS = Path("data/reports")


class QualityGateFailed(RuntimeError):
    def __init__(self, message: str, report: str, failed: list[dict]):
        super().__init__(message)
        self.report = report
        self.failed = failed


@dataclass(frozen=True)
class QualityResult:
    suite: str
    success: bool
    report: str
    evaluated: int
    failed: list[dict]
    rows: int = 0
    docs: str | None = None
    statistics: dict = field(default_factory=dict)


# ------------------------------------------------------------------ rows -> SQLite

def _as_text(value) -> str | None:
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False)


def _raw_record(row: dict) -> tuple:
    fmt = row.get("_format")
    p, r = prompt_field(row), response_field(row)
    return (row.get("_source"), row.get("_line"), fmt, row.get("_error"),
            _as_text(p), f"{fmt}:{json_type(p)}", _as_text(r), f"{fmt}:{json_type(r)}")


RAW_COLUMNS = ("_source", "_line", "_format", "_error", "prompt", "prompt_type", "response",
               "response_type")


def _cleaned_record(row: dict, split: SplitConfig) -> tuple:
    from ftpipe.splitting import split_of

    s = split_of(row, split)
    return (row.get("_format"), row.get("_key"), row.get("_tokens"), response_field(row),
            "\n".join(texts_of(row)), int(s == "test"), int(s == "validation"))


CLEANED_COLUMNS = ("_format", "_key", "_tokens", "response", "text", "is_test", "is_validation")


def load_sqlite(db: Path, table: str, columns: tuple[str, ...], rows: Iterable[tuple]) -> int:
    con = sqlite3.connect(db)
    con.execute("PRAGMA journal_mode=OFF")
    con.execute("PRAGMA synchronous=OFF")
    con.execute(f"DROP TABLE IF EXISTS {table}")
    con.execute(f"CREATE TABLE {table} ({', '.join(columns)})")
    sql = f"INSERT INTO {table} VALUES ({', '.join('?' * len(columns))})"
    n = 0
    batch: list[tuple] = []
    for r in rows:
        batch.append(r)
        if len(batch) >= 10000:
            con.executemany(sql, batch)
            n += len(batch)
            batch = []
    if batch:
        con.executemany(sql, batch)
        n += len(batch)
    con.commit()
    con.close()
    return n


def _jsonl(path: Path) -> Iterable[dict]:
    import orjson

    with path.open("rb") as f:
        for line in f:
            if line.strip():
                yield orjson.loads(line)


# ------------------------------------------------------------------ suites

def _mostly(value: float) -> float:
    return max(min(value, 1.0), 1e-9)  # GX's `mostly` must be > 0


def raw_expectations(cfg: QualityConfig) -> list:
    import great_expectations.expectations as gxe

    m = _mostly(cfg.raw.mostly)
    return [
        gxe.ExpectTableRowCountToBeBetween(min_value=cfg.min_rows),
        gxe.ExpectColumnValuesToNotBeNull(column="_source"),
        gxe.ExpectColumnValuesToBeBetween(column="_line", min_value=1),
        # `_error` is set on rows that did not parse or had wrong types.
        gxe.ExpectColumnValuesToBeNull(column="_error", mostly=m),
        gxe.ExpectColumnValuesToBeInSet(column="_format", value_set=FORMATS, mostly=m),
        gxe.ExpectColumnValuesToNotBeNull(column="prompt", mostly=m),
        gxe.ExpectColumnValuesToNotBeNull(column="response", mostly=m),
        gxe.ExpectColumnValuesToBeInSet(column="prompt_type", mostly=m, value_set=[
            "alpaca:string", "prompt_completion:string", "chat:array"]),
        gxe.ExpectColumnValuesToBeInSet(column="response_type", mostly=m, value_set=[
            f"{f}:string" for f in FORMATS]),
    ]


def cleaned_expectations(cfg: QualityConfig, clean: CleanConfig, split: SplitConfig) -> list:
    import great_expectations.expectations as gxe

    from ftpipe.pii import GX_PATTERNS

    m = _mostly(cfg.cleaned.mostly)
    tol = cfg.cleaned.split_tolerance
    exps = [
        gxe.ExpectTableRowCountToBeBetween(min_value=cfg.min_rows),
        gxe.ExpectColumnValuesToBeInSet(column="_format", value_set=FORMATS),
        gxe.ExpectColumnValuesToBeBetween(column="_tokens", min_value=1, max_value=clean.max_tokens, mostly=m),
        gxe.ExpectColumnValuesToBeUnique(column="_key"),
        gxe.ExpectColumnValueLengthsToBeBetween(column="response", min_value=clean.min_output_chars, mostly=m),
        gxe.ExpectColumnValuesToNotMatchRegexList(column="text", regex_list=GX_PATTERNS, mostly=m),
        gxe.ExpectColumnMeanToBeBetween(column="is_test", min_value=max(0.0, split.test - tol),
                                        max_value=split.test + tol),
        gxe.ExpectColumnMeanToBeBetween(column="is_validation", min_value=max(0.0, split.validation - tol),
                                        max_value=split.validation + tol),
    ]
    if clean.pii == "keep":  # PII kept on purpose: the PII expectation would contradict the policy
        exps = [e for e in exps if not isinstance(e, gxe.ExpectColumnValuesToNotMatchRegexList)]
    return exps


def _observed(result: dict) -> str:
    res = result.get("result") or {}
    if "observed_value" in res:
        return str(res["observed_value"])
    if "unexpected_percent" in res:
        partial = res.get("partial_unexpected_list") or []
        sample = f"; e.g. {', '.join(repr(v)[:40] for v in partial[:3])}" if partial else ""
        return (f"{res.get('unexpected_count', 0)} of {res.get('element_count', '?')} rows "
                f"({res['unexpected_percent']:.2f}%) unexpected{sample}")
    return json.dumps(res)[:120]


def run_suite(name: str, table: str, load: Callable[[Path], int], expectations: list,
              report_path: Path, docs_dir: Path | None) -> QualityResult:
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx
    from great_expectations.checkpoint import UpdateDataDocsAction
    from great_expectations.data_context.types.base import ProgressBarsConfig

    with tempfile.TemporaryDirectory(prefix="ftpipe-gx-") as tmp:
        db = Path(tmp) / f"{name}.sqlite"
        rows = load(db)
        ctx = gx.get_context(mode="ephemeral")
        ctx.variables.progress_bars = ProgressBarsConfig(globally=False)
        actions = []
        if docs_dir is not None:
            docs_dir.mkdir(parents=True, exist_ok=True)
            ctx.add_data_docs_site(site_name="ftpipe", site_config={
                "class_name": "SiteBuilder",
                "store_backend": {"class_name": "TupleFilesystemStoreBackend",
                                  "base_directory": str(docs_dir.resolve())},
                "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"}})
            actions.append(UpdateDataDocsAction(name="docs", site_names=["ftpipe"]))
        batch_def = (ctx.data_sources.add_sqlite(name, connection_string=f"sqlite:///{db}")
                     .add_table_asset(table, table_name=table)
                     .add_batch_definition_whole_table("all"))
        suite = ctx.suites.add(gx.ExpectationSuite(name=name))
        for exp in expectations:
            suite.add_expectation(exp)
        vd = ctx.validation_definitions.add(gx.ValidationDefinition(name=name, data=batch_def, suite=suite))
        cp = ctx.checkpoints.add(gx.Checkpoint(name=f"{name}_checkpoint", validation_definitions=[vd],
                                               actions=actions, result_format="SUMMARY"))
        run = cp.run()
        doc = next(iter(run.run_results.values())).to_json_dict()
        ctx = None  # let GX drop its engine before the SQLite file goes
    report_path.parent.mkdir(parents=True, exist_ok=True)
    report_path.write_text(json.dumps(doc, indent=2, sort_keys=True, default=str) + "\n")
    failed = []
    for r in doc["results"]:
        if not r["success"]:
            c = r["expectation_config"]
            kwargs = {k: v for k, v in c["kwargs"].items() if k != "batch_id"}
            failed.append({"expectation": c["type"], "kwargs": kwargs, "observed": _observed(r)})
    docs = str(docs_dir.resolve() / "index.html") if docs_dir is not None else None
    return QualityResult(name, bool(doc["success"]), str(report_path), len(doc["results"]), failed,
                         rows, docs, doc.get("statistics", {}))


def format_failures(failed: list[dict]) -> str:
    lines = [f"  {'expectation':44} {'column':14} observed"]
    for f in failed:
        lines.append(f"  {f['expectation']:44} {str(f['kwargs'].get('column', '')):14} {f['observed']}")
    return "\n".join(lines)


def _raise_if_failed(result: QualityResult, what: Path) -> QualityResult:
    if not result.success:
        raise QualityGateFailed(
            f"data quality gate '{result.suite}' failed on {what} ({len(result.failed)} of "
            f"{result.evaluated} expectations); report: {result.report}"
            + (f", Data Docs: {result.docs}" if result.docs else "") + "\n"
            + format_failures(result.failed), result.report, result.failed)
    return result


def validate_raw(snapshot: Path, cfg: QualityConfig, reports: Path, docs: bool = True) -> QualityResult:
    """The first gate of a run: it starts Data Docs afresh, so data/reports/docs holds this
    data version's two suites (earlier runs' pages live on their MLflow runs)."""
    import shutil

    if docs:
        shutil.rmtree(reports / "docs", ignore_errors=True)
    load = lambda db: load_sqlite(db, "raw", RAW_COLUMNS, map(_raw_record, _jsonl(snapshot)))  # noqa: E731
    return run_suite("raw_snapshot", "raw", load, raw_expectations(cfg),
                     reports / "raw_validation.json", reports / "docs" if docs else None)


def validate_cleaned(cleaned: Path, cfg: QualityConfig, clean: CleanConfig, split: SplitConfig,
                     reports: Path, docs: bool = True) -> QualityResult:
    load = lambda db: load_sqlite(db, "cleaned", CLEANED_COLUMNS,  # noqa: E731
                                  (_cleaned_record(r, split) for r in _jsonl(cleaned)))
    return run_suite("cleaned", "cleaned", load, cleaned_expectations(cfg, clean, split),
                     reports / "cleaned_validation.json", reports / "docs" if docs else None)


def gate_raw(snapshot: Path, cfg: QualityConfig, reports: Path) -> QualityResult:
    return _raise_if_failed(validate_raw(snapshot, cfg, reports), snapshot)


def gate_cleaned(cleaned: Path, cfg: QualityConfig, clean: CleanConfig, split: SplitConfig,
                 reports: Path) -> QualityResult:
    return _raise_if_failed(validate_cleaned(cleaned, cfg, clean, split, reports), cleaned)
