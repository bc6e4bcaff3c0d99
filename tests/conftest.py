"""Session fixtures (their helpers live in tests/helpers.py), each worker's share of the cores,
and the order modules start in."""
import os

from tests.helpers import once_per_session, start_session_server, stop_session_server
from tests.helpers import prefect_server, tiny, tiny_base, trained  # noqa: F401  (session fixtures)

# The modules that take longest start first, so the last one to finish is a short one
# (pytest-xdist --dist loadfile --no-loadscope-reorder hands modules out in this order, two
# to each worker at the start: the third is short, so the default pipeline's worker takes
# little else while it trains).
FIRST = ("test_default_pipeline", "test_incremental", "test_real_architectures", "test_config", "test_sweep", "test_feedback_loop", "test_dpo", "test_mlflow_and_disk", "test_prefect_store",
         "test_crash_and_concurrency", "test_lineage", "test_registry_server", "test_data_pipeline",
         "test_security", "test_retrain_flow", "test_trial_defects", "test_data_docs")


def pytest_configure(config):
    """Each pytest-xdist worker, and every process it starts (ftpipe run, DVC stages, torchrun),
    gets its share of the cores: torch in two processes that each assumed it owned both cores
    ran 2.3x slower (STACK.md). Set here, not at import: a worker learns the count only now."""
    worker = getattr(config, "workerinput", None)
    if worker is None:   # the session (or its controller): one DVC cache for every project (make_project)
        import tempfile

        os.environ.setdefault("FTPIPE_TEST_DVC_CACHE", tempfile.mkdtemp(prefix="ftpipe-test-dvc-cache-"))
        # the base cache of adapter versions (ftpipe.registry.bases): the session's, not ~/.cache
        os.environ.setdefault("FTPIPE_CACHE", tempfile.mkdtemp(prefix="ftpipe-test-cache-"))
        # what the workers share: the session's Prefect server and trained project (tests/helpers.py)
        os.environ.setdefault("FTPIPE_TEST_SHARED", tempfile.mkdtemp(prefix="ftpipe-test-shared-"))
        from pathlib import Path

        shared = Path(os.environ["FTPIPE_TEST_SHARED"])
        once_per_session("prefect-server", lambda: start_session_server(shared))   # it starts beside the workers
    else:
        from ftpipe import cores

        os.environ.setdefault("OMP_NUM_THREADS", str(max(1, cores.available() // worker["workercount"])))


def pytest_unconfigure(config):
    if getattr(config, "workerinput", None) is None:
        import shutil

        from pathlib import Path

        if "ftpipe-test-" in os.environ.get("FTPIPE_TEST_SHARED", ""):
            stop_session_server(Path(os.environ["FTPIPE_TEST_SHARED"]))
        for var in ("FTPIPE_TEST_DVC_CACHE", "FTPIPE_CACHE", "FTPIPE_TEST_SHARED"):
            if var in os.environ and "ftpipe-test-" in os.environ[var]:
                shutil.rmtree(os.environ[var], ignore_errors=True)


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(FIRST)}
    items.sort(key=lambda item: rank.get(item.module.__name__.rsplit(".", 1)[-1], len(FIRST)))
