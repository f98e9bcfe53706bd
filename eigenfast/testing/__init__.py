"""Slow, obvious reference implementations that tests and benchmarks check eigenfast against."""
