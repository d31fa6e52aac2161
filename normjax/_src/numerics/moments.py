"""Statistics over a set of axes: the stable variance, masks, cross-device sums, channel groups.

The reference maths of every variant's statistics, in `jax.numpy` (it imports no kernel; the
kernels' definitions are these functions on a 2-D or 3-D view).

- Statistics are accumulated in `stats_dtype(x.dtype)`: float32 for bfloat16/float16/float32
  input, float64 for float64.
- The default variance is conditional: pass 1 sums `x` and `x**2` (flax's cost) and is kept
  when every row has `mean**2 <= TAU * var` (at most twice the summation error); otherwise a
  second pass shifted by the pass-1 mean runs (one scalar `lax.cond` for the whole input,
  agreed across devices). That is the CPU's program. Lowered for CUDA, ROCm or TPU there is
  no cond and one read: a variadic reduction carrying `(count, mean, compensation, M2)` per
  row, merged by Chan et al.'s formula with a compensated mean (`welford`, `combine`), then
  across channel groups and devices by the shifted sums (`merge`).
- `fast_variance=True` keeps the one-pass variance (loses `log10(mean**2 / var)` digits).
- The variance is clamped at zero; empty (fully masked) groups count as one element (mean 0,
  variance 0, finite output and gradient); a non-finite variance gives NaN rows (see
  `normjax._src.numerics.standardize.rstd`). Measurements: `docs/numerics.md`.

Grouped channels (group norm): `groups=(channel_axis, group_size)` also reduces the channel
axis in groups of `group_size` consecutive channels: sums per channel first (channels
contiguous), then per group on the small per-channel array, broadcast back to one value per
channel, so the normalize step is one elementwise pass with per-channel factors.
"""

from __future__ import annotations

from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from normjax._src.numerics import platform
from normjax._src.numerics import rounding
from normjax._src.shapes import Axes
from normjax._src.shapes import reduced_size

# The one-pass variance is kept when `mean**2 <= TAU * var` for every row (see module doc).
TAU = 1.0


class Moments(NamedTuple):
  """Statistics of `x` over the reduced axes, each with the reduced axes kept as size 1.

  The mean is split as `mean = shift + offset`, where `shift` is a constant reference value
  (`None` when there is none) and `offset` is small when the shift is good.
  """
  shift: jax.Array | None   # [..] stop-gradient reference value, or None (zero)
  offset: jax.Array | None  # [..] mean - shift, or None for uncentered (RMS) statistics
  var: jax.Array            # [..] biased variance (or mean square when offset is None)
  # The field shadows tuple.count (a method): the name is the public API's.
  count: jax.Array  # type: ignore[assignment]  # [..] number of elements counted, a float

  @property
  def mean(self) -> jax.Array:
    """The mean, `shift + offset` (zero for uncentered statistics)."""
    if self.offset is None:
      return jnp.zeros_like(self.var)
    return self.offset if self.shift is None else self.shift + self.offset


def stats_dtype(dtype: Any) -> jnp.dtype:
  """The dtype statistics are computed in: at least float32."""
  dtype = jnp.dtype(dtype)
  return dtype if jnp.finfo(dtype).bits >= 32 else jnp.dtype(jnp.float32)



def _group_sum(v: jax.Array, groups: tuple[int, int] | None) -> jax.Array:
  """Sums a (small, reduced) array over groups of consecutive channels, one value per channel."""
  if groups is None:
    return v
  axis, size = groups
  shape = v.shape
  split = shape[:axis] + (shape[axis] // size, size) + shape[axis + 1:]
  g = jnp.sum(v.reshape(split), axis=axis + 1, keepdims=True)
  return jnp.broadcast_to(g, split).reshape(shape)


def total(values: Any, axes: Axes, axis_name: Any, axis_index_groups: Any,
           groups: tuple[int, int] | None = None) -> Any:
  """Sums a pytree of arrays over `axes` (kept), channel groups, and the named axis if given."""
  def one(v):
    if axes:
      v = jnp.sum(v, axis=axes, keepdims=True)
    return _group_sum(v, groups)
  sums = jax.tree.map(one, values)
  if axis_name is not None:
    sums = lax.psum(sums, axis_name, axis_index_groups=axis_index_groups)
  return sums


def counted_only(v: jax.Array, mask: jax.Array | None) -> jax.Array:
  """`v` where `mask` is True and zero elsewhere (all of `v` without a mask)."""
  return v if mask is None else jnp.where(mask, v, jnp.zeros((), v.dtype))


def _count(x_shape, axes, mask, dtype, axis_name, axis_index_groups, groups):
  if mask is None:
    size = reduced_size(x_shape, axes) * (1 if groups is None else groups[1])
    return total(jnp.asarray(size, dtype), (), axis_name, axis_index_groups)
  return total(mask.astype(dtype), axes, axis_name, axis_index_groups, groups)



def moments(x: jax.Array, axes: Axes, *, mask: jax.Array | None = None,
            axis_name: Any = None, axis_index_groups: Any = None,
            fast_variance: bool = False, centered: bool = True,
            groups: tuple[int, int] | None = None) -> Moments:
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
    groups: `(channel_axis, group_size)` to reduce the (non-reduced) channel axis in groups of
      `group_size` consecutive channels as well; statistics keep one value per channel.

  Returns:
    `Moments` whose arrays have `x.ndim` dims, size 1 along `axes`, in `stats_dtype(x.dtype)`.
  """
  dtype = stats_dtype(x.dtype)
  # `x` pinned to its own rounding, one handle per reduction over it (see `pinned_reads`);
  # the cond's operands are uncast (a cast operand would be materialized for bf16).
  x, x_square, *x_in = rounding.pinned_reads(x, 4)
  x_square = x_square.astype(dtype)
  x = x.astype(dtype)
  keep = lambda v: counted_only(v, mask)
  count = _count(x.shape, axes, mask, dtype, axis_name, axis_index_groups, groups)
  safe_count = jnp.maximum(count, jnp.ones((), dtype))
  sum_over = lambda v: total(v, axes, axis_name, axis_index_groups, groups)

  if not centered:
    mean_square = sum_over(keep(x_square * x_square)) / safe_count
    return Moments(shift=None, offset=None, var=mean_square, count=count)
  zero = jnp.zeros((), dtype)

  def centered_var(t1, t2, m):
    # The variance from the sums `t1`, `t2` of a row and its mean `m = t1 / n`, as
    # `(t2 - t1 * m) / n` rather than `t2 / n - m**2`. Two reasons:
    #  * XLA divides by a constant count as a multiply by its rounded reciprocal, and for a
    #    constant row (`t1 = n d`, `t2 = n d**2`) only this form stays exactly zero (the other
    #    gave 1.9e-6 at 1e8 with n = 3, and a rstd 9 % off for eps = 1e-5);
    #  * at data scales near 1e-17, `m**2` is below float32's normal range and flushed to
    #    zero while `t1 * m` is not (1.9e-4 relative error at eps = 0 with the other form).
    return (t2 - t1 * m) / safe_count

  def shifted_pass(shift, x_in):
    # `x - shift` once per reduction (each from its own handle of a bfloat16 `x`; the second
    # as `x + (-shift)`, the same value from another broadcast), not a float32 difference
    # shared by both, which XLA:CPU would write out.
    xa, xb = (v.astype(dtype) for v in x_in)
    d, e = keep(xa - shift), keep(xb + (-shift))
    t1, t2 = sum_over((d, e * e))
    offset = t1 / safe_count
    return shift, offset, jnp.maximum(centered_var(t1, t2, offset), zero)

  def pass_one():
    # Both sums from the same input, as flax's one-pass variance.
    s1, s2 = sum_over((keep(x), keep(x_square * x_square)))
    return s1, s2, s1 / safe_count

  if fast_variance:
    _, s2, mean = pass_one()
    var_fast = s2 / safe_count - mean * mean
    return Moments(shift=None, offset=mean, var=jnp.maximum(var_fast, zero), count=count)

  def conditional(x_in):
    # Keep the one-pass variance when every row is well conditioned (`mean**2 <= TAU * var`,
    # so at most twice the summation error); otherwise a second, shifted pass with the
    # pass-1 mean as the shift. False for NaN, zero-variance rows with a non-zero mean, and a
    # negative `var_fast`, which all take the shifted pass. One scalar predicate for the
    # whole batch (and, with `axis_name`, for every device, so that the collectives inside
    # the shifted pass run everywhere or nowhere); under `jax.vmap` the cond is a select
    # (both passes run).
    s1, s2, mean = pass_one()
    var_fast = centered_var(s1, s2, mean)
    # A sum of squares that overflowed takes the shifted pass too: the sum of squared
    # deviations may still be finite (a large offset). (Tested on `s2`, not `var_fast`: a
    # second user of `s2` keeps XLA:CPU from fusing `s2 - s1 * mean` into the reduction of
    # `x**2`, which would wait for the reduction of `x` instead of running beside it.)
    well_conditioned = jnp.all((mean * mean <= jnp.asarray(TAU, dtype) * var_fast)
                               & (s2 < jnp.asarray(jnp.inf, dtype)))
    if axis_name is not None:
      ill = jnp.logical_not(well_conditioned).astype(jnp.int32)
      well_conditioned = lax.psum(ill, axis_name) == 0
    shift = _held_shift(mean)

    def one_pass(x_in):
      del x_in
      return jnp.zeros_like(shift), mean, jnp.maximum(var_fast, zero)
    return lax.cond(well_conditioned, one_pass, lambda x_in: shifted_pass(shift, x_in), x_in)

  def one_read(x_in):
    # On GPUs and TPUs, no `cond` (XLA:GPU runs one by copying the predicate to the host and
    # waiting for the stream, once per call) and no second pass: one variadic reduction.
    return _one_read(axes, axis_name, axis_index_groups, groups)(x_in[0].astype(dtype), mask)

  shift, offset, var = platform.platform_dependent(tuple(x_in), default=conditional,
                                                   cuda=one_read, rocm=one_read, tpu=one_read)
  return Moments(shift=shift, offset=offset, var=var, count=count)


def _held_shift(mean: jax.Array) -> jax.Array:
  """`mean` as a shift: held constant (the result does not depend on it) and rounded to one
  bit less than the dtype's mantissa: `reduce_precision` keeps XLA from contracting
  `x - s1 * (1/n)` into an FMA wherever the shift is recomputed (the normalize loop), which
  would subtract a value half an ulp of the mean away from the one the second pass used (1e-3
  error at 1e5)."""
  fi = jnp.finfo(mean.dtype)
  return lax.stop_gradient(lax.reduce_precision(mean, exponent_bits=fi.nexp,
                                                mantissa_bits=fi.nmant - 1))


def _one_read(axes: Axes, axis_name: Any, axis_index_groups: Any,
              groups: tuple[int, int] | None):
  """`stats(x, mask) -> (shift, offset, var)` of a float `x` in one read (`welford`, then
  `merge` across channel groups and devices), with the statistics' derivative in closed form
  (`d offset = E[dx]`, `d var = 2 E[(x - mean) dx]`; a custom JVP, as the variadic reduction
  has no derivative rule): the derivative programs of any order run it."""
  sum_parts = lambda v: total(v, (), axis_name, axis_index_groups, groups)
  single = groups is None and axis_name is None

  @jax.custom_jvp
  def stats(x, mask):
    return merge(welford(x, axes, mask), sum_parts, single=single)

  @stats.defjvp
  def stats_jvp(primals, tangents):
    x, mask = primals
    dx = tangents[0]
    shift, offset, var = stats(x, mask)
    count = _count(x.shape, axes, mask, x.dtype, axis_name, axis_index_groups, groups)
    safe_count = jnp.maximum(count, jnp.ones((), x.dtype))
    mean = lambda v: total(counted_only(v, mask), axes, axis_name, axis_index_groups,
                           groups) / safe_count
    dvar = 2.0 * mean(((x - shift) - offset) * dx)
    return (shift, offset, var), (jnp.zeros_like(shift), mean(dx), dvar)
  return stats


class Partial(NamedTuple):
  """The statistics of a part of a row: `n` elements (int32) with mean `m + c` and sum of
  squared deviations `m2 + c2` (`c`, `c2`: compensations, the low-order parts that the
  rounding of `m` and `m2` dropped)."""
  n: jax.Array
  m: jax.Array
  c: jax.Array
  m2: jax.Array
  c2: jax.Array


def _two_sum(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
  """`(s, e)` with `s = fl(a + b)` and `a + b = s + e` exactly (Knuth's TwoSum)."""
  s = a + b
  bb = s - a
  return s, (a - (s - bb)) + (b - bb)


def combine(a: Partial, b: Partial) -> Partial:
  """Chan et al.'s merge of two parts' statistics, with a compensated mean.

  `r = n_b / n`; the mean moves by `r (mean_b - mean_a)`, added to `m_a` with its rounding
  error kept in `c` (so that a running mean over many elements does not stagnate at the
  precision of its early elements); `m2 = m2_a + m2_b + d**2 n_a n_b / n` with `d` the full
  difference of the means, its rounding errors kept in `c2` (a compiler may run the whole
  reduction as one sequential loop, XLA:CPU does: an uncompensated `m2` over 2**24 elements
  was 1.4 % off). An empty part (`n = 0`, zeros) is an identity on either side (for finite
  statistics).
  """
  dtype = a.m.dtype
  n = a.n + b.n
  r = b.n.astype(dtype) / jnp.maximum(n, 1).astype(dtype)
  dm = b.m - a.m
  m, err = _two_sum(a.m, dm * r)
  # `(m, c)` renormalized too (`c` below half an ulp of `m`).
  m, c = _two_sum(m, (a.c + r * (b.c - a.c)) + err)
  d = dm + (b.c - a.c)
  # `(d * r) * n_a` before the last product: an empty `a` contributes an exact zero even for
  # a huge `d` (`d * d` would overflow to inf and `inf * 0` is NaN).
  m2, e1 = _two_sum(a.m2, b.m2)
  m2, e2 = _two_sum(m2, d * ((d * r) * a.n.astype(dtype)))
  # Renormalized, so that `c2` stays below half an ulp of `m2` (accumulated on the side, the
  # errors of adding terms of about the variance to a large `m2` grew `c2` to 3 % of `m2`
  # over 2**24 elements, and its own rounding cost 1e-4).
  m2, c2 = _two_sum(m2, (a.c2 + b.c2) + (e1 + e2))
  return Partial(n, m, c, m2, c2)


def welford(x: jax.Array, axes: Axes, mask: jax.Array | None) -> Partial:
  """Per-row `Partial`s of `x` over `axes` (kept as size 1) in one variadic reduction.

  Each element enters as `(1, x, 0, 0, 0)` (zeros where `mask` is False) and the
  reduction merges them with `combine` in whatever order the compiler chooses (sequential
  runs, trees): one read of `x` for exact statistics. `n` is int32 (exact to 2**31 elements
  per row; a float32 count stops growing at 2**24).
  """
  zero = jnp.zeros((), x.dtype)
  z = jnp.zeros_like(x)
  if mask is None:
    parts = Partial(jnp.ones(x.shape, jnp.int32), x, z, z, z)
  else:
    parts = Partial(mask.astype(jnp.int32), jnp.where(mask, x, zero), z, z, z)
  if not axes:
    return parts
  init = Partial(jnp.zeros((), jnp.int32), zero, zero, zero, zero)
  out = lax.reduce(tuple(parts), tuple(init),
                   lambda a, b: tuple(combine(Partial(*a), Partial(*b))), tuple(axes))
  shape = tuple(1 if i in axes else d for i, d in enumerate(x.shape))
  return Partial(*(v.reshape(shape) for v in out))


def merge(p: Partial, sum_parts, *, single: bool) -> tuple[jax.Array, ...]:
  """`(shift, offset, var)` from the `Partial`s `p`, merged by `sum_parts` (a sum over
  channel groups and devices, broadcast back), or taken as they are when `single`.

  The merge is the shifted sums' formula over the parts: with `shift` the count-weighted mean
  of the `m`s (held constant, see `_held_shift`) and `dev = (m - shift) + c` each part's mean
  relative to it, `offset = sum(n dev) / N` and `var = (sum(m2 + c2 + n dev**2) - offset
  sum(n dev)) / N`.
  """
  dtype = p.m.dtype
  zero = jnp.zeros((), dtype)
  if single:
    n = jnp.maximum(p.n, 1).astype(dtype)
    return lax.stop_gradient(p.m), p.c, jnp.maximum((p.m2 + p.c2) / n, zero)
  nf = p.n.astype(dtype)
  count = jnp.maximum(sum_parts(nf), jnp.ones((), dtype))
  shift = _held_shift(sum_parts(nf * p.m) / count)
  dev = (p.m - shift) + p.c
  t1, t2 = sum_parts(nf * dev), sum_parts((p.m2 + p.c2) + nf * dev * dev)
  offset = t1 / count
  return shift, offset, jnp.maximum((t2 - t1 * offset) / count, zero)


def subtract_mean(x: jax.Array, stats: Moments) -> jax.Array:
  """`x - mean` in the statistics dtype, subtracting shift and offset separately."""
  y = x.astype(stats_dtype(x.dtype))
  if stats.shift is not None:
    y = y - stats.shift
  if stats.offset is not None:
    y = y - stats.offset
  return y
