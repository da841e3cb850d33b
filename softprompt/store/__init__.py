"""Thousands of tasks on one base: named, versioned artifacts (core.py) in SQLite or PostgreSQL with
blobs on disk or in an object store (backends/), and their compiled KV prefixes cached per base and
dtype (compiled.py)."""
