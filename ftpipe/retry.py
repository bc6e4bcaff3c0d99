"""Which failures are worth retrying. Prefect does the retrying (tasks that talk to MLflow,
DVC remotes or the artifact store get `retries` with back-off, see tasks/io.py); this only
tells a transient I/O failure (a tracking server restarting, a dropped connection, a locked
SQLite file) from a deterministic one (a bad config, a missing model, a full disk), which is
never retried: the same input would fail the same way."""

from __future__ import annotations

import errno

# Substrings of the messages MLflow / requests / SQLAlchemy give for failures that pass.
_TRANSIENT = ("max retries exceeded", "connection refused", "connection aborted", "connection reset",
              "read timed out", "timed out", "remote end closed", "temporarily unavailable",
              "database is locked", "server closed the connection", "failed to establish a new connection",
              "error code 502", "error code 503", "error code 504", "error code 500",
              "503 server error", "502 server error", "504 server error", "500 server error")
# ...and for failures that will not pass by waiting.
_PERMANENT = ("no space left on device", "disk quota exceeded", "file too large")


def chain(exc: BaseException) -> list[BaseException]:
    """The exception and everything it was raised from or during."""
    out, seen = [], set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        out.append(exc)
        exc = exc.__cause__ or exc.__context__
    return out


def disk_full(exc: BaseException) -> bool:
    return any(isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
               or any(p in str(e).lower() for p in _PERMANENT) for e in chain(exc))


def is_transient(exc: BaseException) -> bool:
    """True for a failure a retry can cure: lost connections, timeouts, 5xx answers, a locked
    database. False for everything else, and always for a full disk or quota."""
    if disk_full(exc):
        return False
    for e in chain(exc):
        if isinstance(e, (ConnectionError, TimeoutError)):
            return True
        name = type(e).__name__
        if name in ("ConnectionError", "ConnectTimeout", "ReadTimeout", "MaxRetryError", "NewConnectionError",
                    "ProtocolError", "ChunkedEncodingError"):
            return True
        if any(t in str(e).lower() for t in _TRANSIENT):
            return True
    return False
