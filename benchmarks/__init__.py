"""Benchmarks that print tables; results and the commands that made them are in RESULTS.md."""
