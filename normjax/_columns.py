"""Per-channel moments from one read of the input (batch/instance/group norm, NHWC and NCHW).

XLA:CPU computes `sum(x)` and `sum(x**2)` with two reads of `x` (see
benchmarks/OPTIMIZATION_LOG.md). When `_core.moments` reduces one contiguous block of axes
with channels after it (batch norm over N, H, W; instance and group norm over H, W of NHWC
input), without a mask or a named axis, it views `x` as `[batch, positions, channels]` and
calls `column_moments_p`: per `(batch, channel)`, `shift` (the float32 rounding of the mean,
held constant for differentiation), `offset = mean(x - shift)` and the biased variance.
Channels-first input whose reduced axes end the shape (batch norm over N, H, W and group norm
over H, W of NCHW input) is viewed as `[outer, channels, positions]` instead, and
`row_moments_p` gives the same statistics per row `(outer, channel)`, pooled over `outer` for
batch norm. Group norm's channel groups are pooled by both (`_pool`). On CPU with the native
library each is one kernel call (normjax/_native/rows.cc); elsewhere its `jax.numpy`
definition. The normalize step and the derivatives stay in `_core` (XLA fuses them with their
neighbours).

Accuracy: the kernels accumulate in cache-sized blocks, two passes over each block and Chan's
merge of the blocks in double, so the variance is as accurate as float64 rounds it to float32
whatever the data order (an outlier first, a large mean) and length. The `jax.numpy`
definitions take two passes (the mean, then the sums of `x - shift`) and pool entries with
Chan's formula, never by re-shifting one entry's sums to another's shift.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.interpreters import batching

from normjax import _rows

_F32 = jnp.dtype(jnp.float32)


def block_view(x: jax.Array, axes: tuple[int, ...]) -> tuple[int, int, int] | None:
  """`(batch, positions, channels)` if `axes` are one contiguous block of `x`'s axes with at
  least one axis after it (so `x` is `[batch, positions, channels]` row-major), else None."""
  if not axes or tuple(axes) != tuple(range(axes[0], axes[-1] + 1)) or axes[-1] >= x.ndim - 1:
    return None
  return (math.prod(x.shape[:axes[0]]), math.prod(x.shape[axes[0]:axes[-1] + 1]),
          math.prod(x.shape[axes[-1] + 1:]))


def _constant(mean):
  """A float32 mean as a shift: held constant for differentiation, and rounded to one bit less
  than float32 (`reduce_precision`, as `_core.moments` does) so that XLA, which recomputes it
  inside the normalize fusion (`x * (1/n)` contracted into an FMA there), gets the same value
  as the one the statistics were taken about (without it: 4e-4 error at 1e4 + N(0, 1))."""
  return lax.stop_gradient(lax.reduce_precision(mean, exponent_bits=8, mantissa_bits=22))


def _stats(x, axis):
  """`(shift, offset, var)` of float32 `x` over `axis`, two-pass: shift = mean(x) (see
  `_constant`), offset = mean(x - shift) (tiny, but it carries the derivative of the mean) and
  var = mean((x - shift)**2) - offset**2, clamped at zero (NaN kept)."""
  shift = _constant(jnp.mean(x, axis=axis))
  d = x - jnp.expand_dims(shift, axis)
  offset = jnp.mean(d, axis=axis)
  var = jnp.maximum(jnp.mean(d * d, axis=axis) - offset * offset, jnp.zeros((), _F32))
  return shift, offset, var


def _pool(shift, offset, var, size):
  """`[batch, entries]` statistics, each of the same number of elements, pooled over groups of
  `size` consecutive entries (Chan's formula for equal counts), held by every entry of the
  group: with K the group's average shift (held constant), each entry's mean is
  `e = (shift - K) + offset` about K (`shift - K` is exact for close shifts), the group's
  offset is mean(e) and its variance mean(var) + mean((e - offset)**2)."""
  batch, entries = shift.shape
  grouped = (batch, entries // size, size)
  shift, offset, var = (v.reshape(grouped) for v in (shift, offset, var))
  k = _constant(jnp.mean(shift, axis=2, keepdims=True))
  e = (shift - k) + offset
  pooled_offset = jnp.mean(e, axis=2, keepdims=True)
  pooled_var = (jnp.mean(var, axis=2, keepdims=True)
                + jnp.mean(jnp.square(e - pooled_offset), axis=2, keepdims=True))
  per_entry = lambda v: jnp.broadcast_to(v, grouped).reshape(batch, entries)
  return per_entry(k), per_entry(pooled_offset), per_entry(pooled_var)


def _moments_reference(x, *, group_size):
  stats = _stats(x.astype(_F32), 1)
  if group_size > 1:
    return _pool(*stats, group_size)
  return stats


def _moments_abstract(x, *, group_size):
  del group_size
  per_channel = jax.core.ShapedArray((x.shape[0], x.shape[2]), _F32)
  return [per_channel] * 3


column_moments_p = _rows.define_primitive("normjax_column_moments", _moments_reference,
                                          _moments_abstract,
                                          native_target="NormjaxColumnMoments")


def _fold_batch(p, args, dims, params):
  """Batching of a moments primitive `p` whose every output is per entry of `x`'s first axis
  (the example axis): a vmapped batch joins that axis."""
  (x,), (d,) = args, dims
  x = batching.bdim_at_front(x, d, x.shape[d])
  outs = p.bind(x.reshape((-1,) + x.shape[2:]), **params)
  return [o.reshape((x.shape[0], -1) + o.shape[1:]) for o in outs], [0] * len(outs)


batching.primitive_batchers[column_moments_p] = (
    lambda args, dims, **params: _fold_batch(column_moments_p, args, dims, params))


def channels_first_view(x: jax.Array, axes: tuple[int, ...]):
  """`(outer, channels, positions, pool_outer)` if the reduced `axes` are a trailing block of
  `x`'s axes (the positions) after a block of kept axes (the channels), and the axes before
  those are all reduced (`pool_outer`: batch norm on NCHW) or there are none (group norm on
  NCHW: the batch is part of the channel block); else None."""
  if not axes or axes[-1] != x.ndim - 1:
    return None
  p0 = x.ndim - 1
  while p0 - 1 in axes:
    p0 -= 1
  c0 = p0
  while c0 > 0 and c0 - 1 not in axes:
    c0 -= 1
  if c0 == p0 or any(a not in axes for a in range(c0)):
    return None
  return (math.prod(x.shape[:c0]), math.prod(x.shape[c0:p0]), math.prod(x.shape[p0:]),
          c0 > 0)


def _row_moments_reference(x, *, pool_outer, group_size):
  stats = _stats(x.astype(_F32), 2)
  if pool_outer:
    stats = tuple(v.T for v in _pool(*(v.T for v in stats), x.shape[0]))
  if group_size > 1:
    stats = _pool(*stats, group_size)
  return stats


def _row_moments_abstract(x, *, pool_outer, group_size):
  del pool_outer, group_size
  return [jax.core.ShapedArray(x.shape[:2], _F32)] * 3


row_moments_p = _rows.define_primitive("normjax_row_moments", _row_moments_reference,
                                       _row_moments_abstract, native_target="NormjaxRowMoments")
_row_moments_fallback = _rows._batch_by_reference(_row_moments_reference)


def _row_moments_batch(args, dims, **params):
  """A vmapped batch joins `outer` unless the moments pool over `outer`."""
  if params["pool_outer"]:
    return _row_moments_fallback(args, dims, **params)
  return _fold_batch(row_moments_p, args, dims, params)


batching.primitive_batchers[row_moments_p] = _row_moments_batch


def shifted_moments(x: jax.Array, axes: tuple[int, ...], groups: tuple[int, int] | None):
  """`(shift, offset, var, count)` of `x` over `axes` (`block_view` or `channels_first_view`
  must apply), each with `x.ndim` dims, size 1 along `axes`, in float32; `groups=(channel_axis,
  size)` also pools groups of `size` consecutive channels (group norm), one value per channel."""
  size = 1 if groups is None else groups[1]
  view = block_view(x, axes)
  if view is not None:
    batch, positions, channels = view
    shift, offset, var = column_moments_p.bind(x.reshape(view), group_size=size)
    n = float(positions * size)
  else:
    outer, channels, positions, pool_outer = channels_first_view(x, axes)
    shift, offset, var = row_moments_p.bind(x.reshape(outer, channels, positions),
                                            pool_outer=pool_outer, group_size=size)
    if pool_outer:
      shift, offset, var = shift[0], offset[0], var[0]
    n = float(positions * size * (outer if pool_outer else 1))
  stats_shape = tuple(1 if a in axes else d for a, d in enumerate(x.shape))
  shaped = lambda v: v.reshape(stats_shape)
  return shaped(shift), shaped(offset), shaped(var), jnp.asarray(n, _F32)


def _groups_fit(x, axes, groups) -> bool:
  """Whether the channel groups are consecutive entries of the kernels' channel dimension."""
  if groups is None:
    return True
  if block_view(x, axes) is not None:
    return groups[0] == x.ndim - 1 and axes[-1] == x.ndim - 2
  return axes[0] == groups[0] + 1    # the channel axis ends the kept block


def applies(x, axes, mask, axis_name, fast_variance, centered, groups) -> bool:
  """Whether `_core.moments(x, axes, ...)` can take `shifted_moments`."""
  return (mask is None and axis_name is None and not fast_variance and centered
          and jnp.dtype(x.dtype) in _rows._NATIVE_DTYPES and x.size > 0
          and (block_view(x, axes) is not None or channels_first_view(x, axes) is not None)
          and _groups_fit(x, axes, groups)
          and not _rows.explicitly_sharded(x))
