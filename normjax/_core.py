"""The one core of normjax: moments over a set of axes, the normalize step, and both fused.

Every variant (batch, layer, RMS, instance, group norm, ...) is a configuration of the functions
here: which axes are reduced, which channels are grouped, and which shape the scale, bias and
statistics take.

Numerics:
  * Statistics are accumulated in `promote_types(x.dtype, float32)` (float32 for bf16/fp16/f32
    input, float64 for float64 input) and the output is cast back to `x.dtype`.
  * The default variance is conditional. Pass 1 sums `x` and `x**2` (flax's one-pass cost) and
    forms `mean = E[x]`, `var1 = E[x**2] - mean**2`. Its relative error is about
    `c * eps * (1 + mean**2 / var)` (`c` the summation's error growth), so when EVERY row
    satisfies `mean**2 <= TAU * var1` (`TAU = 1`: at most twice the summation error) it is
    kept (`shift` zero, `offset = mean`). Otherwise (one scalar `lax.cond` predicate for the whole input,
    agreed across devices after the `psum`s) a shifted second pass runs with the pass-1 mean as
    the shift `K` (held constant for differentiation): it sums `d = x - K` and `d**2`;
    `var = E[d**2] - E[d]**2` then cancels nothing significant because `E[d]` is tiny. The
    normalize step subtracts `K` and `E[d]` separately, so `1e5 + N(0, 1)` in float32 comes
    out as accurate as the input allows (no rounding of the mean to a float32 near 1e5).
    Constant rows with a non-zero mean (`var1 == 0`), a negative `var1` and NaN fail the
    predicate and take the shifted pass. The predicate is sound while `c * eps << 1 / TAU`:
    an ill-conditioned row can only pass it if the one-pass error exceeds `mean**2 / TAU`.
    Cost: well-conditioned input pays two reductions (as flax); ill-conditioned input pays
    four (both passes). Under `jax.vmap` the cond becomes a select, so both passes run.
  * Lowered for CUDA or ROCm (`lax.platform_dependent`), there is no cond: pass 1 sums `x`
    alone for the shift and the shifted pass always runs (three reductions). XLA:GPU runs a
    `conditional` by copying its predicate to the host and waiting for the stream, once per
    call, and does not put it in a CUDA graph by default; the price here is one more read of
    `x`. (Chosen from XLA's runtime code; which is faster on a GPU is not yet measured.)
  * `fast_variance=True` always keeps the one-pass `E[x**2] - E[x]**2` (no predicate, no cond):
    it loses `log10(mean**2 / var)` digits (it is garbage for `1e4 + N(0, 1)` in float32).
  * Variance is clamped at zero; empty (fully masked) groups count as one element, so they give
    mean 0, variance 0 and a finite output and gradient.

Grouped channels (group norm): `groups=(channel_axis, group_size)` also reduces the channel axis
in groups of `group_size` consecutive channels. Sums are taken per channel first (over the
other reduced axes, channels contiguous, which XLA reduces at memory speed), then per group on
the small per-channel array, and broadcast back to one value per channel; the statistics keep
the full channel axis, so the normalize step is one elementwise pass with per-channel factors.

Performance (see benchmarks/): `standardize` is `moments` + `normalize` with a closed-form
derivative (`jax.custom_jvp`): the tangent is `rstd * (dx - E[dx] - xhat * E[xhat * dx])`, so
reverse mode needs no normalized copy of `x`. It runs under `jax.checkpoint` with a policy
that saves only the named statistics, so the backward keeps `x` and per-row `(shift, offset,
rstd)` and recomputes `xhat` elementwise. Being a JVP rule written in `jax.numpy`, it is
itself differentiable: forward mode, reverse mode and any order of derivative work.

Layering: this module is the reference. It imports no kernel. `normjax._src.kernels` defines
primitives whose `jax.numpy` definitions are the functions here (on a 2-D or 3-D view), with
faster lowerings per platform, and `normjax._dispatch` decides per call whether a kernel applies
and hands its `forward`/`tangent` to `standardize`, so that the closed-form derivative and its
`custom_jvp` + `checkpoint` wrapper exist once, here.

Rounding of `x`: under `jit`, XLA may keep a bfloat16/float16 `x` made by a fused op (`a + r`)
in float32 in some consumers and not others. Every read of `x` in this module goes through
`pinned_reads` / `pin_rounding`, so that all of them see `x` at its own rounding: the
reductions of `moments`, the normalize step of `standardize`'s forward, and its derivative
step; `residual_sum` pins the sum it returns. A kernel reads a materialized `x` (a custom
call's operand); where XLA's normalize step reads `x` beside a kernel, `normjax._dispatch`
pins `x` first, and the kernels' `jax.numpy` definitions normalize the pinned `x`. The pins
overlap (a pin of a pinned value); the compiled bfloat16 programs keep no copy of `x` for it
(`tests/test_core.py` checks the reference forward's scratch memory).

Special values: a row whose variance is not finite normalizes to NaN on every path (as flax's
does), never to zeros: a NaN or Inf in the row, or a sum beyond float32's range (the sum of
`(x - mean)**2`, that is `n * var`, or of `x`). A sum of squares `x**2` that overflows while
`n * var` does not (a large offset) takes the shifted pass and stays finite.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.ad_checkpoint import checkpoint_name

from normjax import _axes

_STATS_NAME = "normjax_stats"
_SUM_NAME = "normjax_residual_sum"  # h = x + residual in `add_standardize`, kept for the backward

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
  count: jax.Array          # [..] number of elements counted, a float

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


def _total(values: Any, axes: _axes.Axes, axis_name: Any, axis_index_groups: Any,
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


def _counted_only(v: jax.Array, mask: jax.Array | None) -> jax.Array:
  """`v` where `mask` is True and zero elsewhere (all of `v` without a mask)."""
  return v if mask is None else jnp.where(mask, v, jnp.zeros((), v.dtype))


def _count(x_shape, axes, mask, dtype, axis_name, axis_index_groups, groups):
  if mask is None:
    size = _axes.reduced_size(x_shape, axes) * (1 if groups is None else groups[1])
    return _total(jnp.asarray(size, dtype), (), axis_name, axis_index_groups)
  return _total(mask.astype(dtype), axes, axis_name, axis_index_groups, groups)


def moments(x: jax.Array, axes: _axes.Axes, *, mask: jax.Array | None = None,
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
  x, x_square, *x_in = pinned_reads(x, 4)
  x_square = x_square.astype(dtype)
  x = x.astype(dtype)
  keep = lambda v: _counted_only(v, mask)
  count = _count(x.shape, axes, mask, dtype, axis_name, axis_index_groups, groups)
  safe_count = jnp.maximum(count, jnp.ones((), dtype))
  total = lambda v: _total(v, axes, axis_name, axis_index_groups, groups)

  if not centered:
    mean_square = total(keep(x_square * x_square)) / safe_count
    return Moments(shift=None, offset=None, var=mean_square, count=count)
  zero = jnp.zeros((), dtype)
  fi = jnp.finfo(dtype)

  def centered_var(t1, t2, m):
    # The variance from the sums `t1`, `t2` of a row and its mean `m = t1 / n`, as
    # `(t2 - t1 * m) / n` rather than `t2 / n - m**2`. Two reasons:
    #  * XLA divides by a constant count as a multiply by its rounded reciprocal, and for a
    #    constant row (`t1 = n d`, `t2 = n d**2`) only this form stays exactly zero (the other
    #    gave 1.9e-6 at 1e8 with n = 3, and a rstd 9 % off for eps = 1e-5);
    #  * at data scales near 1e-17, `m**2` is below float32's normal range and flushed to
    #    zero while `t1 * m` is not (1.9e-4 relative error at eps = 0 with the other form).
    return (t2 - t1 * m) / safe_count

  def shift_of(mean):
    # The result does not depend on `shift`, so it is held constant. It is rounded to one bit
    # less than the dtype's mantissa: `reduce_precision` keeps XLA from contracting
    # `x - s1 * (1/n)` into an FMA wherever the shift is recomputed (the normalize loop),
    # which would subtract a value half an ulp of the mean away from the one the second pass
    # used (1e-3 error at 1e5).
    return lax.stop_gradient(lax.reduce_precision(mean, exponent_bits=fi.nexp,
                                                  mantissa_bits=fi.nmant - 1))

  def shifted_pass(shift, x_in):
    # `x - shift` once per reduction (each from its own handle of a bfloat16 `x`; the second
    # as `x + (-shift)`, the same value from another broadcast), not a float32 difference
    # shared by both, which XLA:CPU would write out.
    xa, xb = (v.astype(dtype) for v in x_in)
    d, e = keep(xa - shift), keep(xb + (-shift))
    t1, t2 = total((d, e * e))
    offset = t1 / safe_count
    return shift, offset, jnp.maximum(centered_var(t1, t2, offset), zero)

  def pass_one():
    # Both sums from the same input, as flax's one-pass variance.
    s1, s2 = total((keep(x), keep(x_square * x_square)))
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
    shift = shift_of(mean)

    def one_pass(x_in):
      del x_in
      return jnp.zeros_like(shift), mean, jnp.maximum(var_fast, zero)
    return lax.cond(well_conditioned, one_pass, lambda x_in: shifted_pass(shift, x_in), x_in)

  def always_shifted(x_in):
    # On GPUs, no `cond`: XLA:GPU runs one by copying the predicate to the host and waiting
    # for the stream (`ConditionalThunk`), once per call. Pass 1 sums `x` alone for the shift.
    return shifted_pass(shift_of(total(keep(x)) / safe_count), x_in)

  shift, offset, var = lax.platform_dependent(tuple(x_in), default=conditional,
                                              cuda=always_shifted, rocm=always_shifted)
  return Moments(shift=shift, offset=offset, var=var, count=count)


def _centered(x: jax.Array, stats: Moments) -> jax.Array:
  """`x - mean` in the statistics dtype, subtracting shift and offset separately."""
  y = x.astype(stats_dtype(x.dtype))
  if stats.shift is not None:
    y = y - stats.shift
  if stats.offset is not None:
    y = y - stats.offset
  return y


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
  return _affine(_centered(x, stats), rstd(stats.var, eps), scale, bias).astype(x.dtype)


def rstd(var: jax.Array, eps: Any) -> jax.Array:
  """`1 / sqrt(var + eps)`, or NaN where `var` is not finite (overflowed or NaN statistics
  give a NaN row on every path, rather than `rsqrt(inf) = 0` and an all-zero row).

  The NaN is chosen before the `rsqrt` (`rsqrt(nan)`), not selected after it: XLA keeps an
  `rsqrt` of per-channel values out of the elementwise loop over `x`, together with what
  feeds it, but fuses a select after it into that loop, once per element of `x`.
  """
  finite = var < jnp.asarray(jnp.inf, var.dtype)
  return lax.rsqrt(jnp.where(finite, var + jnp.asarray(eps, var.dtype),
                             jnp.asarray(jnp.nan, var.dtype)))


def _affine(xc, factor, scale, bias):
  dtype = xc.dtype
  if scale is not None:
    factor = factor * scale.astype(dtype)
  y = xc * factor
  if bias is not None:
    y = y + bias.astype(dtype)
  return y


def tangent(x: jax.Array, stats: Moments, rstd_: jax.Array, scale: jax.Array | None,
            dx: jax.Array, dscale: jax.Array | None, dbias: jax.Array | None,
            axes: _axes.Axes, *, mask: jax.Array | None = None, axis_name: Any = None,
            axis_index_groups: Any = None,
            groups: tuple[int, int] | None = None,
            spread: Callable | None = None) -> jax.Array:
  """The tangent of `normalize(x, moments(x, axes, ...), scale, bias, eps)`, in closed form.

  `d y = rs (dx - E[dx] - xhat E[xhat dx]) + xhat dscale + dbias` with `rs = rstd * scale`
  (no `E[dx]` term for uncentered statistics). Written as `rs * dx + xhat * a + c` with `a`,
  `c` of the statistics' shape, so that its transpose (reverse mode) reduces `g * xhat` and `g`
  once each for the mean terms, the scale and the bias alike whenever the parameters are
  constant along the reduced axes.

  Args:
    x: the primal input.
    stats: `moments(x, axes, ...)` (any split of the mean into `shift + offset`).
    rstd_: `rstd(stats.var, eps)`.
    scale: the multiplier or None; `dscale`, `dbias`: tangents of scale and bias, or None.
    dx: the tangent of `x`.
    axes, mask, axis_name, axis_index_groups, groups: as in `moments`.
    spread: for centered statistics, an optional `spread(x, stats, rstd_, a, c)` computing
      `xhat * a + c` (float32, `x.shape`) for `a`, `c` of the statistics' shape: a kernel
      whose transpose reduces the cotangent in one read (`normjax._src.kernels.moments`). Used
      only where `a` and `c` are constant along `axes`.

  Returns:
    The tangent of `y`, of `x.shape` and `x.dtype`.
  """
  dtype = rstd_.dtype
  keep = lambda v: _counted_only(v, mask)
  safe_count = jnp.maximum(stats.count, jnp.ones((), dtype))
  mean = lambda v: _total(keep(v), axes, axis_name, axis_index_groups, groups) / safe_count
  xhat = _centered(x, stats) * rstd_
  dx = dx.astype(dtype)
  rs = rstd_ if scale is None else rstd_ * scale.astype(dtype)
  a = -rs * mean(xhat * dx)                         # -rs E[xhat * dx]
  if dscale is not None:
    a = a + dscale.astype(dtype)
  c = None if dbias is None else dbias.astype(dtype)
  if stats.offset is not None:
    c = -rs * mean(dx) if c is None else -rs * mean(dx) + c
    # The kernel takes `a` and `c` per statistic: not where the scale (or the bias's tangent)
    # varies along a reduced axis (layer norm over a leading axis with its feature scale).
    if spread is not None and all(jnp.shape(v)[i] == 1 for v in (a, c) for i in axes):
      return (rs * dx + spread(x, stats, rstd_, a, c)).astype(x.dtype)
  dy = rs * dx + xhat * a
  if c is not None:
    dy = dy + c
  return dy.astype(x.dtype)


def _output_tangent(x, stats, eps, scale, bias, dx, dscale, dbias, mask, tangent_fn,
                    deps=None):
  """`(stats, dy)` in a JVP rule: the statistics, named for the checkpoint policy (the
  backward keeps them, not a normalized copy of `x`), and the tangent of `y` by `tangent_fn`,
  plus `xhat * scale * (-rstd**2 / 2) * deps` for a traced `eps` with tangent `deps`."""
  r = rstd(stats.var, eps)
  shift, offset, r = checkpoint_name((stats.shift, stats.offset, r), _STATS_NAME)
  stats = stats._replace(shift=shift, offset=offset)
  dy = tangent_fn(x, stats, r, scale, dx, None if scale is None else dscale,
                  None if bias is None else dbias, mask)
  if deps is not None and deps.dtype != jax.dtypes.float0:
    factor = -0.5 * r * r * deps.astype(r.dtype)
    dy = (dy + _affine(_centered(x, stats) * r, factor, scale, None)).astype(dy.dtype)
  return stats, dy


def _with_eps(fn, rule, eps):
  """`fn(*args)` as a `jax.custom_jvp` with the JVP `rule(eps, primals, tangents, deps)`.

  A concrete `eps` stays a constant of the rule (`deps` None). A traced one (an argument of a
  jitted function, or the variable of `jax.grad`) cannot be closed over by a `custom_jvp`, so
  it is passed as one more argument, with its tangent `deps`.
  Returns `(function, extra arguments)` to call the function with after the others.
  """
  if not isinstance(eps, jax.core.Tracer):
    f = jax.custom_jvp(lambda *args: fn(*args, eps))
    f.defjvp(lambda primals, tangents: rule(eps, primals, tangents, None))
    return f, ()
  f = jax.custom_jvp(fn)
  f.defjvp(lambda primals, tangents: rule(primals[-1], primals[:-1], tangents[:-1],
                                          tangents[-1]))
  return f, (eps,)


def standardize(x: jax.Array, axes: _axes.Axes, scale: jax.Array | None,
                bias: jax.Array | None, eps: Any, *, mask: jax.Array | None = None,
                axis_name: Any = None, axis_index_groups: Any = None,
                fast_variance: bool = False, centered: bool = True,
                groups: tuple[int, int] | None = None,
                forward: Callable | None = None,
                tangent_fn: Callable | None = None) -> tuple[jax.Array, Moments]:
  """`normalize(x, moments(x, axes, ...), scale, bias, eps)`, with a closed-form derivative.

  Same arguments as `moments` and `normalize`. Returns `(y, stats)`; `stats` (the `Moments`)
  is differentiable too (`d mean = E[dx]`, `d var = 2 E[(x - mean) dx]`).

  The derivative is a `jax.custom_jvp` rule (so forward mode, reverse mode and higher orders
  all work), evaluated under `jax.checkpoint` so that reverse mode keeps only `x` and the
  per-row statistics (`shift`, `offset`, `rstd`) for the backward. A traced `eps` (a learned
  one, or a `jax.jit` argument) is differentiated too.

  `forward(x, scale, bias, mask) -> (y, Moments)` and `tangent_fn(x, stats, rstd, scale, dx,
  dscale, dbias, mask) -> dy` replace the reference computations (`moments` + `normalize`,
  and `tangent`) with a kernel's (`normjax._dispatch` passes them); they must compute the same
  functions.
  """
  dtype = stats_dtype(x.dtype)
  reduce = dict(axis_name=axis_name, axis_index_groups=axis_index_groups, groups=groups)
  moment_args = dict(fast_variance=fast_variance, centered=centered, **reduce)

  if forward is None:
    # The statistics and the normalize step must see the same values: under `jit`, XLA may
    # keep a bfloat16/float16 `x` produced by a fused op (`x + residual`) in float32 in some
    # consumers and not others (excess precision), which gave garbage for `1e5 + N(0, 1)`
    # in bfloat16. `moments` and the normalize step each read `x` pinned to its rounding
    # (`pinned_reads`; a kernel reads a materialized `x`).
    def run(x, scale, bias, mask, eps):
      stats = moments(x, axes, mask=mask, **moment_args)
      return normalize(pin_rounding(x), stats, scale, bias, eps), stats
  else:
    run = lambda x, scale, bias, mask, eps: forward(x, scale, bias, mask)
  if tangent_fn is None:
    def tangent_fn(x, stats, rstd_, scale, dx, dscale, dbias, mask):
      return tangent(x, stats, rstd_, scale, dx, dscale, dbias, axes, mask=mask, **reduce)

  def fn_jvp(eps, primals, tangents, deps):
    x, scale, bias, mask = primals
    dx, dscale, dbias, _ = tangents
    y, stats = run(x, scale, bias, mask, eps)
    # The derivative reads `x` pinned to its rounding too, as the forward's passes do: a
    # bfloat16 `x` from a fused op would otherwise enter `xhat` with excess precision.
    x = pin_rounding(x)
    stats, dy = _output_tangent(x, stats, eps, scale, bias, dx, dscale, dbias, mask,
                                tangent_fn, deps)
    # The statistics' own tangents (dropped when the caller does not use them).
    keep = lambda v: _counted_only(v, mask)
    safe_count = jnp.maximum(stats.count, jnp.ones((), dtype))
    mean = lambda v: _total(keep(v), axes, **reduce) / safe_count
    dxf = dx.astype(dtype)
    dvar = 2.0 * mean(_centered(x, stats) * dxf)     # 2 E[(x - mean) dx]
    dmean = None if stats.offset is None else mean(dxf)
    dstats = Moments(shift=None if stats.shift is None else jnp.zeros_like(stats.shift),
                     offset=dmean, var=dvar, count=jnp.zeros_like(stats.count))
    return (y, stats), (dy, dstats)

  fn, extra = _with_eps(run, fn_jvp, eps)
  policy = jax.checkpoint_policies.save_only_these_names(_STATS_NAME)
  return jax.checkpoint(fn, policy=policy)(x, scale, bias, mask, *extra)


def pinned_reads(x: jax.Array, n: int) -> tuple[jax.Array, ...]:
  """`n` handles on `x`, each rounded to `x`'s own (sub-float32) dtype for every consumer.

  Under `jit`, XLA may compute a bfloat16/float16 value made by a fused op in float32 in some
  consumers and round it in others (excess precision, see `residual_sum`); each handle is
  pinned to the rounding. Float32 and wider come back as they are.

  On CPU the handles are the results of one `optimization_barrier`, so each consumer reads
  the materialized `x` (as a kernel does) through its own handle: XLA:CPU then gives each
  reduction over `x` its own bfloat16-to-float32 conversion inside its YNNPACK fusion,
  rather than writing a float32 copy of `x` that both read (a shared `convert`, or a
  `reduce_precision`, which YNNPACK does not fuse). Elsewhere a `reduce_precision`, which
  fuses into the consumers.
  """
  fi = jnp.finfo(x.dtype)
  if fi.bits >= 32:
    return (x,) * n

  def rounded(x):
    return (lax.reduce_precision(x, exponent_bits=fi.nexp, mantissa_bits=fi.nmant),) * n

  def materialized(x):
    return tuple(lax.optimization_barrier((x,) * n))
  return tuple(lax.platform_dependent(x, cpu=materialized, default=rounded))


def pin_rounding(x: jax.Array) -> jax.Array:
  """`x` rounded to its own (sub-float32) dtype for every consumer (`pinned_reads(x, 1)`)."""
  return pinned_reads(x, 1)[0]


def residual_sum(x: jax.Array, residual: jax.Array) -> jax.Array:
  """`x + residual` in `x.dtype`, rounded to it for every consumer.

  Under `jit`, XLA may keep a bfloat16/float16 sum in float32 where it fuses the add into a
  consumer (excess precision), so that the reductions and the normalize step of one call see
  differently rounded values (garbage for `1e5 + N(0, 1)` in bfloat16); `pin_rounding` pins
  the rounding, so the statistics are those of the `h` that is returned.
  """
  return pin_rounding(x + residual)


def add_standardize(x: jax.Array, residual: jax.Array, axes: _axes.Axes,
                    scale: jax.Array | None, bias: jax.Array | None, eps: Any, *,
                    centered: bool = True, add_forward: Callable | None = None,
                    tangent_fn: Callable | None = None) -> tuple[jax.Array, jax.Array]:
  """`(standardize(h, axes, scale, bias, eps)[0], h)` with `h = x + residual` (in `x.dtype`).

  For a kernel that computes the residual add and the forward in one pass
  (`add_forward(x, residual, scale, bias) -> (y, h, Moments of h)`). The derivative is the
  same closed form as `standardize`'s, at `h`: `dh = dx + dresidual`, `dy = tangent_fn(h, ...,
  dh, ...)`; under reverse mode the backward keeps `h` and the per-row statistics.
  """
  reduce = dict(axis_name=None, axis_index_groups=None, groups=None)
  if add_forward is None:
    def run(x, residual, scale, bias, eps):
      h = residual_sum(x, residual)
      stats = moments(h, axes, centered=centered, **reduce)
      return normalize(h, stats, scale, bias, eps), h, stats
  else:
    run = lambda x, residual, scale, bias, eps: add_forward(x, residual, scale, bias)
  if tangent_fn is None:
    def tangent_fn(x, stats, rstd_, scale, dx, dscale, dbias, mask):
      return tangent(x, stats, rstd_, scale, dx, dscale, dbias, axes, mask=mask, **reduce)

  def fn(x, residual, scale, bias, eps):
    y, h, _ = run(x, residual, scale, bias, eps)
    return y, h

  def fn_jvp(eps, primals, tangents, deps):
    x, residual, scale, bias = primals
    dx, dresidual, dscale, dbias = tangents
    y, h, stats = run(x, residual, scale, bias, eps)
    h = checkpoint_name(h, _SUM_NAME)
    dh = dx + dresidual
    _, dy = _output_tangent(h, stats, eps, scale, bias, dh, dscale, dbias, None, tangent_fn,
                            deps)
    return (y, h), (dy, dh)

  fn, extra = _with_eps(fn, fn_jvp, eps)
  policy = jax.checkpoint_policies.save_only_these_names(_STATS_NAME, _SUM_NAME)
  return jax.checkpoint(fn, policy=policy)(x, residual, scale, bias, *extra)


def l2_normalize(v: jax.Array, eps: Any) -> jax.Array:
  """`v / max(||v||, eps)` over the last axis (PyTorch's `F.normalize`); a zero `v` stays 0.

  The floor is on the norm, not on the squared norm (flax's `v * rsqrt(sum(v**2) + eps)`),
  so a vector of norm >= `eps` comes out of unit norm however small it is (1e-7 as well as 1).
  """
  norm = jnp.sqrt(jnp.sum(v * v, axis=-1, keepdims=True))
  floor = jnp.maximum(norm, jnp.asarray(eps, v.dtype))
  return v / jnp.where(floor > 0, floor, jnp.ones((), v.dtype))


def power_iteration(w: jax.Array, u: jax.Array, n_steps: int,
                    eps: Any) -> tuple[jax.Array, jax.Array, jax.Array]:
  """`n_steps` power iterations for the largest singular value of the matrix `w` `[M, K]`.

  - Each step is `v = l2(w u)`, `u = l2(w^T v)` (Miyato et al., 2018; flax's order), with
    PyTorch's `l2(x) = x / max(||x||, eps)`: a small kernel (spectral norm 1e-7) is
    normalized exactly as a large one.
  - A step whose `w^T v` has a norm below `eps` (or 0: a zero kernel, or `u` orthogonal to
    its rows) keeps the previous `u`, so `u` stays a unit vector and the state recovers as
    soon as the kernel is not zero (PyTorch's `u` becomes 0, its output NaN, for good).
  - Returns `(u [K], v [M], sigma)` with `sigma = v^T w u`; `u` and `v` are held constant
    (`stop_gradient`), so `sigma` is differentiable in `w` only, as in the paper.
  """
  v = None
  eps = jnp.asarray(eps, w.dtype)
  for _ in range(n_steps):
    v = l2_normalize(w @ u, eps)
    t = v @ w
    norm = jnp.sqrt(jnp.sum(t * t))
    unit = (norm > 0) & (norm >= eps)
    u = jnp.where(unit, t / jnp.where(unit, norm, jnp.ones((), norm.dtype)), u)
  u, v = lax.stop_gradient(u), lax.stop_gradient(v)
  return u, v, v @ (w @ u)


def renormalize(xhat: jax.Array, batch: Moments, mean: jax.Array, var: jax.Array,
                scale: jax.Array | None, bias: jax.Array | None, eps: Any, r_max: Any,
                d_max: Any, active: jax.Array) -> jax.Array:
  """Batch renormalization's output (Ioffe, 2017) from the standardized `xhat`.

  `y = (xhat * r + d) * scale + bias` with `xhat = (x - mu_B) / sigma_B` (the batch's biased
  statistics, `sigma_B = sqrt(var_B + eps)`), `sigma = sqrt(var + eps)` of the running
  statistics, `r = clip(sigma_B / sigma, 1 / r_max, r_max)` and
  `d = clip((mu_B - mean) / sigma, -d_max, d_max)`, both held constant (`stop_gradient`), so
  gradients flow through `xhat` as in batch norm. Where `active` is False, `r = 1` and `d = 0`.

  Args:
    xhat: `standardize(x, axes, None, None, eps)`'s output.
    batch: its `Moments`.
    mean, var: the running statistics, broadcastable against `xhat`.
    scale, bias: optional, broadcastable against `xhat`.
    eps: added to both variances.
    r_max, d_max: the clipping bounds (Python floats or traced scalars).
    active: bool scalar, False during warmup (plain batch norm).

  Returns:
    `y` of `xhat.shape` and `xhat.dtype`, computed in `stats_dtype`.
  """
  dtype = stats_dtype(xhat.dtype)
  eps_ = jnp.asarray(eps, dtype)
  sigma = jnp.sqrt(var.astype(dtype) + eps_)
  batch_mean = lax.stop_gradient(batch.mean).astype(dtype)
  sigma_b = jnp.sqrt(lax.stop_gradient(batch.var).astype(dtype) + eps_)
  r_max, d_max = jnp.asarray(r_max, dtype), jnp.asarray(d_max, dtype)
  r = jnp.clip(sigma_b / sigma, jnp.ones((), dtype) / r_max, r_max)
  d = jnp.clip((batch_mean - mean.astype(dtype)) / sigma, -d_max, d_max)
  r = lax.stop_gradient(jnp.where(active, r, jnp.ones((), dtype)))
  d = lax.stop_gradient(jnp.where(active, d, jnp.zeros((), dtype)))
  if scale is not None:
    r, d = r * scale.astype(dtype), d * scale.astype(dtype)
  if bias is not None:
    d = d + bias.astype(dtype)
  return (xhat.astype(dtype) * r + d).astype(xhat.dtype)
