"""Per-channel moments from one read of the input (batch/instance/group norm, NHWC and NCHW).

When `moments` would reduce one contiguous block of axes with channels after it (batch
norm over N, H, W; instance and group norm over H, W of NHWC input), the input is viewed as
`[batch, positions, channels]` and `column_moments_p` gives per `(batch, channel)` the mean as
`shift + offset` and the biased variance. Channels-first input whose reduced axes end the
shape (batch norm over N, H, W and group norm over H, W of NCHW input) is viewed as
`[outer, channels, positions]` instead, and `row_moments_p` does the same per row
`(outer, channel)`, pooled over `outer` for batch norm (`pool_outer`). Both pool group norm's
groups of `group_size` consecutive channels. Their definitions are `moments` on the
view; on CPU with the native library each is one kernel read of `x` (blocked sums about a
block's own mean or, for later blocks near it, the running mean, merged with Chan's formula:
exact to float32 rounding whatever the order and length). The normalize step and the
derivatives stay the numerics' (`normjax._src.numerics`; XLA fuses them with their
neighbours), except one piece of the
backward: `tangent`'s `xhat * a + c` (per-channel `a`, `c` spread over `x`) is
`column_spread_p`, whose transpose is `column_sums_p` (channels last) or `row_sums_p`
(channels first): per (example, channel) or per row the sums of the cotangent `g` and of
`g * (x - mean)` from one read of `x` and `g` (XLA instead wrote `xhat` out and reduced `g`
and `g * xhat` in separate passes).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.extend import core as jex_core
from jax.interpreters import ad
from jax.interpreters import batching

from normjax._src.kernels import primitives
from normjax._src.numerics.moments import Moments
from normjax._src.numerics.moments import moments
from normjax._src.numerics.moments import subtract_mean
from normjax._src.numerics.standardize import normalize

F32 = primitives.F32
Shape = tuple[int, ...]
ShapedArray = jax.core.ShapedArray
# A cotangent or a linear operand of a transpose rule: an array, a symbolic zero, or the
# primal being transposed for.
Linear = jax.Array | ad.Zero | ad.UndefinedPrimal
# `forward(x, scale, bias, mask) -> (y, Moments)` and `spread(x, stats, rstd, a, c) -> array`.
Forward = Callable[[jax.Array, jax.Array | None, jax.Array | None, jax.Array | None],
                   tuple[jax.Array, Moments]]
Spread = Callable[[jax.Array, Moments, jax.Array, jax.Array, jax.Array], jax.Array]


def _outputs(stats: Moments, shape: Shape) -> tuple[jax.Array, ...]:
  """`(shift, offset, var)` of `Moments` as arrays of `shape`."""
  assert stats.offset is not None  # the moments kernels' statistics are centered
  zero = jnp.zeros_like(stats.var)
  shift = zero if stats.shift is None else stats.shift
  return tuple(jnp.broadcast_to(v, stats.var.shape).reshape(shape)
               for v in (shift, stats.offset, stats.var))


def _groups(axis: int, size: int) -> tuple[int, int] | None:
  return None if size == 1 else (axis, size)


def _column_reference(x: jax.Array, *, group_size: int) -> tuple[jax.Array, ...]:
  stats = moments(x, (1,), groups=_groups(2, group_size))
  return _outputs(stats, (x.shape[0], x.shape[2]))


def _row_reference(x: jax.Array, *, pool_outer: bool, group_size: int) -> tuple[jax.Array, ...]:
  stats = moments(x, (0, 2) if pool_outer else (2,), groups=_groups(1, group_size))
  zero = jnp.zeros(x.shape[:2] + (1,), F32)
  return _outputs(stats._replace(var=stats.var + zero), x.shape[:2])


def _column_abstract(x: ShapedArray, *, group_size: int) -> list[ShapedArray]:
  del group_size
  return [jax.core.ShapedArray((x.shape[0], x.shape[2]), F32)] * 3


def _row_abstract(x: ShapedArray, *, pool_outer: bool, group_size: int) -> list[ShapedArray]:
  del pool_outer, group_size
  return [jax.core.ShapedArray(x.shape[:2], F32)] * 3


column_moments_p = primitives.define_primitive(
    "normjax_column_moments", _column_reference, _column_abstract,
    target="NormjaxColumnMoments")
row_moments_p = primitives.define_primitive(
    "normjax_row_moments", _row_reference, _row_abstract, target="NormjaxRowMoments")


# ----------------------------------------------------------------- the backward's sums

def _sums_reference(x: jax.Array, g: jax.Array, shift: jax.Array,
                    offset: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per (batch, channel) of `[batch, positions, channels]` (or per row of `[rows,
  positions]`): the sums of `g` and of `g * ((x - shift) - offset)` over the positions, axis 1
  (`g` float32)."""
  # Only the centering is read: var and count are left out.
  d = subtract_mean(x, Moments(shift=shift[:, None], offset=offset[:, None],
                               var=None, count=None))  # type: ignore[arg-type]
  return jnp.sum(g, 1), jnp.sum(g * d, 1)


def _sums_abstract(x: ShapedArray, g: ShapedArray, shift: ShapedArray,
                   offset: ShapedArray) -> list[ShapedArray]:
  del g, shift, offset
  return [jax.core.ShapedArray(x.shape[:1] + x.shape[2:], F32)] * 2


column_sums_p = primitives.define_primitive(
    "normjax_column_sums", _sums_reference, _sums_abstract, target="NormjaxColumnSums")
row_sums_p = primitives.define_primitive(
    "normjax_row_sums", _sums_reference, _sums_abstract, target="NormjaxRowSums")


def _spread_reference(x: jax.Array, shift: jax.Array, offset: jax.Array, rstd: jax.Array,
                      a: jax.Array, c: jax.Array) -> tuple[jax.Array]:
  """`xhat * a + c` (float32) with `xhat = ((x - shift) - offset) * rstd`, all per-entry
  operands `[batch, channels]` broadcast over the positions of `x [batch, positions,
  channels]` (or `[rows]` over `x [rows, positions]`): the part of `tangent` that
  spreads per-channel values over `x`. Linear in `(a, c)`; its transpose reduces the
  cotangent with `column_sums_p` (or `row_sums_p`)."""
  e = lambda v: v[:, None]
  # Only the centering is read (by `subtract_mean`): var and count are left out.
  stats = Moments(shift=e(shift), offset=e(offset), var=None, count=None)  # type: ignore[arg-type]
  return (subtract_mean(x, stats) * e(rstd) * e(a) + e(c),)


def _spread_abstract(x: ShapedArray, *args: ShapedArray) -> list[ShapedArray]:
  del args
  return [jax.core.ShapedArray(x.shape, F32)]


column_spread_p = primitives.define_primitive(
    "normjax_column_spread", _spread_reference, _spread_abstract)


def _spread_transpose(cts: Sequence[jax.Array | ad.Zero], x: jax.Array, shift: jax.Array,
                      offset: jax.Array, rstd: jax.Array, a: Linear,
                      c: Linear) -> list[jax.Array | None]:
  (ct,) = cts
  if type(ct) is ad.Zero:
    return [None] * 6
  sums = column_sums_p if x.aval.ndim == 3 else row_sums_p
  sg, sgx = sums.bind(x, ad.instantiate_zeros(ct), shift, offset)
  grads = (sgx * rstd, sg)
  return [None] * 4 + [primitives.sum_to_vma(g, v.aval) if ad.is_undefined_primal(v) else None
                       for g, v in zip(grads, (a, c), strict=True)]


ad.primitive_transposes[column_spread_p] = _spread_transpose


# ----------------------------------------------------------------- batching (jax.vmap)

def _fold_examples(p: jex_core.Primitive, reference: primitives.Reference) -> primitives.BatchRule:
  """Batching of a primitive whose every operand and output has the example axis first: a
  vmapped batch joins that axis (operands without the batch are broadcast), unless the batch
  is empty or the primitive pools over the examples (`pool_outer`: the row moments of batch
  norm on NCHW); then `jax.vmap` of the definition."""
  fallback = primitives.batch_by_reference(reference)

  def rule(args: Sequence[jax.Array], dims: Sequence[int | None],
           **params: primitives.Param) -> tuple[Sequence[jax.Array], Sequence[int]]:
    size = primitives.batch_size(args, dims)
    if size == 0 or params.get("pool_outer", False):
      return fallback(args, dims, **params)
    args = [batching.bdim_at_front(a, d, size) for a, d in zip(args, dims, strict=True)]
    outs = p.bind(*(a.reshape((size * a.shape[1],) + a.shape[2:]) for a in args), **params)
    return [o.reshape((size, o.shape[0] // size) + o.shape[1:]) for o in outs], [0] * len(outs)
  return rule


for _p, _reference in ((column_moments_p, _column_reference), (row_moments_p, _row_reference),
                       (column_sums_p, _sums_reference), (row_sums_p, _sums_reference),
                       (column_spread_p, _spread_reference)):
  batching.primitive_batchers[_p] = _fold_examples(_p, _reference)
del _p, _reference


# ----------------------------------------------------------------- views and one call's forward

def _channels_last_view(shape: Shape, axes: Shape) -> tuple[int, int, int] | None:
  """`(batch, positions, channels)` if `axes` are one contiguous block of axes with at least
  one axis after it (so `x` is `[batch, positions, channels]` row-major), else None."""
  if not axes or tuple(axes) != tuple(range(axes[0], axes[-1] + 1)) or axes[-1] >= len(shape) - 1:
    return None
  return (math.prod(shape[:axes[0]]), math.prod(shape[axes[0]:axes[-1] + 1]),
          math.prod(shape[axes[-1] + 1:]))


def _channels_first_view(shape: Shape, axes: Shape) -> tuple[int, int, int, bool] | None:
  """`(outer, channels, positions, pool_outer)` if the reduced `axes` are a trailing block
  (the positions) after a block of kept axes (the channels), and the axes before those are
  all reduced (`pool_outer`: batch norm on NCHW) or there are none (group norm on NCHW: the
  batch is part of the channel block); else None."""
  ndim = len(shape)
  if not axes or axes[-1] != ndim - 1:
    return None
  p0 = ndim - 1
  while p0 - 1 in axes:
    p0 -= 1
  c0 = p0
  while c0 > 0 and c0 - 1 not in axes:
    c0 -= 1
  if c0 == p0 or any(a not in axes for a in range(c0)):
    return None
  return (math.prod(shape[:c0]), math.prod(shape[c0:p0]), math.prod(shape[p0:]), c0 > 0)


def ops(x_shape: Shape, axes: Shape, groups: tuple[int, int] | None,
        eps: float) -> tuple[Forward, Spread] | None:
  """`(forward, spread)` for `standardize(x, axes, ..., groups=groups)` with the
  statistics from a moments kernel, or None when neither view applies (or the groups do not
  fit it). `spread` is `tangent`'s `spread` through `column_spread_p`, whose transpose
  is the backward's sums kernel (`column_sums_p` on the channels-last view, `row_sums_p` on
  the channels-first one)."""
  size = 1 if groups is None else groups[1]
  ndim = len(x_shape)
  last = _channels_last_view(x_shape, axes)
  first = None if last is not None else _channels_first_view(x_shape, axes)
  if groups is not None:
    # The channel groups must be consecutive entries of the kernels' channel dimension.
    if last is not None and not (groups[0] == ndim - 1 and axes[-1] == ndim - 2):
      return None
    if first is not None and axes[0] != groups[0] + 1:
      return None
  if last is None and first is None:
    return None
  stats_shape = tuple(1 if a in axes else d for a, d in enumerate(x_shape))

  if last is not None:
    n = last[1] * size
    kernel_moments = lambda x: column_moments_p.bind(x.reshape(last), group_size=size)
    per_entry = lambda v: jnp.broadcast_to(v, stats_shape).reshape(last[0], last[2])

    def spread(x: jax.Array, stats: Moments, rstd: jax.Array, a: jax.Array,
               c: jax.Array) -> jax.Array:
      (out,) = column_spread_p.bind(x.reshape(last), per_entry(stats.shift),
                                    per_entry(stats.offset), per_entry(rstd), per_entry(a),
                                    per_entry(c))
      return out.reshape(x_shape)
  else:
    assert first is not None  # one of the two views applies (checked above)
    outer, channels, positions, pool_outer = first
    n = positions * size * (outer if pool_outer else 1)
    k = ndim
    while k - 1 in axes:  # the positions are axes [k, ndim)
      k -= 1
    per_row = lambda v: jnp.broadcast_to(v, x_shape[:k] + (1,) * (ndim - k)).reshape(-1)

    def spread(x: jax.Array, stats: Moments, rstd: jax.Array, a: jax.Array,
               c: jax.Array) -> jax.Array:
      (out,) = column_spread_p.bind(x.reshape(outer * channels, positions),
                                    per_row(stats.shift), per_row(stats.offset), per_row(rstd),
                                    per_row(a), per_row(c))
      return out.reshape(x_shape)

    def kernel_moments(x: jax.Array) -> Sequence[jax.Array]:
      outs = row_moments_p.bind(x.reshape(outer, channels, positions), pool_outer=pool_outer,
                                group_size=size)
      return [o[:1] for o in outs] if pool_outer else outs

  def forward(x: jax.Array, scale: jax.Array | None, bias: jax.Array | None,
              mask: jax.Array | None) -> tuple[jax.Array, Moments]:
    del mask
    shift, offset, var = (v.reshape(stats_shape) for v in kernel_moments(x))
    stats = Moments(shift=shift, offset=offset, var=var, count=jnp.asarray(n, F32))
    return normalize(x, stats, scale, bias, eps), stats

  return forward, spread
