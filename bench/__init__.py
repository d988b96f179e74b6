"""Benchmarks of ``reliable``, each beside the raw floor of its database.

Run from the repository root: ``python -m bench.core`` (``--quick`` for a short run).
They print figures and write ``bench/results/*.json``; ``docs/benchmarks.md`` quotes them.
"""
