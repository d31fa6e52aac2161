"""Kernels: primitives defined by the numerics, with per-platform lowerings in one table."""
