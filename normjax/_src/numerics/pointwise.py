"""Elementwise pieces of today's layers: the zero-centered and per-example scale factors, the
SiLU gate, dynamic tanh, and the L2 normalization of activations.

- Every factor is formed in at least float32 (`stats_dtype`), whatever the parameter dtype: a
  bfloat16 `1 + w` rounds a small `w` away.
- The results are cast to the input's dtype once, at the end.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from normjax._src.numerics.moments import stats_dtype
from normjax._src.shapes import Axes


def offset_scale(scale: jax.Array, offset: float) -> jax.Array:
  """`offset + scale` in at least float32 (`scale` unchanged for a zero offset)."""
  if offset == 0.0:
    return scale
  return scale.astype(stats_dtype(scale.dtype)) + offset


def silu(z: jax.Array) -> jax.Array:
  """`z * sigmoid(z)` in at least float32."""
  z = z.astype(stats_dtype(z.dtype))
  return z * jax.nn.sigmoid(z)


def dynamic_tanh(x: jax.Array, alpha: jax.Array, scale: jax.Array | None,
                 bias: jax.Array | None) -> jax.Array:
  """`tanh(alpha * x) * scale + bias` in at least float32, returned in `x.dtype` (`scale` and
  `bias` broadcast-shaped against `x`, `alpha` a scalar)."""
  dtype = stats_dtype(x.dtype)
  y = jnp.tanh(alpha.astype(dtype) * x.astype(dtype))
  if scale is not None:
    y = y * scale.astype(dtype)
  if bias is not None:
    y = y + bias.astype(dtype)
  return y.astype(x.dtype)


def l2_normalize(x: jax.Array, axes: Axes, eps: Any) -> jax.Array:
  """`x / max(||x||, eps)` over `axes` in at least float32, returned in `x.dtype`.

  - A zero vector stays zero, with finite derivatives (the norm's square root is taken only of
    non-zero sums, so its derivative at zero is not `inf * 0`).
  - A NaN in the vector gives a NaN vector (the NaN norm is kept, not floored to `eps`).
  """
  dtype = stats_dtype(x.dtype)
  v = x.astype(dtype)
  square = jnp.sum(v * v, axis=axes, keepdims=True)
  zero = square == 0
  norm = jnp.where(zero, jnp.zeros((), dtype),
                   jnp.sqrt(jnp.where(zero, jnp.ones((), dtype), square)))
  floor = jnp.maximum(norm, jnp.asarray(eps, dtype))   # NaN stays NaN
  return (v / jnp.where(floor == 0, jnp.ones((), dtype), floor)).astype(x.dtype)
