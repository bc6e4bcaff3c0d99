"""Promotion by hand, rollback and the listing of versions (`ftpipe promote`, `ftpipe
rollback`, `ftpipe models`), each move recorded in the registry.
"""

from __future__ import annotations

from typing import Callable

from ftpipe import names as t
from ftpipe.config import RegistryConfig
from ftpipe.registry import store as registry
from ftpipe.registry.lock import PromotionLock


def manual_promote(reg: RegistryConfig, version: str, reason: str, by: str | None = None,
                   log: Callable[[str], None] = print) -> dict:
    """`ftpipe promote VERSION --reason`: an override of the gate, recorded with its reason
    (history tag, version tags and description, and a record in the version's run)."""
    if not reason or not reason.strip():
        raise registry.RegistryError("a manual promotion needs --reason \"...\" (it is recorded)")
    mv = _get_version(reg.model_name, version)
    with PromotionLock(reg.model_name, holder=f"manual promote of v{version}",
                                timeout_s=reg.promotion.lock_timeout_s, log=log):
        current = registry.version_by_alias(reg.model_name, registry.CHAMPION)
        previous = current.version if current else None
        if previous == str(version):
            raise registry.RegistryError(f"{reg.model_name} v{version} is already champion")
        event = registry.record_champion(reg.model_name, str(version), "manual", reason.strip(), previous, by)
    gate_said = (mv.tags or {}).get(t.DECISION, "none")
    registry.tag_version(reg.model_name, str(version), {
        t.DECISION: "manual-promote", t.MANUAL_REASON: reason.strip(),
        t.MANUAL_BY: event["by"], t.MANUAL_AT: event["at"], t.GATE_DECISION: gate_said},
        description=f"Manual promotion by {event['by']} at {event['at']}: {reason.strip()} "
                    f"(gate had said: {gate_said}). " + (mv.description or ""))
    if mv.run_id:
        registry.log_dict_artifact(mv.run_id, event | {"gate_decision": gate_said},
                                   f"promotion/manual-{event['at'].replace(':', '')}.json")
    return event


def rollback(reg: RegistryConfig, reason: str = "", by: str | None = None,
             log: Callable[[str], None] = print) -> dict:
    """`ftpipe rollback`: the champion goes back to the one before it, recorded."""
    with PromotionLock(reg.model_name, holder="rollback", timeout_s=reg.promotion.lock_timeout_s, log=log):
        current = registry.version_by_alias(reg.model_name, registry.CHAMPION)
        if current is None:
            raise registry.RegistryError(f"{reg.model_name} has no champion to roll back")
        stack = registry.champion_stack(registry.champion_history(reg.model_name))
        if stack and stack[-1] == current.version:
            stack = stack[:-1]
        stack = [v for v in stack if v != current.version]
        if not stack:
            raise registry.RegistryError(f"{reg.model_name}: v{current.version} is champion and there is "
                                         "no earlier champion to roll back to")
        target = stack[-1]
        event = registry.record_champion(reg.model_name, target, "rollback",
                                         reason.strip() or f"rollback from v{current.version}",
                                         current.version, by)
    registry.tag_version(reg.model_name, current.version, {t.ROLLED_BACK: event["at"]})
    return event


def _get_version(name: str, version: str):
    from mlflow.exceptions import MlflowException

    try:
        return registry.client().get_model_version(name, str(version))
    except MlflowException:
        known = sorted(int(v.version) for v in registry.versions(name))   # int from SQLite, str over REST
        listed = ("…, " if len(known) > 20 else "") + ", ".join(map(str, known[-20:]))
        raise registry.RegistryError(f"{name} has no version {version} (versions: {listed or 'none yet'})") from None


def list_models(reg: RegistryConfig, limit: int | None = None) -> list[dict]:
    """The newest `limit` versions (all when None), newest first: aliases, the primary metric
    on the named test set it was scored on beside the champion's on the same set, the gate's
    decision and the rule that decided (registry_rest.version_row)."""
    from mlflow.exceptions import MlflowException

    m = reg.promotion.primary_metric
    # search results carry no aliases: the registered model has them all
    try:
        alias_map = registry.client().get_registered_model(reg.model_name).aliases or {}
    except MlflowException:
        return []
    by_version: dict[str, list[str]] = {}
    for alias, v in alias_map.items():
        by_version.setdefault(str(v), []).append(alias)
    from ftpipe.registry.rest import name_test_sets, version_row

    rows = [version_row(mv.version, mv.creation_timestamp, mv.tags or {}, by_version.get(str(mv.version), []),
                        mv.run_id, m)
            for mv in (registry.newest_versions(reg.model_name, limit) if limit else registry.versions(reg.model_name))]
    return name_test_sets(rows, lambda sha: min(int(v.version) for v in registry.versions_tagged(
        reg.model_name, {t.TEST_SET: sha})))
