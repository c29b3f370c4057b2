"""Benchmarks of revoke-relay: `python -m bench.run` (see bench/README.md)."""
