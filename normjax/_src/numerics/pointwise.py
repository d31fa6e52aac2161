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
import numpy as np

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
  return tanh_affine(tanh_of(x, alpha), scale, bias, x.dtype)


def tanh_of(x: jax.Array, alpha: jax.Array) -> jax.Array:
  """`tanh(alpha * x)` in at least float32 (`stats_dtype`), left in that dtype."""
  dtype = stats_dtype(x.dtype)
  return jnp.tanh(alpha.astype(dtype) * x.astype(dtype))


def tanh_affine(t: jax.Array, scale: jax.Array | None, bias: jax.Array | None,
                dtype: Any) -> jax.Array:
  """`t * scale + bias` in `t`'s dtype (either left out where None), returned in `dtype`."""
  y = t
  if scale is not None:
    y = y * scale.astype(t.dtype)
  if bias is not None:
    y = y + bias.astype(t.dtype)
  return y.astype(dtype)


def l2_normalize(x: jax.Array, axes: Axes, eps: Any) -> jax.Array:
  """`x / max(||x||, eps)` over `axes` in at least float32, returned in `x.dtype`.

  - The norm is Blue's: three sums of squares in one read, of the large elements scaled down,
    the medium ones as they are and the small ones scaled up (by powers of two, exact), so
    that the sum of squares neither overflows (a plain float32 one does above |x| ~ 1.8e19,
    and `x / inf` gave 0) nor underflows (below ~1e-19 each square flushes to 0).
  - A zero vector stays zero, with finite derivatives (every square root is taken only of
    non-zero sums, so no derivative is `inf * 0`).
  - A NaN in the vector gives a NaN vector (the NaN norm is kept, not floored to `eps`).
  """
  dtype = stats_dtype(x.dtype)
  v = x.astype(dtype)
  big, small, down, up = _blue_constants(dtype)
  a = jnp.abs(v)
  zero = jnp.zeros((), dtype)
  total = lambda w: jnp.sum(w, axis=axes, keepdims=True)
  is_big, is_small = a > big, a < small
  # Each element squared in its own sum only (zero elsewhere before the square: an unselected
  # `inf` square would make its derivative `inf * 0`).
  only = lambda where, scale: jnp.square(jnp.where(where, v, zero) * scale)
  s_big = total(only(is_big, down))
  s_small = total(only(is_small, up))
  s_mid = total(only(~(is_big | is_small), 1))   # NaN lands here (compares False)
  one = jnp.ones((), dtype)
  root = lambda s: jnp.sqrt(jnp.where(s > 0, s, one))
  # The norm and `x` at the scale of the largest non-empty sum, `k * norm` and `k * x` (the
  # smaller sums folded in at that scale, by `down` twice rather than its square, which
  # float32 cannot represent; what underflows there is below its rounding). Dividing at that
  # scale keeps `1 / norm` normal: XLA divides by a reciprocal, and `1 / 1.5e38` is subnormal
  # (flushed to zero on CPU), which gave 0 for a vector of norm 1.5e38.
  k = jnp.where(s_big > 0, down, jnp.where(s_mid > 0, one, up))
  scaled = jnp.where(s_big > 0, root(s_big + (s_mid * down) * down),
                     jnp.where(s_mid > 0, root(s_mid + (s_small / up) / up),
                               jnp.where(s_small > 0, root(s_small), zero)))
  scaled = jnp.where(jnp.isnan(s_mid), s_mid, scaled)   # `root` would have made a NaN sum 1
  floor = jnp.maximum(scaled, jnp.asarray(eps, dtype) * k)   # NaN stays NaN
  return ((v * k) / jnp.where(floor == 0, one, floor)).astype(x.dtype)


def _blue_constants(dtype: Any) -> tuple[Any, ...]:
  """`(big, small, down, up)` for Blue's norm in `dtype`: elements above `big` are scaled by
  `down` and below `small` by `up` before squaring (float32: 2**50, 2**-50, 2**-80, 2**80), so
  that a square is at most `2**(maxexp - 32)` (sums of 2**31 of them stay finite) and the
  scaled small squares stay normal."""
  e = jnp.finfo(dtype).maxexp // 2
  two = lambda k: np.asarray(2.0, dtype) ** k
  return two(e - 14), two(14 - e), two(-(e + 16)), two(e + 16)
