"""The one core of normjax: moments over a set of axes, and the normalize step.

Every variant (batch, layer, RMS, instance, group norm, ...) is a configuration of the two
functions here: which axes are reduced, and which shape the scale, bias and statistics take.

Numerics:
  * Statistics are accumulated in `promote_types(x.dtype, float32)` (float32 for bf16/fp16/f32
    input, float64 for float64 input) and the output is cast back to `x.dtype`.
  * The default variance is a shifted two-pass scheme: a first pass finds a shift `K` (the
    plain mean, held constant for differentiation); the second sums `d = x - K` and `d**2`;
    `var = E[d**2] - E[d]**2` then cancels nothing significant because `E[d]` is tiny. The
    normalize step subtracts `K` and `E[d]` separately, so `1e5 + N(0, 1)` in float32 comes
    out as accurate as the input allows (no rounding of the mean to a float32 near 1e5).
  * `fast_variance=True` is the one-pass `E[x**2] - E[x]**2`: one read less, but it loses
    `log10(mean**2 / var)` digits (it is garbage for `1e4 + N(0, 1)` in float32).
  * Variance is clamped at zero; empty (fully masked) groups count as one element, so they give
    mean 0, variance 0 and a finite output and gradient.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from normjax import _axes


class Moments(NamedTuple):
  """Statistics of `x` over the reduced axes, each with the reduced axes kept as size 1.

  The mean is split as `mean = shift + offset`, where `shift` is a constant reference value
  (`None` when there is none) and `offset` is small when the shift is good.
  """
  shift: jax.Array | None   # [..] stop-gradient reference value, or None (zero)
  offset: jax.Array | None  # [..] mean - shift, or None for uncentered (RMS) statistics
  var: jax.Array            # [..] biased variance (or mean square when offset is None)
  count: jax.Array          # [..] number of elements counted, a float

  @property
  def mean(self) -> jax.Array:
    """The mean, `shift + offset` (zero for uncentered statistics)."""
    if self.offset is None:
      return jnp.zeros_like(self.var)
    return self.offset if self.shift is None else self.shift + self.offset


def stats_dtype(dtype: Any) -> jnp.dtype:
  """The dtype statistics are computed in: at least float32."""
  # The lattice lookup itself must not depend on the user's `jax_numpy_dtype_promotion`:
  # under "strict", promote_types(bfloat16, float32) raises although no array is promoted here.
  with jax.numpy_dtype_promotion("standard"):
    return jnp.promote_types(dtype, jnp.float32)


def _total(values: Any, axes: _axes.Axes, axis_name: Any, axis_index_groups: Any) -> Any:
  """Sums a pytree of arrays over `axes` (kept) and, if given, over the named axis."""
  sums = jax.tree.map(lambda v: jnp.sum(v, axis=axes, keepdims=True), values)
  if axis_name is not None:
    sums = lax.psum(sums, axis_name, axis_index_groups=axis_index_groups)
  return sums


def moments(x: jax.Array, axes: _axes.Axes, *, mask: jax.Array | None = None,
            axis_name: Any = None, axis_index_groups: Any = None,
            fast_variance: bool = False, centered: bool = True) -> Moments:
  """Mean and biased variance of `x` over `axes` (and over the named axis, if given).

  Args:
    x: input of any floating dtype.
    axes: canonical (sorted, non-negative) axes to reduce over; may be empty when all the
      reduction happens across `axis_name`.
    mask: optional bool array of `x.shape`; only True elements count.
    axis_name: a mapped/sharded axis to reduce over as well (count-weighted: sums and counts
      are psum'd, never per-device means).
    axis_index_groups: groups of devices along `axis_name` to reduce within.
    fast_variance: use the one-pass `E[x^2] - E[x]^2` (less accurate, see module doc).
    centered: False gives the mean square (for RMS norm) in `var` and no mean.

  Returns:
    `Moments` whose arrays have `x.ndim` dims, size 1 along `axes`, in `stats_dtype(x.dtype)`.
  """
  dtype = stats_dtype(x.dtype)
  x = x.astype(dtype)
  keep = lambda v: v if mask is None else jnp.where(mask, v, jnp.zeros((), dtype))
  if mask is None:
    local_count = jnp.asarray(_axes.reduced_size(x.shape, axes), dtype)
    count = _total(local_count, (), axis_name, axis_index_groups)
  else:
    count = _total(mask.astype(dtype), axes, axis_name, axis_index_groups)
  safe_count = jnp.maximum(count, jnp.ones((), dtype))
  total = lambda v: _total(v, axes, axis_name, axis_index_groups)

  if not centered:
    mean_square = total(keep(x * x)) / safe_count
    return Moments(shift=None, offset=None, var=mean_square, count=count)
  if fast_variance:
    s1, s2 = total((keep(x), keep(x * x)))
    mean = s1 / safe_count
    var = jnp.maximum(s2 / safe_count - mean * mean, jnp.zeros((), dtype))
    return Moments(shift=None, offset=mean, var=var, count=count)
  # Shifted two-pass: the result does not depend on `shift`, so it is held constant.
  shift = lax.stop_gradient(total(keep(x)) / safe_count)
  d = keep(x - shift)
  s1, s2 = total((d, d * d))
  offset = s1 / safe_count
  var = jnp.maximum(s2 / safe_count - offset * offset, jnp.zeros((), dtype))
  return Moments(shift=shift, offset=offset, var=var, count=count)


def normalize(x: jax.Array, stats: Moments, scale: jax.Array | None, bias: jax.Array | None,
              eps: float) -> jax.Array:
  """`(x - mean) * rsqrt(var + eps) * scale + bias`, computed in float32+, cast to `x.dtype`.

  Args:
    x: input.
    stats: `Moments` broadcastable against `x` (same rank). Uncentered moments (`offset` None)
      give `x * rsqrt(mean_square + eps) * scale + bias`.
    scale: optional multiplier, same rank as `x` (broadcastable).
    bias: optional offset, same rank as `x` (broadcastable).
    eps: added to the variance.

  Returns:
    Array of `x.shape` and `x.dtype`.
  """
  dtype = stats_dtype(x.dtype)
  y = x.astype(dtype)
  if stats.shift is not None:
    y = y - stats.shift
  if stats.offset is not None:
    y = y - stats.offset
  factor = lax.rsqrt(stats.var + jnp.asarray(eps, dtype))
  if scale is not None:
    factor = factor * scale.astype(dtype)
  y = y * factor
  if bias is not None:
    y = y + bias.astype(dtype)
  return y.astype(x.dtype)
