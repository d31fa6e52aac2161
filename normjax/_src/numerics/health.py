"""The health of a normalization's input: which statistics rows are ill-conditioned,
dominated by `eps`, constant or non-finite (`nj.norm_health`).

- Mean and variance per row are taken in at least float32 with two passes (the variance about
  the mean, so that an ill-conditioned row is measured, not garbled).
- A row with a NaN or Inf counts as non-finite and in no other field.
- A row with no counted element (fully masked) has variance 0: constant and `eps`-dominated.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from normjax._src.numerics.moments import stats_dtype
from normjax._src.shapes import Axes

# `mean**2 > ILL * var`: a one-pass variance `E[x^2] - E[x]^2` loses `log10(mean**2 / var)`
# digits, four of float32's seven here.
ILL = 1e4


def row_health(x: jax.Array, axes: Axes, eps: Any,
               mask: jax.Array | None) -> tuple[jax.Array, ...]:
  """`(ill_conditioned, eps_dominated, constant, nonfinite)`: float32 fractions of the rows."""
  dtype = stats_dtype(x.dtype)
  v = x.astype(dtype)
  keep = (lambda a: a) if mask is None else (lambda a: jnp.where(mask, a, jnp.zeros((), dtype)))
  counted = (jnp.ones_like(v) if mask is None else mask.astype(dtype))
  n = jnp.sum(counted, axis=axes, keepdims=True)
  safe_n = jnp.maximum(n, jnp.ones((), dtype))
  finite_row = jnp.all(jnp.isfinite(v) | (counted == 0), axis=axes, keepdims=True)
  clean = jnp.where(jnp.isfinite(v), v, jnp.zeros((), dtype))
  mean = jnp.sum(keep(clean), axis=axes, keepdims=True) / safe_n
  d = keep(clean - mean)
  var = jnp.sum(d * d, axis=axes, keepdims=True) / safe_n

  rows = max(finite_row.size, 1)   # static; no row at all gives 0 everywhere

  def fraction(flag: jax.Array) -> jax.Array:
    return jnp.sum(flag.astype(jnp.float32)) / rows
  ill = (var > 0) & (mean * mean > jnp.asarray(ILL, dtype) * var) & finite_row
  small = (var < jnp.asarray(eps, dtype)) & finite_row
  constant = (var == 0) & finite_row
  return fraction(ill), fraction(small), fraction(constant), fraction(jnp.logical_not(finite_row))
