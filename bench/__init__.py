"""Benchmarks: side by side with the baselines in one process; JSON + PNG into bench/results/."""
