"""Per-channel moments of channels-last input from one read (batch/instance/group norm, NHWC).

XLA:CPU computes `sum(x)` and `sum(x**2)` with two reads of `x` (see
benchmarks/OPTIMIZATION_LOG.md). When `_core.moments` reduces one contiguous block of axes
with channels after it (batch norm over N, H, W; instance and group norm over H, W of NHWC
input), without a mask or a named axis, it views `x` as `[batch, positions, channels]` and
calls `column_moments_p`: per `(batch, channel)`, `shift` (the first position's value), and
the sums of `x - shift` and `(x - shift)**2`. On CPU with the native library that is one
kernel read of `x` (normjax/_native/rows.cc); elsewhere its `jax.numpy` definition. The
normalize step and the derivatives stay in `_core` (XLA fuses them with their neighbours).

Accuracy: the shifted sums give `var = E[(x - shift)**2] - E[x - shift]**2`, which loses
`log10((mean - shift)**2 / var)` digits: nothing when the shift is a sample of the channel
(a few standard deviations from the mean at most), however large the mean. So no
conditional second pass is needed on this path.
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


def _regroup(shift, s1, s2, n, size):
  """Per-channel shifted sums pooled over groups of `size` consecutive channels: each
  channel's sums re-shifted to its group's first channel K, sum(x - K) = s1 + n d and
  sum((x - K)**2) = s2 + 2 d s1 + n d**2 with d = shift - K, added up, and held by every
  channel of the group."""
  batch, channels = shift.shape
  grouped = (batch, channels // size, size)
  shift, s1, s2 = (v.reshape(grouped) for v in (shift, s1, s2))
  k = shift[:, :, :1]
  d = shift - k
  t1 = jnp.sum(s1 + n * d, axis=2, keepdims=True)
  t2 = jnp.sum(s2 + 2.0 * d * s1 + n * d * d, axis=2, keepdims=True)
  per_channel = lambda v: jnp.broadcast_to(v, grouped).reshape(batch, channels)
  return per_channel(k), per_channel(t1), per_channel(t2)


def _moments_reference(x, *, group_size):
  shift = lax.stop_gradient(x[:, 0, :].astype(_F32))
  d = x.astype(_F32) - shift[:, None, :]
  s1, s2 = jnp.sum(d, axis=1), jnp.sum(d * d, axis=1)
  if group_size > 1:
    return _regroup(shift, s1, s2, float(x.shape[1]), group_size)
  return shift, s1, s2


def _moments_abstract(x, *, group_size):
  del group_size
  per_channel = jax.core.ShapedArray((x.shape[0], x.shape[2]), _F32)
  return [per_channel] * 3


column_moments_p = _rows.define_primitive("normjax_column_moments", _moments_reference,
                                          _moments_abstract,
                                          native_target="NormjaxColumnMoments")


def _fold_batch(args, dims, **params):
  """Every output is per example: a vmapped batch joins the example axis."""
  (x,), (d,) = args, dims
  x = batching.bdim_at_front(x, d, x.shape[d])
  outs = column_moments_p.bind(x.reshape((-1,) + x.shape[2:]), **params)
  return [o.reshape((x.shape[0], -1) + o.shape[1:]) for o in outs], [0] * 3


batching.primitive_batchers[column_moments_p] = _fold_batch

def shifted_moments(x: jax.Array, axes: tuple[int, ...], groups: tuple[int, int] | None):
  """`(shift, offset, var, count)` of `x` over `axes` (see `block_view`), each with `x.ndim`
  dims, size 1 along `axes`, in float32; `groups=(channel_axis, size)` also pools groups of
  `size` consecutive channels along the last axis (group norm), one value per channel."""
  batch, positions, channels = block_view(x, axes)
  size = 1 if groups is None else groups[1]
  shift, s1, s2 = column_moments_p.bind(x.reshape(batch, positions, channels), group_size=size)
  n = float(positions * size)
  offset = s1 / n
  var = jnp.maximum(s2 / n - offset * offset, jnp.zeros((), _F32))
  stats_shape = tuple(1 if a in axes else d for a, d in enumerate(x.shape))
  shaped = lambda v: v.reshape(stats_shape)
  return shaped(shift), shaped(offset), shaped(var), jnp.asarray(n, _F32)


def applies(x, axes, mask, axis_name, fast_variance, centered, groups) -> bool:
  """Whether `_core.moments(x, axes, ...)` can take `shifted_moments`."""
  return (mask is None and axis_name is None and not fast_variance and centered
          and jnp.dtype(x.dtype) in _rows._NATIVE_DTYPES and x.size > 0
          and block_view(x, axes) is not None
          and (groups is None or (groups[0] == x.ndim - 1 and axes[-1] == x.ndim - 2))
          and not _rows.explicitly_sharded(x))
