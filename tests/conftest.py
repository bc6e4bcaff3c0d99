"""Session fixtures; the helpers they use live in tests/helpers.py."""
from tests.helpers import prefect_server  # noqa: F401  (a session fixture)
