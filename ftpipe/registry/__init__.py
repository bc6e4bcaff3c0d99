"""The MLflow registry: runs, versions registered once, the promotion gate and its lock, manual
promotion and rollback; aliases only, every move recorded."""
