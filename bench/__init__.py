"""Benchmarks: each `python -m bench.NAME` prints a table and, LAST, one JSON line of figures."""
