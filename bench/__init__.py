"""Benchmarks and evaluation harnesses run against a built livefuse (not part of the package)."""
