"""Benchmarks of the real training step: throughput, MFU, memory, time split, scaling across processes."""
