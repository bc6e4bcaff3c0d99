"""The data-quality gates: two Great Expectations 1.x suites.

- raw_snapshot, on data/collected/snapshot.jsonl: provenance, parseability, recognised
  format, text types and non-null prompt/response, row count.
- cleaned, on data/cleaned/clean.jsonl with each row's split: token length bounds,
  unique prompts, no PII patterns, non-empty responses, split proportions, and a floor per
  source (`quality.cleaned.min_source_share`) on the rows it keeps through cleaning.

GX owns the verdict. To keep memory flat at any row count, rows stream into a SQLite
file and GX runs its expectations as SQL there (SQLite's REGEXP is Python's `re`). The
`mostly` thresholds come from params.yaml (`quality.raw.mostly`, `quality.cleaned.mostly`).
Results JSON land in data/reports/; both suites' validations of the current data version
are kept by one file-backed GX context (data/reports/gx) and rendered as Data Docs in
data/reports/docs, which work offline (their CDN assets are vendored in ftpipe/data/static).
A failing gate raises `QualityGateFailed` whose message is a table of failed expectations
and observed values.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
import tempfile
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from ftpipe.config import CleanConfig, QualityConfig, SplitConfig
from ftpipe.data.records import json_type, prompt_field, response_field, texts_of
from ftpipe.files import iter_jsonl

FORMATS = ["alpaca", "prompt_completion", "chat", "preference", "chat_preference"]
REPORTS = Path("data/reports")
SITE = "ftpipe"                                           # the Data Docs site in data/reports/docs
VENDOR = Path(__file__).parent / "static" / "datadocs"    # offline copies of its CSS/JS (README there)


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
    from ftpipe.data.splitting import split_of

    s = split_of(row, split)
    return (row.get("_src") or row.get("_source"), row.get("_format"), row.get("_key"), row.get("_tokens"),
            response_field(row), "\n".join(texts_of(row)), int(s == "test"), int(s == "validation"))


CLEANED_COLUMNS = ("src", "_format", "_key", "_tokens", "response", "text", "is_test", "is_validation")
# Beside it, table `quarantined`: (src, category) of every row cleaning set aside.
QUARANTINED_COLUMNS = ("src", "category")


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
            "alpaca:string", "prompt_completion:string", "chat:array", "preference:string",
            "chat_preference:array"]),
        gxe.ExpectColumnValuesToBeInSet(column="response_type", mostly=m, value_set=[
            f"{f}:string" for f in FORMATS]),
    ]


def source_floor_query(share: float) -> str:
    """Sources keeping less than `share` of their rows through cleaning, one row each. Rows
    quarantined as exact or near duplicates (ftpipe.data.cleaning's two categories) count neither
    way: a re-delivered drop loses nothing. A source with rows and none kept has share 0."""
    return ("SELECT source, kept, checked, ROUND(1.0 * kept / checked, 4) AS kept_share FROM ("
            "SELECT src AS source, SUM(kept) AS kept, COUNT(*) AS checked FROM ("
            "SELECT src, 1 AS kept FROM {batch} UNION ALL SELECT src, 0 FROM quarantined "
            "WHERE category NOT IN ('duplicate', 'near-duplicate')) GROUP BY src) "
            f"WHERE kept < {share!r} * checked ORDER BY source")


def cleaned_expectations(cfg: QualityConfig, clean: CleanConfig, split: SplitConfig) -> list:
    import great_expectations.expectations as gxe

    from ftpipe.data.pii import GX_PATTERNS

    m = _mostly(cfg.cleaned.mostly)
    tol = cfg.cleaned.split_tolerance
    share = cfg.cleaned.min_source_share
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
        gxe.UnexpectedRowsExpectation(
            unexpected_rows_query=source_floor_query(share),
            description=f"each source keeps >= {share * 100:g}% of its rows through cleaning, duplicates "
                        "not counted (quality.cleaned.min_source_share)"),
    ]
    if clean.pii == "keep":  # PII kept on purpose: the PII expectation would contradict the policy
        exps = [e for e in exps if not isinstance(e, gxe.ExpectColumnValuesToNotMatchRegexList)]
    return exps


def _observed(result: dict, db: Path, table: str) -> str:
    res = result.get("result") or {}
    query = result["expectation_config"]["kwargs"].get("unexpected_rows_query")
    if query:
        # GX reports how many rows the query found; the rows themselves need result_format
        # COMPLETE, which would fetch every failing row of the other expectations too
        with closing(sqlite3.connect(db)) as con:
            cur = con.execute(query.replace("{batch}", table))
            cols, rows = [d[0] for d in cur.description], cur.fetchmany(10)
        found = "; ".join(", ".join(f"{c} {v}" for c, v in zip(cols, r)) for r in rows)
        return f"{found} (expected: {result['expectation_config'].get('description')})"
    if "observed_value" in res:
        return str(res["observed_value"])
    if "unexpected_percent" in res:
        partial = res.get("partial_unexpected_list") or []
        sample = f"; e.g. {', '.join(repr(v)[:40] for v in partial[:3])}" if partial else ""
        return (f"{res.get('unexpected_count', 0)} of {res.get('element_count', '?')} rows "
                f"({res['unexpected_percent']:.2f}%) unexpected{sample}")
    return json.dumps(res)[:120]


def _context(reports: Path):
    """The file-backed GX context in data/reports/gx. It keeps the current data version's
    validation results (validate_raw starts it afresh), so the Data Docs built after the
    cleaned suite still list the raw_snapshot validation."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    ctx = gx.get_context(mode="file", project_root_dir=str(reports))
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False)
    if SITE not in ctx.get_site_names():
        ctx.add_data_docs_site(site_name=SITE, site_config={   # relative to data/reports/gx
            "class_name": "SiteBuilder",
            "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": "../docs"},
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"}})
    return ctx


def run_suite(name: str, table: str, load: Callable[[Path], int], expectations: list,
              report_path: Path, docs: bool = True) -> QualityResult:
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx

    reports = report_path.parent
    reports.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="ftpipe-gx-") as tmp:
        db = Path(tmp) / f"{name}.sqlite"
        rows = load(db)
        ctx = _context(reports)
        store = ctx.validation_results_store   # this suite's earlier results go: Data Docs show
        for key in store.list_keys():          # one validation per suite, of the current data
            if key.expectation_suite_identifier.name == name:
                store.remove_key(key)
        batch_def = (ctx.data_sources.add_or_update_sqlite(name, connection_string=f"sqlite:///{db}")
                     .add_table_asset(table, table_name=table).add_batch_definition_whole_table("all"))
        suite = ctx.suites.add_or_update(gx.ExpectationSuite(name=name, expectations=expectations))
        vd = ctx.validation_definitions.add_or_update(
            gx.ValidationDefinition(name=name, data=batch_def, suite=suite))
        doc = vd.run(result_format="SUMMARY").to_json_dict()
        failed = []
        for r in doc["results"]:
            if not r["success"]:
                c = r["expectation_config"]
                kwargs = {k: v for k, v in c["kwargs"].items() if k != "batch_id"}
                failed.append({"expectation": c["type"], "kwargs": kwargs, "observed": _observed(r, db, table)})
        if docs:
            ctx.build_data_docs(site_names=[SITE])
            localize_docs(reports / "docs")
        ctx = None  # let GX drop its engine before the SQLite file goes
    report_path.write_text(json.dumps(doc, indent=2, sort_keys=True, default=str) + "\n")
    index = str((reports / "docs" / "index.html").resolve()) if docs else None
    return QualityResult(name, bool(doc["success"]), str(report_path), len(doc["results"]), failed,
                         rows, index, doc.get("statistics", {}))


# GX 1.24's page templates load these from CDNs: offline its pages render unstyled and the
# index's validation list (a bootstrap-table) stays empty. Each goes to its copy under
# ftpipe/data/static/datadocs (None: dropped, as vega only draws profiling charts, which these
# pages do not have); the GX logo goes to the site's own static/images.
CDN_ASSETS = {
    "https://maxcdn.bootstrapcdn.com/bootstrap/4.3.1/css/bootstrap.min.css": "bootstrap/bootstrap.min.css",
    "https://stackpath.bootstrapcdn.com/bootstrap/4.3.1/js/bootstrap.min.js": "bootstrap/bootstrap.min.js",
    "https://code.jquery.com/jquery-3.7.1.min.js": "jquery/jquery.min.js",
    "https://cdnjs.cloudflare.com/ajax/libs/popper.js/1.12.9/umd/popper.min.js": "popper.js/popper.min.js",
    "https://unpkg.com/bootstrap-table@1.19.1/dist/bootstrap-table.min.css": "bootstrap-table/bootstrap-table.min.css",
    "https://unpkg.com/bootstrap-table@1.19.1/dist/bootstrap-table.min.js": "bootstrap-table/bootstrap-table.min.js",
    "https://unpkg.com/bootstrap-table@1.19.0/dist/extensions/filter-control/bootstrap-table-filter-control.css":
        "bootstrap-table/bootstrap-table-filter-control.min.css",
    "https://unpkg.com/bootstrap-table@1.19.0/dist/extensions/filter-control/bootstrap-table-filter-control.min.css":
        "bootstrap-table/bootstrap-table-filter-control.min.css",
    "https://unpkg.com/bootstrap-table@1.19.1/dist/extensions/filter-control/bootstrap-table-filter-control.min.js":
        "bootstrap-table/bootstrap-table-filter-control.min.js",
    "https://cdnjs.cloudflare.com/ajax/libs/bootstrap-datepicker/1.9.0/css/bootstrap-datepicker.min.css":
        "bootstrap-datepicker/bootstrap-datepicker.min.css",
    "https://cdnjs.cloudflare.com/ajax/libs/bootstrap-datepicker/1.9.0/js/bootstrap-datepicker.min.js":
        "bootstrap-datepicker/bootstrap-datepicker.min.js",
    "https://cdn.jsdelivr.net/npm/@forevolve/bootstrap-dark@1.1.0/dist/css/bootstrap-prefers-dark.css":
        "bootstrap-dark/bootstrap-prefers-dark.min.css",
    "https://cdnjs.cloudflare.com/ajax/libs/font-awesome/6.6.0/css/all.min.css": "fontawesome/css/all.min.css",
    "https://cdn.jsdelivr.net/npm/vega@5": None,
    "https://cdn.jsdelivr.net/npm/vega-lite@5": None,
    "https://cdn.jsdelivr.net/npm/vega-embed@6": None,
}
_ASSET_TAG = re.compile(r'<(script|link)\b[^>]*?\b(?:src|href)="(https://[^"]+)"[^>]*>(?:\s*</script>)?')
_GX_IMAGE = re.compile(r"https://great-expectations-web-assets\.s3\.[\w.-]+\.amazonaws\.com/[^\"')\s]+")


def localize_docs(docs: Path) -> None:
    """Make the Data Docs site under `docs` self-contained: copy the vendored assets into
    docs/static/vendor and point every page at them by a path relative to the page (the
    validation pages sit four folders deep). Links (<a href>) stay as they are."""
    shutil.copytree(VENDOR, docs / "static" / "vendor", dirs_exist_ok=True)
    for page in docs.rglob("*.html"):
        up = Path(os.path.relpath(docs, page.parent)).as_posix()

        def local(m: re.Match) -> str:
            if m[2] not in CDN_ASSETS:
                return m[0]
            if CDN_ASSETS[m[2]] is None:
                return ""
            path = f"{up}/static/vendor/{CDN_ASSETS[m[2]]}"   # integrity/crossorigin go: file:// has no CORS
            return f'<script src="{path}"></script>' if m[1] == "script" else f'<link rel="stylesheet" href="{path}">'

        html = page.read_text(encoding="utf-8")
        page.write_text(_GX_IMAGE.sub(f"{up}/static/images/logo-long.png", _ASSET_TAG.sub(local, html)),
                        encoding="utf-8")


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
    """The first gate of a run: it starts the GX context and Data Docs afresh, so
    data/reports/docs holds this data version's two validations (earlier runs' pages live
    on their MLflow runs)."""
    for stale in ("docs", "gx"):
        shutil.rmtree(reports / stale, ignore_errors=True)
    load = lambda db: load_sqlite(db, "raw", RAW_COLUMNS, map(_raw_record, iter_jsonl(snapshot)))  # noqa: E731
    return run_suite("raw_snapshot", "raw", load, raw_expectations(cfg), reports / "raw_validation.json", docs)


def validate_cleaned(cleaned: Path, cfg: QualityConfig, clean: CleanConfig, split: SplitConfig,
                     reports: Path, docs: bool = True) -> QualityResult:
    """`cleaned` is clean()'s clean.jsonl; its quarantine.jsonl beside it gives the rows each
    source lost, for the per-source floor."""
    quarantine = cleaned.parent / "quarantine.jsonl"

    def load(db: Path) -> int:
        lost = ((q.get("src") or q.get("source"), q.get("category")) for q in iter_jsonl(quarantine)) \
            if quarantine.exists() else ()
        load_sqlite(db, "quarantined", QUARANTINED_COLUMNS, lost)
        return load_sqlite(db, "cleaned", CLEANED_COLUMNS, (_cleaned_record(r, split) for r in iter_jsonl(cleaned)))

    return run_suite("cleaned", "cleaned", load, cleaned_expectations(cfg, clean, split),
                     reports / "cleaned_validation.json", docs)


def gate_raw(snapshot: Path, cfg: QualityConfig, reports: Path) -> QualityResult:
    return _raise_if_failed(validate_raw(snapshot, cfg, reports), snapshot)


def gate_cleaned(cleaned: Path, cfg: QualityConfig, clean: CleanConfig, split: SplitConfig,
                 reports: Path) -> QualityResult:
    return _raise_if_failed(validate_cleaned(cleaned, cfg, clean, split, reports), cleaned)
