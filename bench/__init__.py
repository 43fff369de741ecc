"""Benchmarks with their method and results (see bench/README.md)."""
