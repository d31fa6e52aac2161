"""Small shared test utilities (random inputs, tolerances, jit switch)."""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest


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


def slow_except(values, *fast, unpack=False):
  """`values` for `pytest.mark.parametrize`, each one not among `fast` marked `slow`: the default
  run (`-m "not slow"`, pyproject.toml) keeps the representative cases `fast`, CI runs them all.
  `unpack`: each value is a tuple of several argument values."""
  def slow(value):
    return pytest.param(*(value if unpack else (value,)), marks=pytest.mark.slow)
  is_fast = lambda value: any(value is f or _same(value, f) for f in fast)
  missing = [f for f in fast if not any(f is v or _same(v, f) for v in values)]
  assert not missing, f"slow_except: {missing} not among the values"
  return [value if is_fast(value) else slow(value) for value in values]


def _same(a, b):
  try:
    return bool(type(a) is type(b) and a == b)
  except (TypeError, ValueError):   # arrays and the like
    return False


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
