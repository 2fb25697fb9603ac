"""Benchmarks: step latency, speculation, multi-SLO workload replay."""
