"""`ftpipe data status`: the current data version, what changed since the champion's data
version (rows added and removed, by row content hash), and whether the DVC remote holds
each version."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ftpipe import names as t
from ftpipe.config import PipelineConfig
from ftpipe.data.versions import (
    DATA_STAGES,
    Store,
    dvc_lock_hashes,
    remote_of,
    split_rows,
    workspace_changes,
)
from ftpipe.files import iter_jsonl


@dataclass(frozen=True)
class DataStatus:
    current: dict[str, str]                  # "stage:path" -> md5 (dvc.lock)
    workspace_changes: dict                  # dvc status: {} when data/ matches dvc.lock
    rows: int | None                         # examples in the current splits
    champion: str | None                     # "NAME vN"
    champion_data: dict[str, str] = field(default_factory=dict)
    added: int | None = None                 # rows in the current data, not the champion's
    removed: int | None = None               # rows the champion saw that are gone now
    storage: dict[str, dict] = field(default_factory=dict)  # md5 -> {"cache", "remote"}
    remote: dict[str, str] = field(default_factory=dict)    # {"name", "url"}: where versions are pushed
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True, default=str)


def _workspace_rows(root: Path) -> set[str]:
    splits = [root / "data/splits" / f"{name}.jsonl" for name in ("train", "validation", "test")]
    return {r["_hash"] for p in splits if p.is_file() for r in iter_jsonl(p)}


def data_status(cfg: PipelineConfig, root: Path) -> DataStatus:
    from ftpipe.lineage.record import (
        recorded_tags,  # every data stage output is in the record
    )
    from ftpipe.registry import store as registry

    notes: list[str] = []
    current = dvc_lock_hashes(root, list(DATA_STAGES))
    changes = workspace_changes(root) if current else {}
    if not current:
        notes.append("no data version yet (dvc.lock has no data stages): run `ftpipe run`")
    registry.setup(cfg.registry, root)
    champ = registry.version_by_alias(cfg.registry.model_name, registry.CHAMPION)
    if champ is None:
        notes.append(f"no champion yet for {cfg.registry.model_name}")
        champion_data = {}
    else:
        tags = recorded_tags(registry.client(), champ.name, champ.version)
        champion_data = t.under(tags, t.DVC)
    dvc = Store(root, cfg.data.remote)
    try:
        rows = lambda md5: set(found) if md5 and (found := split_rows(dvc, md5)) is not None else None  # noqa: E731
        cur_rows = rows(current.get(t.SPLITS_OUTPUT))
        if cur_rows is None and current.get(t.SPLITS_OUTPUT) and not changes:
            cur_rows = _workspace_rows(root)
        champ_md5 = champion_data.get(t.SPLITS_OUTPUT)
        champ_rows = rows(champ_md5)
        if champ_md5 and champ_rows is None:
            notes.append("the champion's data/splits is in neither the DVC cache nor the remote: rows cannot be "
                         "compared")
        added = removed = None
        if champ_rows is not None and cur_rows is not None:
            added, removed = len(cur_rows - champ_rows), len(champ_rows - cur_rows)
        storage = {md5: dvc.presence(md5) for md5 in sorted(set(current.values()) | set(champion_data.values()))
                   if md5}
    finally:
        dvc.close()
    return DataStatus(current, changes, len(cur_rows) if cur_rows is not None else None,
                      f"{champ.name} v{champ.version}" if champ else None, champion_data,
                      added, removed, storage, remote_of(root, cfg.data.remote), notes)


def print_status(st: DataStatus) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    t = Table(title="Data versions (DVC)", title_justify="left")
    for col in ("output", "current", "champion", "local cache", "remote"):
        t.add_column(col)
    yes = lambda v: "—" if v is None else ("[green]yes[/]" if v else "[red]no[/]")  # noqa: E731
    for key in sorted(set(st.current) | set(st.champion_data)):
        cur, ch = st.current.get(key, ""), st.champion_data.get(key, "")
        for md5, label in ((cur, "current"), (ch, "champion")):
            if not md5 or (label == "champion" and md5 == cur):
                continue
            s = st.storage.get(md5, {})
            t.add_row(key, md5 if label == "current" else ("same" if ch == cur else ""),
                      md5 if label == "champion" else ("same" if ch == cur else "—"),
                      yes(s.get("cache")), yes(s.get("remote")))
    console.print(t)
    console.print(f"DVC remote: {st.remote['name']} -> {st.remote['url']}" if st.remote else
                  "DVC remote: none configured (`dvc remote add -d NAME URL`)")
    console.print(f"workspace: {'matches dvc.lock' if not st.workspace_changes else 'differs from dvc.lock: ' + json.dumps(st.workspace_changes)}")
    console.print(f"examples in current splits: {st.rows if st.rows is not None else '?'}")
    if st.champion:
        diff = (f"+{st.added} added, -{st.removed} removed" if st.added is not None else "unknown")
        console.print(f"since the champion ({st.champion}): {diff}")
    for n in st.notes:
        console.print(f"note: {n}")
