"""An audit as people read it: the chain as a tree for the terminal, and a
self-contained HTML report.
"""

from __future__ import annotations

import html

from ftpipe.lineage.audit import Audit


def tree_lines(a: Audit) -> list[str]:
    mark = {True: "ok", False: "BROKEN"}
    by = {link.name: link for link in a.links}

    def m(name):
        link = by.get(name)
        return "" if link is None else f"  [{mark[link.ok] if not (link.ok and link.warning) else 'unverified'}]"

    lines = [f"{a.model['name']} v{a.model['version']}" + (f" ({', '.join(a.model['aliases'])})" if a.model['aliases'] else "")
             + f"  registered {a.model['created']}" + m("lineage record"),
             f"└── run {a.run['id']} ({a.run['name']}, {a.run['status']})",
             f"    ├── code: git {a.code['git_commit']}" + (" (dirty)" if a.code["dirty"] else "") + m("code"),
             f"    ├── config: {a.config['hash']}" + m("config"),
             f"    ├── base model: {a.base_model['id']} @ {a.base_model['revision']}",
             f"    ├── trained from: {a.base_model.get('start_from', 'scratch')}",
             "    ├── data version (DVC)"]
    if a.trained_on.get("sha256"):
        lines.insert(-1, f"    ├── trained on: {a.trained_on['file']}, {a.trained_on['rows']} rows, "
                         f"sha256 {a.trained_on['sha256'][:16]}…" + m("training file"))
    for i, d in enumerate(a.data):
        last = i == len(a.data) - 1
        lines.append(f"    │   {'└' if last else '├'}── {d['key']}: {d['md5']} ({len(d['files'])} files)" + m(f"data {d['key']}"))
    lines.append("    ├── GX: " + a.gx.get("verdict", ""))
    for name in ("raw_validation", "cleaned_validation"):
        lines.append(f"    │   {'└' if name == 'cleaned_validation' else '├'}── {name}" + m(f"gx {name}"))
    lines.append("    ├── sources")
    for i, s in enumerate(a.sources):
        lines.append(f"    │   {'└' if i == len(a.sources) - 1 else '├'}── {s['path']}  {s['size'] or '?'} bytes, "
                     f"{s['rows'] if s['rows'] is not None else '?'} rows, sha256 {s['sha256'][:16]}…" + m(f"source {s['path']}"))
    q = a.quarantine
    lines.append(f"    ├── quarantine: {q.get('quarantined', '?')} of {q.get('read', '?')} rows"
                 + (f" ({', '.join(f'{k}: {n}' for k, n in sorted((q.get('reasons') or {}).items()))})" if q.get("reasons") else "")
                 + m("quarantine summary"))
    if a.behaviour:
        lines.append("    ├── gated by behaviour suites")
        for i, b in enumerate(a.behaviour):
            lines.append(f"    │   {'└' if i == len(a.behaviour) - 1 else '├'}── {b['path']}  {b['cases']} cases, "
                         f"sha256 {b['sha256'][:16]}…" + ("" if b["state"] == "ok" else f" ({b['state']} since)"))
    lines.append(f"    └── Prefect flow run: {a.prefect_flow_run['id']} {a.prefect_flow_run['state']}" + m("prefect flow run"))
    return lines


def html_report(a: Audit) -> str:
    e = html.escape
    rows = "".join(f"<tr class='{'ok' if l.ok else 'bad'}{' warn' if l.ok and l.warning else ''}'><td>{e(l.name)}</td>"
                   f"<td>{'unverified' if l.ok and l.warning else ('ok' if l.ok else 'BROKEN')}</td><td>{e(l.detail)}</td></tr>"
                   for l in a.links)
    srcs = "".join(f"<tr><td>{e(s['path'])}</td><td>{e(str(s['size']))}</td><td>{e(str(s['rows']))}</td>"
                   f"<td><code>{e(s['sha256'])}</code></td><td>{e(s['state'])}</td></tr>" for s in a.sources)
    data = "".join(f"<tr><td>{e(d['key'])}</td><td><code>{e(d['md5'])}</code></td><td>{'<br>'.join(e(f) for f in d['files'])}</td>"
                   f"<td>{d['in_cache']}/{d['objects']}</td><td>{'—' if d['in_remote'] is None else str(d['in_remote']) + '/' + str(d['objects'])}</td></tr>"
                   for d in a.data)
    q = a.quarantine
    reasons = "".join(f"<tr><td>{e(k)}</td><td>{n}</td></tr>" for k, n in sorted((q.get("reasons") or {}).items()))
    verdict = "Chain whole: every link verified." if a.ok else f"{len(a.broken)} broken link(s)."
    return f"""<!doctype html><html><head><meta charset="utf-8">
<title>Lineage audit: {e(a.model['name'])} v{e(a.model['version'])}</title>
<style>body{{font:14px system-ui,sans-serif;margin:2em;max-width:1100px}}table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}}tr.bad td{{background:#fdd}}
tr.warn td{{background:#ffe}}.verdict{{font-size:1.2em;font-weight:bold;color:{'#060' if a.ok else '#a00'}}}
pre{{background:#f6f6f6;padding:1em;overflow:auto}}</style></head><body>
<h1>Lineage audit: {e(a.model['name'])} v{e(a.model['version'])}</h1>
<p class="verdict">{e(verdict)}</p>
<p>Audited {e(a.audited_at)} in <code>{e(a.project)}</code>.</p>
<p>Aliases: {e(', '.join(a.model['aliases']) or 'none')} · registered {e(a.model['created'])} ·
run <code>{e(a.run['id'])}</code> ({e(a.run['status'])}) · lineage read from the {e(a.record)}</p>
<h2>Chain</h2><pre>{e(chr(10).join(tree_lines(a)))}</pre>
<h2>Verification</h2><table><tr><th>link</th><th>status</th><th>detail</th></tr>{rows}</table>
<h2>Code and configuration</h2><table>
<tr><td>git commit</td><td><code>{e(a.code['git_commit'])}</code>{' (uncommitted changes at training time)' if a.code['dirty'] else ''}</td></tr>
<tr><td>config hash</td><td><code>{e(a.config['hash'])}</code></td></tr>
<tr><td>base model</td><td>{e(a.base_model['id'])} @ <code>{e(a.base_model['revision'])}</code></td></tr>
<tr><td>Prefect flow run</td><td><code>{e(a.prefect_flow_run['id'])}</code> {e(a.prefect_flow_run['state'])}</td></tr></table>
<h2>Data version (DVC)</h2><table><tr><th>output</th><th>md5</th><th>files</th><th>cache</th><th>remote</th></tr>{data}</table>
<h2>Great Expectations</h2><p>{e(a.gx.get('verdict', ''))}</p>
<h2>Sources</h2><table><tr><th>path</th><th>bytes</th><th>rows</th><th>sha256</th><th>now</th></tr>{srcs}</table>
<h2>Quarantine</h2><p>{e(str(q.get('quarantined', '?')))} of {e(str(q.get('read', '?')))} rows quarantined, {e(str(q.get('kept', '?')))} kept.</p>
<table><tr><th>reason</th><th>rows</th></tr>{reasons}</table>
<p><small>Generated by <code>ftpipe lineage</code>. Self-contained: no external resources.</small></p>
</body></html>
"""
