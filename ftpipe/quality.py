"""The data-quality gate: a Great Expectations 1.x suite on the raw snapshot.

GX owns the verdict; this module only states the expectations and writes the result
(JSON) under data/reports/. A failing gate raises `QualityGateFailed` whose message is a
table of the failed expectations with their observed values.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from ftpipe.config import QualityConfig


class QualityGateFailed(RuntimeError):
    def __init__(self, message: str, report: str, failed: list[dict]):
        super().__init__(message)
        self.report = report
        self.failed = failed


@dataclass(frozen=True)
class QualityResult:
    success: bool
    report: str
    evaluated: int
    failed: list[dict]


def raw_expectations(cfg: QualityConfig):
    import great_expectations.expectations as gxe

    mostly = 1.0 - cfg.max_bad_fraction
    # GX's `mostly` must be > 0; a max_bad_fraction of 1 means "no limit".
    mostly = max(mostly, 1e-9)
    return [
        gxe.ExpectTableRowCountToBeBetween(min_value=cfg.min_rows),
        gxe.ExpectColumnToExist(column="instruction"),
        gxe.ExpectColumnToExist(column="output"),
        # Unusable rows of any kind (unparseable, no instruction, no output) counted together:
        # the limit is on their sum, not on each column separately.
        gxe.ExpectColumnValuesToBeNull(column="_unusable", mostly=mostly),
        # Parse failures: `_error` is set on rows that were not valid JSON objects.
        gxe.ExpectColumnValuesToBeNull(column="_error", mostly=mostly),
        gxe.ExpectColumnValuesToNotBeNull(column="instruction", mostly=mostly),
        gxe.ExpectColumnValuesToNotBeNull(column="output", mostly=mostly),
        gxe.ExpectColumnValueLengthsToBeBetween(column="output", min_value=1,
                                                max_value=cfg.max_chars, mostly=mostly),
        gxe.ExpectColumnValueLengthsToBeBetween(column="instruction", min_value=1,
                                                max_value=cfg.max_chars, mostly=mostly),
    ]


def _observed(result: dict) -> str:
    res = result.get("result") or {}
    if "observed_value" in res:
        return str(res["observed_value"])
    if "unexpected_percent" in res:
        return (f"{res.get('unexpected_count', 0)} of {res.get('element_count', '?')} rows "
                f"({res['unexpected_percent']:.2f}%) unexpected")
    return json.dumps(res)[:120]


def validate_snapshot(snapshot: Path, cfg: QualityConfig, report_path: Path) -> QualityResult:
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx
    import pandas as pd

    df = pd.read_json(snapshot, lines=True, dtype=False) if snapshot.stat().st_size else pd.DataFrame()
    if "_error" not in df.columns:
        df["_error"] = None  # no parse errors at all: the column is simply absent
    if len(df):
        missing = df["_error"].notna()
        for col in ("instruction", "output"):
            missing |= df[col].isna() if col in df.columns else True
        df["_unusable"] = missing.map(lambda bad: "unusable" if bad else None)
    else:
        df["_unusable"] = None
    from great_expectations.data_context.types.base import ProgressBarsConfig

    ctx = gx.get_context(mode="ephemeral")
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False)
    batch_def = (ctx.data_sources.add_pandas("snapshot")
                 .add_dataframe_asset("raw")
                 .add_batch_definition_whole_dataframe("all"))
    suite = ctx.suites.add(gx.ExpectationSuite(name="raw_snapshot"))
    for exp in raw_expectations(cfg):
        suite.add_expectation(exp)
    vd = ctx.validation_definitions.add(gx.ValidationDefinition(name="raw", data=batch_def, suite=suite))
    result = vd.run(batch_parameters={"dataframe": df}, result_format="SUMMARY")
    doc = result.to_json_dict()
    report_path.parent.mkdir(parents=True, exist_ok=True)
    report_path.write_text(json.dumps(doc, indent=2, sort_keys=True, default=str) + "\n")
    failed = []
    for r in doc["results"]:
        if not r["success"]:
            cfg_ = r["expectation_config"]
            kwargs = {k: v for k, v in cfg_["kwargs"].items() if k != "batch_id"}
            failed.append({"expectation": cfg_["type"], "kwargs": kwargs, "observed": _observed(r)})
    return QualityResult(bool(doc["success"]), str(report_path), len(doc["results"]), failed)


def format_failures(failed: list[dict]) -> str:
    lines = [f"{'expectation':45} {'column':12} observed"]
    for f in failed:
        lines.append(f"{f['expectation']:45} {str(f['kwargs'].get('column', '')):12} {f['observed']}")
    return "\n".join(lines)


def gate(snapshot: Path, cfg: QualityConfig, report_path: Path) -> QualityResult:
    """Validate and raise with the failure table if the gate fails."""
    result = validate_snapshot(snapshot, cfg, report_path)
    if not result.success:
        raise QualityGateFailed(
            f"data quality gate failed on {snapshot} ({len(result.failed)} of "
            f"{result.evaluated} expectations); report: {report_path}\n"
            + format_failures(result.failed), str(report_path), result.failed)
    return result
