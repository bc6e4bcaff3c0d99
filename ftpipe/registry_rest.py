"""The read path of `ftpipe models` against an MLflow tracking server, over its REST API
with `requests` alone: importing mlflow takes ~2 s on 2 cores, more than the listing of a
1,000-version registry. Writes always go through MLflow's client (ftpipe.registry)."""

from __future__ import annotations

import os
import time


def version_row(version: str, created_ms: int, tags: dict, aliases: list[str], run_id: str,
                metric: str) -> dict:
    """One line of `ftpipe models`: aliases, key metrics, the gate decision and its summary."""
    num = lambda key: float(tags[key]) if key in tags else None  # noqa: E731
    return {
        "version": str(version), "aliases": sorted(aliases),
        "created": time.strftime("%Y-%m-%d %H:%M", time.gmtime(int(created_ms) / 1000)),
        "method": tags.get("ftpipe.method", ""),
        metric: num(f"ftpipe.metric.{metric}"), "eval_loss": num("ftpipe.metric.eval_loss"),
        "forgetting": num("ftpipe.forgetting"), "decision": tags.get("ftpipe.decision", ""),
        "summary": tags.get("ftpipe.manual.reason") and f"manual: {tags['ftpipe.manual.reason']}"
        or tags.get("ftpipe.decision.summary", ""),
        "run_id": run_id,
    }


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
    import json

    rm = _get(uri, "registered-models/get", {"name": name})
    if rm is None:
        return [], []
    model = rm["registered_model"]
    by_version: dict[str, list[str]] = {}
    for a in model.get("aliases", []):
        by_version.setdefault(str(a["version"]), []).append(a["alias"])
    tags = {t["key"]: t["value"] for t in model.get("tags", [])}
    history = json.loads(tags.get("ftpipe.champion_history", "[]"))
    found = _get(uri, "model-versions/search", {"filter": f"name='{name}'", "max_results": limit,
                                                "order_by": "version_number DESC"}) or {}
    rows = [version_row(mv["version"], mv.get("creation_timestamp", 0), {t["key"]: t["value"] for t in mv.get("tags", [])},
                        by_version.get(str(mv["version"]), []), mv.get("run_id", ""), metric)
            for mv in found.get("model_versions", [])]
    return rows, history
