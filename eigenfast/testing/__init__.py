"""Slow, obvious reference implementations that the fast paths are tested and benchmarked against."""
