"""Session fixtures; the helpers they use live in tests/helpers.py."""
from tests.helpers import prefect_server, tiny, tiny_base  # noqa: F401  (session fixtures)
