"""Data: sources read row by row, collected, cleaned (PII, limits, duplicates), split, checked by
Great Expectations and versioned by DVC; nothing lost, every rejected row quarantined."""
