"""Which registered version answers a request, loaded once: an alias (champion, challenger),
a version number, or a models:/ URI, each resolved to its version in the registry and
assembled as every loader does (adapter on its stored base, or the full weights)."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from typing import Callable

from ftpipe.data.formatting import request_prompt as prompt_text
from ftpipe.serving.app import Loaded


def resolver(model_name: str, load_limit: int = 3, alias_ttl_s: float = 2.0) -> Callable[[str], Loaded]:
    """resolve(model) for the app: 'champion' / 'challenger' / any alias, '3', or models:/NAME/...;
    a LookupError names what is not in the registry. Loaded versions are kept (the last
    load_limit); an alias is looked up again after alias_ttl_s, so one that moves is followed
    within that time without a registry query per request."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from ftpipe.evaluation.generation import generate

    lock, cache, looked_up = threading.Lock(), OrderedDict(), {}
    client = mlflow.MlflowClient()

    def version_of(model: str) -> str:
        spec = model.removeprefix(f"models:/{model_name}").lstrip("/@") if model.startswith("models:/") else model
        seen = looked_up.get(spec)
        if seen and time.monotonic() - seen[0] < alias_ttl_s:
            return seen[1]
        try:
            if spec.isdigit():
                version = str(client.get_model_version(model_name, spec).version)
            else:
                version = str(client.get_model_version_by_alias(model_name, spec).version)
        except MlflowException as exc:
            raise LookupError(f"{model!r} is not a version or alias of {model_name} in the registry") from exc
        looked_up[spec] = (time.monotonic(), version)
        return version

    loading: dict[str, threading.Lock] = {}

    def load(version: str) -> Loaded:
        uri = f"models:/{model_name}/{version}"
        inner = mlflow.pyfunc.load_model(uri).unwrap_python_model()
        m, tok = inner.model, inner.tokenizer
        return Loaded(uri, version, lambda rows, n: generate(m, tok, [prompt_text(r, tok) for r in rows], n),
                      lambda row: prompt_text(row, tok))

    def resolve(model: str) -> Loaded:
        version = version_of(model)
        with lock:                                   # a loaded version answers at once
            if version in cache:
                cache.move_to_end(version)
                return cache[version]
            one = loading.setdefault(version, threading.Lock())
        with one:                                    # one load per version; others' requests go on
            with lock:
                if version in cache:
                    return cache[version]
            loaded = load(version)
            with lock:
                cache[version] = loaded
                while len(cache) > load_limit:       # the least recently used goes
                    cache.popitem(last=False)
            return loaded

    return resolve


def version_checker(model_name: str) -> Callable[[str], bool]:
    """version_exists(version) for feedback: False once the version is deleted from the registry."""
    import mlflow
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient()

    def exists(version: str) -> bool:
        try:
            client.get_model_version(model_name, str(version))
            return True
        except MlflowException:
            return False

    return exists


def page_status(model_name: str, tracking_uri: str, ui: str = "http://127.0.0.1:5000") -> Callable[[], dict]:
    """status() for the page: the aliases and the versions they point at, the newest gate
    decision with its reasons, and a link to that version in MLflow's UI (the tracking server
    when it is one, else `make ui`'s address)."""
    import json

    import mlflow
    from mlflow.exceptions import MlflowException

    from ftpipe import names as t

    client = mlflow.MlflowClient()
    base = tracking_uri.rstrip("/") if tracking_uri.startswith(("http://", "https://")) else ui

    def status() -> dict:
        try:
            aliases = dict(client.get_registered_model(model_name).aliases)
        except MlflowException:
            return {"model": model_name, "aliases": {}, "decision": None, "link": None}
        decision = None
        for mv in client.search_model_versions(f"name='{model_name}'", max_results=20,
                                               order_by=["version_number DESC"]):
            if t.DECISION in mv.tags:
                try:
                    reasons = json.loads(mv.tags.get(t.DECISION_REASONS, "[]"))
                except ValueError:
                    reasons = []
                decision = {"version": mv.version, "verdict": mv.tags[t.DECISION], "reasons": reasons}
                break
        shown = decision["version"] if decision else aliases.get("champion")
        link = f"{base}/#/models/{model_name}/versions/{shown}" if shown else None
        return {"model": model_name, "aliases": aliases, "decision": decision, "link": link}

    return status
