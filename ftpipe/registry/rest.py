"""The read path of `ftpipe models` against an MLflow tracking server, over its REST API
with `requests` alone: importing mlflow takes ~2 s on 2 cores, more than the listing of a
1,000-version registry. Writes always go through MLflow's client (ftpipe.registry.store)."""

from __future__ import annotations

import json
import os
import time
from typing import Callable

from ftpipe import names as t
from ftpipe.registry.promotion import Decision


def version_row(version: str, created_ms: int, tags: dict, aliases: list[str], run_id: str,
                metric: str) -> dict:
    """One line of `ftpipe models`: aliases; the primary metric on the test set the version
    was scored on, beside the score of the champion it was compared with on that same set
    (a version's own number says nothing next to another one's on another set); the gate
    decision, `why` (the rule that decided) and the full `summary` and `reasons`. The
    test set is named by name_test_sets."""
    num = lambda key: float(tags[key]) if key in tags else None  # noqa: E731
    try:   # a tag is cut at 5,000 characters: a cut list reads as none (decision.json has it whole)
        reasons = json.loads(tags.get(t.DECISION_REASONS, "[]"))
    except ValueError:
        reasons = []
    decision = Decision.from_dict({"promote": all(r["passed"] for r in reasons), "reasons": reasons})
    manual = tags.get(t.MANUAL_REASON) and f"manual: {tags[t.MANUAL_REASON]}"
    compared = tags.get(t.CHAMPION_COMPARED)
    return {
        "version": str(version), "aliases": sorted(aliases),
        "created": time.strftime("%Y-%m-%d %H:%M", time.gmtime(int(created_ms) / 1000)),
        "method": tags.get(t.METHOD, ""),
        "test_set": "", "test_set_sha256": tags.get(t.TEST_SET, ""),
        metric: num(t.METRIC + metric),
        "champion_compared": None if compared in (None, "none") else compared,
        f"champion_{metric}": num(t.CHAMPION_METRIC + metric),
        "forgetting": num(t.FORGETTING), "decision": tags.get(t.DECISION, ""),
        "why": manual or (decision.why() if reasons else tags.get(t.DECISION_SUMMARY, "")),
        "summary": manual or tags.get(t.DECISION_SUMMARY) or (decision.summary() if reasons else ""),
        "reasons": reasons,
        "run_id": run_id,
    }


def name_test_sets(rows: list[dict], first_version: Callable[[str], int]) -> list[dict]:
    """Name each row's test set as the gate names regression sets: vN:<sha256[:12]>, N the
    first version scored on it (first_version(sha), asked once per set)."""
    names: dict[str, str] = {}
    for r in rows:
        sha = r["test_set_sha256"]
        if sha and sha not in names:
            names[sha] = f"v{first_version(sha)}:{sha[:12]}"
        r["test_set"] = names.get(sha, "")
    return rows


def _get(uri: str, path: str, params: dict) -> dict | None:
    import requests

    auth, headers = None, {}
    if os.environ.get("MLFLOW_TRACKING_TOKEN"):
        headers["Authorization"] = f"Bearer {os.environ['MLFLOW_TRACKING_TOKEN']}"
    elif os.environ.get("MLFLOW_TRACKING_USERNAME"):
        auth = (os.environ["MLFLOW_TRACKING_USERNAME"], os.environ.get("MLFLOW_TRACKING_PASSWORD", ""))
    verify = os.environ.get("MLFLOW_TRACKING_INSECURE_TLS", "").lower() != "true"
    r = requests.get(f"{uri.rstrip('/')}/api/2.0/mlflow/{path}", params=params, headers=headers, auth=auth,
                     verify=verify, timeout=60)
    if r.status_code == 404 and "RESOURCE_DOES_NOT_EXIST" in r.text:
        return None
    r.raise_for_status()
    return r.json()


def list_models(uri: str, name: str, metric: str, limit: int) -> tuple[list[dict], list[dict]]:
    """(the newest `limit` versions as version_row()s, the champion history)."""
    rm = _get(uri, "registered-models/get", {"name": name})
    if rm is None:
        return [], []
    model = rm["registered_model"]
    by_version: dict[str, list[str]] = {}
    for a in model.get("aliases", []):
        by_version.setdefault(str(a["version"]), []).append(a["alias"])
    tags = {x["key"]: x["value"] for x in model.get("tags", [])}
    history = json.loads(tags.get(t.HISTORY, "[]"))
    found = _get(uri, "model-versions/search", {"filter": f"name='{name}'", "max_results": limit,
                                                "order_by": "version_number DESC"}) or {}
    rows = [version_row(mv["version"], mv.get("creation_timestamp", 0), {x["key"]: x["value"] for x in mv.get("tags", [])},
                        by_version.get(str(mv["version"]), []), mv.get("run_id", ""), metric)
            for mv in found.get("model_versions", [])]

    def first_version(sha: str) -> int:
        first = _get(uri, "model-versions/search", {"filter": f"name='{name}' and tags.`{t.TEST_SET}` = '{sha}'",
                                                    "max_results": 1, "order_by": "version_number ASC"})
        return int(first["model_versions"][0]["version"])

    return name_test_sets(rows, first_version), history
