"""Benchmarks that print a ratio against a baseline measured side by side in one run."""
