"""The registry-wide promotion lock: only one flow moves `champion` at a time, across
processes and machines that share the tracking server.
"""

from __future__ import annotations

from ftpipe.registry.store import RegistryError, client

LOCK_SUFFIX = "--promotion-lock"


class PromotionLock:
    """A registry-wide mutex for moving `champion`: a registered model named
    NAME--promotion-lock, created atomically by the store (names are unique), deleted on
    release. Works across processes and machines that share the tracking server. A lock
    older than `timeout_s` (its holder crashed) is broken, and the log says so."""

    def __init__(self, name: str, holder: str, timeout_s: int = 600, wait_s: float | None = None,
                 log=lambda msg: None):
        self.lock_name, self.holder, self.timeout_s = name + LOCK_SUFFIX, holder, timeout_s
        self.wait_s = timeout_s + 30 if wait_s is None else wait_s
        self.log = log

    def __enter__(self) -> "PromotionLock":
        import time

        from mlflow.exceptions import MlflowException

        c = client()
        deadline = time.time() + self.wait_s
        while True:
            try:
                c.create_registered_model(self.lock_name, tags={"ftpipe.holder": self.holder,
                                                                "ftpipe.since": f"{time.time():.3f}"},
                                          description="ftpipe promotion lock: held while a flow moves "
                                                      "the champion alias; removed when it is done")
                return self
            except MlflowException as exc:
                if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
            try:
                held = c.get_registered_model(self.lock_name)
                since = float(held.tags.get("ftpipe.since", "0"))
                if time.time() - since > self.timeout_s:
                    self.log(f"breaking a stale promotion lock held by {held.tags.get('ftpipe.holder')} "
                             f"for {time.time() - since:.0f} s")
                    c.delete_registered_model(self.lock_name)
                    continue
            except MlflowException:
                continue  # released between our attempts
            if time.time() > deadline:
                raise RegistryError(f"the promotion lock {self.lock_name} is held by "
                                    f"{held.tags.get('ftpipe.holder')}; gave up after {self.wait_s:.0f} s")
            time.sleep(0.25)

    def __exit__(self, *exc) -> None:
        from mlflow.exceptions import MlflowException

        try:
            client().delete_registered_model(self.lock_name)
        except MlflowException:
            pass
