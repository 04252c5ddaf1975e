"""Benchmark harness: contenders run on the same corpus in one process and one run."""
