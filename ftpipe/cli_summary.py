"""The run summary printed at the end of `ftpipe run` (rich tables)."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from ftpipe.names import METRICS, SLICE_METRICS
from ftpipe.names import fmt as _fmt
from ftpipe.secrets import redact


def print_summary(result, console: Console | None = None) -> None:
    console = console or Console()
    r, d = result, result.data
    data = Table(title="Data", show_header=False, title_justify="left")
    data.add_column(style="bold")
    data.add_column()
    for key, md5 in sorted(d.hashes.items()):
        data.add_row(f"DVC {key}", md5)
    for f in d.manifest.get("files", []):
        data.add_row(f"file {f['path']}", f"{f['rows']} rows ({f['format']}), {f['size']:,} bytes, "
                     f"sha256 {f['sha256'][:12]}…")
    for sk in d.manifest.get("skipped", []):
        data.add_row(f"skipped {sk['path']}", sk["why"])
    c = d.clean_report
    data.add_row("rows", f"read {c['read']} = kept {c['kept']} + quarantined {c['quarantined']}")
    if c.get("reasons"):
        data.add_row("quarantine reasons", ", ".join(f"{k}: {v}" for k, v in sorted(c["reasons"].items())))
        data.add_row("quarantine file", "data/cleaned/quarantine.jsonl (source, line, reason, row)")
    pii = (c.get("pii") or {}).get("found") or {}
    if pii:
        data.add_row(f"PII ({c['pii']['policy']})", ", ".join(f"{k}: {v}" for k, v in sorted(pii.items())))
    splits = d.split_counts.get("splits", {})
    data.add_row("splits", ", ".join(f"{k} {v}" for k, v in splits.items()))
    for q in (d.raw, d.cleaned):
        data.add_row(f"GX {q.suite}", f"{'passed' if q.success else 'FAILED'} ({q.evaluated} "
                     f"expectations on {q.rows} rows; {q.report})")
    if d.cleaned.docs:
        data.add_row("GX Data Docs", d.cleaned.docs)
    data.add_row("DVC remote", f"pushed to '{d.pushed}'" if d.pushed else "not pushed (data.push: false)")
    console.print(data)

    per = Table(title="Rows per source (read = kept + quarantined)", title_justify="left")
    for col in ("source", "read", "kept", "quarantined", "train rows (weight)"):
        per.add_column(col, justify="left" if col == "source" else "right")
    mix = d.split_counts.get("train_mix", {})
    for name, n in sorted(c.get("per_source", {}).items()):
        m = mix.get(name, {})
        per.add_row(name, str(n.get("read", 0)), str(n.get("kept", 0)), str(n.get("quarantined", 0)),
                    f"{m.get('train_rows', 0)} (x{m.get('weight', 1.0):g})" if m else "—")
    console.print(per)
    data = Table(title="Training", show_header=False, title_justify="left")
    data.add_column(style="bold")
    data.add_column()
    data.add_row("training", f"train loss {_fmt(r.candidate.train_loss)}, val loss {_fmt(r.candidate.val_loss)}, "
                 f"{r.candidate.seconds:.0f}s")
    console.print(data)

    rep = r.report
    metrics = Table(title=f"Test set: {rep.candidate.n_examples} examples ({rep.test_set})",
                    title_justify="left")
    metrics.add_column("model")
    cols = METRICS[:5]
    for name in cols:
        metrics.add_column(name, justify="right")
    rows = [("base", rep.base), ("candidate", rep.candidate)]
    if rep.champion is not None:
        rows.append((f"champion (v{rep.champion_version})", rep.champion))
    for label, s in rows:
        m = s.metrics()
        metrics.add_row(label, *(_fmt(m[k]) for k in cols))
    console.print(metrics)
    if rep.candidate_regression:
        reg = Table(title="Earlier test sets (regression)", title_justify="left")
        for col in ("set", "rows", "candidate", "champion"):
            reg.add_column(col)
        m = r.cfg.registry.promotion.primary_metric
        for sid, s in rep.candidate_regression.items():
            champ = rep.champion_regression.get(sid)
            reg.add_row(sid, str(s.n_examples), _fmt(s.metrics().get(m)), _fmt(champ.metrics().get(m)) if champ else "—")
        console.print(reg)
    if rep.candidate.slices:
        sl = Table(title="Candidate per slice", title_justify="left")
        for col in ("slice", "n", *SLICE_METRICS):
            sl.add_column(col)
        for name, v in sorted(rep.candidate.slices.items()):
            sl.add_row(name, str(int(v["n"])), *(_fmt(v[k]) for k in SLICE_METRICS))
        console.print(sl)

    p = r.promotion
    gate = Table(title=f"Promotion gate: {p.decision.verdict.upper()} "
                 f"{r.cfg.registry.model_name} v{p.version}", title_justify="left")
    gate.add_column("rule")
    gate.add_column("ok")
    gate.add_column("detail")
    for reason in p.decision.reasons:
        gate.add_row(reason.rule, "[green]yes[/]" if reason.passed else "[red]no[/]", reason.detail)
    console.print(gate)
    console.print(f"model version [bold]{r.cfg.registry.model_name} v{p.version}[/] aliases: "
                  f"{', '.join(p.aliases) or '—'}; champion: "
                  f"{'v' + p.champion_after if p.champion_after else '—'} "
                  f"(was {'v' + p.champion_before if p.champion_before else '—'})")
    console.print(f"MLflow run {r.run_id} in experiment '{r.cfg.registry.experiment}' at {redact(r.tracking_uri)}")
    console.print("Open the UI:  make ui   (or .venv/bin/python mlflow/launch.py; then http://127.0.0.1:5000)")
