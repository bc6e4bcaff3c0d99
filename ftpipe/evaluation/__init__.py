"""Evaluation: base, candidate and champion scored on the same test sets (loss and generation
metrics, per slice), and the reports a reviewer reads."""
