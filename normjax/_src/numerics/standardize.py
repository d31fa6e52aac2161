"""The normalize step and the closed-form derivative: the one `custom_jvp` + `checkpoint`.

- `standardize` is `moments` + `normalize` with a closed-form derivative (`jax.custom_jvp`):
  the tangent is `rstd * (dx - E[dx] - xhat * E[xhat * dx])` (`tangent`), so reverse mode
  needs no normalized copy of `x`.
- It runs under `jax.checkpoint` with a policy that saves only the named statistics: the
  backward keeps `x` and per-row `(shift, offset, rstd)` and recomputes `xhat` elementwise.
- Being a JVP rule written in `jax.numpy`, it is itself differentiable: forward mode, reverse
  mode and any order of derivative; a traced `eps` is differentiated too.
- A kernel replaces the forward (`forward`) and the tangent (`tangent_fn`) with its own
  (`normjax._src.dispatch` passes them); the derivative and its wrapper exist once, here.

Special values: a row whose variance is not finite normalizes to NaN on every path (as flax's
does), never to zeros: a NaN or Inf in the row, or a sum beyond float32's range.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.ad_checkpoint import checkpoint_name

from normjax._src.numerics.moments import Moments
from normjax._src.numerics.moments import counted_only
from normjax._src.numerics.moments import moments
from normjax._src.numerics.moments import stats_dtype
from normjax._src.numerics.moments import subtract_mean
from normjax._src.numerics.moments import total
from normjax._src.numerics.rounding import pin_rounding
from normjax._src.numerics.rounding import residual_sum
from normjax._src.shapes import Axes

_STATS_NAME = "normjax_stats"
_SUM_NAME = "normjax_residual_sum"  # h = x + residual in `add_standardize`, kept for the backward


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
  return _affine(subtract_mean(x, stats), rstd(stats.var, eps), scale, bias).astype(x.dtype)


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
            axes: Axes, *, mask: jax.Array | None = None, axis_name: Any = None,
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
  keep = lambda v: counted_only(v, mask)
  safe_count = jnp.maximum(stats.count, jnp.ones((), dtype))
  mean = lambda v: total(keep(v), axes, axis_name, axis_index_groups, groups) / safe_count
  xhat = subtract_mean(x, stats) * rstd_
  dx = dx.astype(dtype)
  if scale is not None and any(jnp.shape(scale)[i] != 1 for i in axes):
    # The scale varies along the reduced axes (layer/RMS norm's feature scale, adaLN's per
    # example): `scale * (rstd dx + xhat a + c) + xhat dscale + dbias` with `a`, `c` per
    # statistic, so that the transpose multiplies the cotangent by the scale once and reduces
    # it per row, with no full-shaped `rstd * scale` (a full-shaped `a` made XLA:CPU write out
    # the broadcast rstd, `xhat` and `g * xhat`: 1.4-1.6x the training step of
    # `rms_norm(x) * scale` on the jax.numpy path).
    a = -rstd_ * mean(xhat * dx)
    inner = rstd_ * dx + xhat * a
    if stats.offset is not None:
      inner = inner - rstd_ * mean(dx)
    dy = inner * scale.astype(dtype)
    if dscale is not None:
      dy = dy + xhat * dscale.astype(dtype)
    if dbias is not None:
      dy = dy + dbias.astype(dtype)
    return dy.astype(x.dtype)
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


def _named_stats(stats, eps):
  """`(stats, rstd)` in a JVP rule, named for the checkpoint policy (the backward keeps them,
  not a normalized copy of `x`)."""
  r = rstd(stats.var, eps)
  shift, offset, r = checkpoint_name((stats.shift, stats.offset, r), _STATS_NAME)
  return stats._replace(shift=shift, offset=offset), r


def _used(param, tangent):
  """A parameter's tangent for a tangent function: None where the parameter is None."""
  return None if param is None else tangent


def _eps_tangent(dy, x, stats, r, scale, deps):
  """`dy` plus `xhat * scale * (-rstd**2 / 2) * deps` for a traced `eps` with tangent `deps`
  (`dy` itself for a constant `eps`)."""
  if deps is None or deps.dtype == jax.dtypes.float0:
    return dy
  factor = -0.5 * r * r * deps.astype(r.dtype)
  return (dy + _affine(subtract_mean(x, stats) * r, factor, scale, None)).astype(dy.dtype)


# The residual-add norm's tangents at `h = x + residual`:
# `add_tangent(h, stats, rstd, scale, dx, dresidual, dscale, dbias, mask) -> (dy, dh)`.
AddTangent = Callable[..., tuple[jax.Array, jax.Array]]


def sum_tangent(tangent_fn: Callable) -> AddTangent:
  """The residual-add norm's `add_tangent` from a norm's `tangent_fn`: `dh = dx + dresidual`
  in `h`'s dtype, and `tangent_fn`'s tangent of `y` at `h` for it."""
  def add_tangent(h, stats, rstd_, scale, dx, dresidual, dscale, dbias, mask):
    dh = dx.astype(h.dtype) + dresidual.astype(h.dtype)
    return tangent_fn(h, stats, rstd_, scale, dh, dscale, dbias, mask), dh
  return add_tangent


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


def standardize(x: jax.Array, axes: Axes, scale: jax.Array | None,
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
    stats, r = _named_stats(stats, eps)
    dy = tangent_fn(x, stats, r, scale, dx, _used(scale, dscale), _used(bias, dbias), mask)
    dy = _eps_tangent(dy, x, stats, r, scale, deps)
    # The statistics' own tangents (dropped when the caller does not use them).
    keep = lambda v: counted_only(v, mask)
    safe_count = jnp.maximum(stats.count, jnp.ones((), dtype))
    mean = lambda v: total(keep(v), axes, **reduce) / safe_count
    dxf = dx.astype(dtype)
    dvar = 2.0 * mean(subtract_mean(x, stats) * dxf)     # 2 E[(x - mean) dx]
    dmean = None if stats.offset is None else mean(dxf)
    dstats = Moments(shift=None if stats.shift is None else jnp.zeros_like(stats.shift),
                     offset=dmean, var=dvar, count=jnp.zeros_like(stats.count))
    return (y, stats), (dy, dstats)

  fn, extra = _with_eps(run, fn_jvp, eps)
  policy = jax.checkpoint_policies.save_only_these_names(_STATS_NAME)
  return jax.checkpoint(fn, policy=policy)(x, scale, bias, mask, *extra)



def add_standardize(x: jax.Array, residual: jax.Array, axes: Axes,
                    scale: jax.Array | None, bias: jax.Array | None, eps: Any, *,
                    centered: bool = True, add_forward: Callable | None = None,
                    add_tangent: AddTangent | None = None) -> tuple[jax.Array, jax.Array]:
  """`(standardize(h, axes, scale, bias, eps)[0], h)` with `h = x + residual` (in `x.dtype`).

  For a kernel that computes the residual add and the forward in one pass
  (`add_forward(x, residual, scale, bias) -> (y, h, Moments of h)`; a kernel may take a
  float32 `residual` with a bfloat16 `x`, and return `h` in float32 and `y` in `x.dtype`).
  The derivative is the same closed form as `standardize`'s, at `h`: `dh = dx + dresidual`,
  `dy` the norm's tangent at `h` for `dh`; `add_tangent(h, stats, rstd, scale, dx, dresidual,
  dscale, dbias, mask) -> (dy, dh)` computes both (default: `sum_tangent` of the closed form;
  a kernel's takes both tangents in one primitive, whose transpose receives both
  cotangents). Under reverse mode the backward keeps `h` and the per-row statistics.
  """
  reduce: dict[str, Any] = dict(axis_name=None, axis_index_groups=None, groups=None)
  if add_forward is None:
    def run(x, residual, scale, bias, eps):
      h = residual_sum(x, residual)
      stats = moments(h, axes, centered=centered, **reduce)
      return normalize(h, stats, scale, bias, eps), h, stats
  else:
    run = lambda x, residual, scale, bias, eps: add_forward(x, residual, scale, bias)
  if add_tangent is None:
    add_tangent = sum_tangent(
        lambda x, stats, rstd_, scale, dx, dscale, dbias, mask: tangent(
            x, stats, rstd_, scale, dx, dscale, dbias, axes, mask=mask, **reduce))

  def fn(x, residual, scale, bias, eps):
    y, h, _ = run(x, residual, scale, bias, eps)
    return y, h

  def fn_jvp(eps, primals, tangents, deps):
    x, residual, scale, bias = primals
    dx, dresidual, dscale, dbias = tangents
    y, h, stats = run(x, residual, scale, bias, eps)
    h = checkpoint_name(h, _SUM_NAME)
    stats, r = _named_stats(stats, eps)
    dy, dh = add_tangent(h, stats, r, scale, dx, dresidual, _used(scale, dscale),
                         _used(bias, dbias), None)
    dy = _eps_tangent(dy, h, stats, r, scale, deps)
    return (y, h), (dy.astype(y.dtype), dh)

  fn, extra = _with_eps(fn, fn_jvp, eps)
  policy = jax.checkpoint_policies.save_only_these_names(_STATS_NAME, _SUM_NAME)
  return jax.checkpoint(fn, policy=policy)(x, residual, scale, bias, *extra)

