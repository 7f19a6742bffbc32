"""Benchmarks: fused kernels vs pure-PyTorch references vs peers. Run ``python -m benchmarks``."""
