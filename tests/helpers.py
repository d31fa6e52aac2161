"""Small shared test utilities (random inputs, tolerances, jit switch)."""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np


@contextlib.contextmanager
def fast_compiles():
  """Skips XLA's optimization passes: for tests that compile many tiny programs once each
  (finite-difference gradient checks, hypothesis shapes), where optimizing costs more than
  running. The operations are the same, only not fused."""
  previous = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  try:
    yield
  finally:
    jax.config.update("jax_disable_most_optimizations", previous)


def rand(shape, seed=0, dtype=np.float32, loc=0.0, spread=1.0):
  rng = np.random.default_rng(seed)
  return (loc + spread * rng.standard_normal(shape)).astype(dtype)


def as_dtype(x, dtype):
  """A jnp array of `dtype` and the float64 values it really holds (for the reference)."""
  xj = jnp.asarray(x, dtype=dtype)
  return xj, np.asarray(xj.astype(jnp.float32), dtype=np.float64)


def tolerance(dtype):
  """(rtol, atol) for a normalized output of this dtype versus float64."""
  if jnp.dtype(dtype) == jnp.bfloat16:
    return 1e-2, 2e-2
  if jnp.dtype(dtype) == jnp.float16:
    return 2e-3, 4e-3
  return 2e-5, 2e-5


def maybe_jit(fn, use_jit):
  return jax.jit(fn) if use_jit else fn
