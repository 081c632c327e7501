"""Benchmarks of lte-fed: `make bench` (python -m benchmarks.run) and the memory probe."""
