"""What a sweep shows: the leaderboard (a table for the terminal, CSV and HTML for the run)
and Optuna's plots (optimisation history, parallel coordinates, parameter importances,
intermediate values) as PNGs."""

from __future__ import annotations

import base64
import csv
import html
import json
import warnings
from pathlib import Path

import optuna

from ftpipe.names import fmt


def _value(v) -> str:
    return fmt(v) if v is not None else "—"


def _param(v, precise: bool) -> str:
    return f"{v:.4g}" if isinstance(v, float) and not precise else str(v)


def table_rows(rows: list[dict], precise: bool = False) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the leaderboard; float parameters to 4 significant digits unless precise (the CSV)."""
    keys = sorted({k for r in rows for k in r["params"]})
    header = ["trial", "state", "value", *keys, "seconds", "note"]
    body = []
    for r in rows:
        note = (f"retry of {r['retry_of']}; " if r.get("retry_of") is not None else "") + (r.get("message") or "")
        body.append([str(r["trial"]), r["state"], _value(r["shown"]),
                     *[_param(r["params"].get(k, ""), precise) for k in keys],
                     f"{r['seconds']:.0f}" if r.get("seconds") is not None else "", note[:120]])
    return header, body


def write_csv(rows: list[dict], path: Path) -> Path:
    header, body = table_rows(rows, precise=True)
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(body)
    return path


def plots(study: optuna.Study, out: Path) -> dict[str, Path | str]:
    """Each plot as a PNG, or why it could not be drawn (too few finished trials, one parameter)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as vis

    out.mkdir(parents=True, exist_ok=True)
    made: dict[str, Path | str] = {}
    for name, draw in (("optimization_history", vis.plot_optimization_history),
                       ("parallel_coordinate", vis.plot_parallel_coordinate),
                       ("param_importances", vis.plot_param_importances),
                       ("intermediate_values", vis.plot_intermediate_values)):
        try:
            with warnings.catch_warnings():     # Optuna's notes on flat or few trials: the page says what is drawn
                warnings.simplefilter("ignore")
                ax = draw(study)
            fig = (ax.flat[0] if hasattr(ax, "flat") else ax).get_figure()
            fig.set_size_inches(8, 4.5)
            fig.tight_layout()
            fig.savefig(out / f"{name}.png", dpi=90)
            plt.close(fig)
            made[name] = out / f"{name}.png"
        except Exception as exc:   # noqa: BLE001 - a plot Optuna cannot draw yet is reported, not fatal
            plt.close("all")
            made[name] = f"not drawn: {type(exc).__name__}: {str(exc)[:200]}"
    return made


def write_html(study_name: str, storage_shown: str, objective: str, rows: list[dict],
               drawn: dict[str, Path | str], best: dict | None, path: Path) -> Path:
    header, body = table_rows(rows)
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>sweep " + html.escape(study_name) +
             "</title><style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}</style></head><body>",
             f"<h1>Sweep {html.escape(study_name)}</h1>",
             f"<p>Objective: {html.escape(objective)} on the validation split. Storage: "
             f"<code>{html.escape(storage_shown)}</code>.</p>"]
    if best:
        parts.append(f"<p><b>Best: trial {best['trial']}</b>, {html.escape(objective)} = {_value(best['value'])}, "
                     f"<code>{html.escape(json.dumps(best['params']))}</code></p>")
    parts.append("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>" +
                 "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in body) +
                 "</table>")
    for name, what in drawn.items():
        parts.append(f"<h2>{name.replace('_', ' ')}</h2>")
        if isinstance(what, Path):
            data = base64.b64encode(what.read_bytes()).decode()
            parts.append(f"<img src='data:image/png;base64,{data}'>")
        else:
            parts.append(f"<p>{html.escape(what)}</p>")
    parts.append("</body></html>")
    path.write_text("\n".join(parts), encoding="utf-8")
    return path
