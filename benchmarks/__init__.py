"""Benchmarks and the PyTorch baseline the JAX implementation is compared against."""
