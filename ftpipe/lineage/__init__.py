"""Lineage: the immutable record of what a version came from, its audit, and the reverse queries
of a deletion request."""
