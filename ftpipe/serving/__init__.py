"""Serving: the pyfunc model every registered version stores, so MLflow loads and serves it."""
