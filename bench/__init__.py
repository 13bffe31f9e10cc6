"""Benchmarks: each script runs on its own (see README, "Benchmarks")."""
