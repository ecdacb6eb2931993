"""Throughput benchmark configs (experiments/benchmark_throughput.py): cpu.py and gpu.py."""
