"""Secrets stay where they are. A password in a database URL is written as ${VAR} in
params.yaml (expanded only at connect time) and refused as a literal: the config is logged
to MLflow and handed to Prefect as a flow parameter, so a literal would travel. Text the
pipeline prints or stores goes through redact(): URL passwords and the values of
secret-looking environment variables become ***."""

from __future__ import annotations

import os
import re

_URL_PASSWORD = re.compile(r"(?P<head>[a-zA-Z][a-zA-Z0-9+.\-]*://[^:/@\s]*:)(?P<pw>[^@\s/]+)(?P<at>@)")
_SECRET_NAME = re.compile(r"(TOKEN|SECRET|PASSWORD|PASSWD|API_?KEY|ACCESS_KEY|PRIVATE_KEY|CREDENTIALS?)", re.I)
_VAR = re.compile(r"^\$(\{[A-Za-z_][A-Za-z0-9_]*\}|[A-Za-z_][A-Za-z0-9_]*)$")


def literal_password(url: str | None) -> bool:
    """True when the URL carries a password that is not a $VAR / ${VAR} reference."""
    m = _URL_PASSWORD.search(url or "")
    return bool(m) and not _VAR.match(m.group("pw"))


def secret_values(environ: dict[str, str] | None = None) -> list[str]:
    """Values of environment variables whose names say they are secrets (8+ characters)."""
    env = os.environ if environ is None else environ
    return sorted({v for k, v in env.items() if _SECRET_NAME.search(k) and len(v) >= 8}, key=len, reverse=True)


def redact(text: str, environ: dict[str, str] | None = None) -> str:
    text = _URL_PASSWORD.sub(lambda m: m.group("head") + "***" + m.group("at"), text)
    for value in secret_values(environ):
        text = text.replace(value, "***")
    return text
