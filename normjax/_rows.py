"""Normalization over contiguous rows (layer, RMS and instance norm over trailing axes).

`_core.standardize` hands this module every normalization whose normalized axes are the
trailing axes of a float32/bfloat16 input, without a mask, named axis or channel grouping,
and whose scale and bias vary either along the normalized axes only (layer/RMS norm:
`per_row=False`) or along the other axes only (instance norm with channels first:
`per_row=True`, one scale per row). The input is viewed as `[rows, features]` and three
primitives do the work:

  * `rows_forward_p`: `x, scale, bias -> y, shift, offset, var` (per-row statistics; the mean
    is `shift + offset`, as in `_core.Moments`).
  * `rows_tangent_p`: the tangent of `y`, linear in `(dx, dscale, dbias)` (the closed form of
    `_core.standardize`'s JVP rule). Its transpose is
  * `rows_backward_p`: `x, g, stats, scale -> dx, dscale, dbias`, the closed-form backward.

Each has a `jax.numpy` definition (`_forward_reference`, ...) that gives its lowering on every
platform, its JVP (so forward mode and all higher orders work) and its batching rule when the
batch cannot be folded into the rows. On CPU, when the native library
(`normjax/_native/rows.cc`, built at install time) is present, `rows_forward_p` and
`rows_backward_p` lower to XLA FFI calls instead: one read of each row per pass, on XLA's
intra-op threads. Set `NORMJAX_NATIVE=0` before importing normjax to use the `jax.numpy`
definitions everywhere.

Costs of a custom call: it is a fusion barrier (an elementwise op producing `x`, such as a
residual add, is written out before the kernel reads it, where XLA could have fused it), and
XLA's SPMD partitioner does not know how to split it: under `jit` with an input sharded over
several CPU devices along mesh axes of type `Auto`, the call runs on the gathered input
(correct, not fast; use `shard_map`, as tests/test_distributed.py does, or
`NORMJAX_NATIVE=0`). Inputs sharded along `Explicit` mesh axes (the default of
`jax.make_mesh`) take `_core`'s XLA path instead, which shards like any jax.numpy code. A
program exported with `jax.export` names the kernel, so loading it needs normjax imported.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.ad_checkpoint import checkpoint_name
from jax.extend import core as jex_core
from jax.interpreters import ad, batching, mlir

from normjax import _core
from normjax import _native

_F32 = jnp.dtype(jnp.float32)
_NATIVE_DTYPES = {jnp.dtype(jnp.float32): "F32", jnp.dtype(jnp.bfloat16): "BF16"}


def explicitly_sharded(x) -> bool:
  """Whether `x` is sharded along an `Explicit` mesh axis (its type carries the sharding):
  such inputs keep XLA's own ops, which shard like any jax.numpy code (see module doc)."""
  spec = getattr(getattr(jax.typeof(x), "sharding", None), "spec", None)
  return spec is not None and any(s is not None for s in spec)


def param_layout(x, axes, scale, bias, mask, axis_name, groups, fast_variance) -> str | None:
  """How `_core.standardize(x, axes, ...)` maps onto rows: None if it is not a row
  normalization this module handles; "features" when the scale and bias vary along the
  normalized (trailing) axes only (layer/RMS norm); "rows" when they vary along the other axes
  only (instance norm over the trailing axes: one scale per row)."""
  k = len(axes)
  if (mask is not None or axis_name is not None or groups is not None or fast_variance
      or jnp.dtype(x.dtype) not in _NATIVE_DTYPES or k == 0 or x.size == 0
      or tuple(axes) != tuple(range(x.ndim - k, x.ndim))):
    return None
  if explicitly_sharded(x):
    return None
  lead = x.ndim - k

  def layout(p):
    if p.shape == (1,) * lead + x.shape[lead:]:
      return "features"
    if all(d == 1 for d in p.shape[lead:]) and all(d in (1, n) for d, n in zip(p.shape, x.shape)):
      return "rows"
    return None
  layouts = {layout(p) for p in (scale, bias) if p is not None}
  if None in layouts or len(layouts) > 1:
    return None
  return layouts.pop() if layouts else "features"


# ----------------------------------------------------------------- jax.numpy definitions

def _expand(param, per_row):
  """A per-feature `[features]` or per-row `[rows]` parameter as a 2-D `[rows, features]` operand."""
  return param[:, None] if per_row else param[None]


def _rstd(var, eps):
  """`rsqrt(var + eps)` where the variance is finite, else NaN (as the kernel): a row whose
  variance overflows float32 comes out NaN, not zero."""
  return jnp.where(jnp.isfinite(var), lax.rsqrt(var + jnp.asarray(eps, var.dtype)),
                   jnp.asarray(jnp.nan, var.dtype))


def _forward_reference(x, scale, bias, *, eps, centered, per_row):
  stats = _core.moments(x, (1,), centered=centered)
  # A non-finite variance normalizes with NaN (see _rstd); the variance itself is returned.
  finite = stats._replace(var=jnp.where(jnp.isfinite(stats.var), stats.var,
                                        jnp.asarray(jnp.nan, stats.var.dtype)))
  y = _core.normalize(x, finite, _expand(scale, per_row), _expand(bias, per_row), eps)
  zero = jnp.zeros_like(stats.var)
  shift = zero if stats.shift is None else stats.shift
  offset = zero if stats.offset is None else stats.offset
  return y, shift[:, 0], offset[:, 0], stats.var[:, 0]


def _xhat(x, shift, offset, rstd):
  return ((x.astype(_F32) - shift[:, None]) - offset[:, None]) * rstd[:, None]


def _tangent_reference(x, shift, offset, rstd, scale, dx, dscale, dbias, *, centered, per_row):
  """d y = rstd*scale*(dx - E[dx] - xhat E[xhat dx]) + xhat dscale + dbias (no E[dx] for RMS)."""
  xhat = _xhat(x, shift, offset, rstd)
  dx = dx.astype(_F32)
  centred_dx = dx - jnp.mean(dx, axis=1, keepdims=True) if centered else dx
  dxhat = rstd[:, None] * (centred_dx - xhat * jnp.mean(xhat * dx, axis=1, keepdims=True))
  e = functools.partial(_expand, per_row=per_row)
  return ((dxhat * e(scale) + xhat * e(dscale) + e(dbias)).astype(x.dtype),)


def _backward_reference(x, g, shift, offset, rstd, scale, *, centered, per_row):
  """The transpose of `_tangent_reference` in `(dx, dscale, dbias)`."""
  xhat = _xhat(x, shift, offset, rstd)
  g = g.astype(_F32)
  gs = g * _expand(scale, per_row)
  centred_gs = gs - jnp.mean(gs, axis=1, keepdims=True) if centered else gs
  dx = rstd[:, None] * (centred_gs - xhat * jnp.mean(gs * xhat, axis=1, keepdims=True))
  params_axis = 1 if per_row else 0
  return dx.astype(x.dtype), jnp.sum(g * xhat, axis=params_axis), jnp.sum(g, axis=params_axis)


# ----------------------------------------------------------------- the primitives

@functools.lru_cache(maxsize=None)
def _compiled_bind(p, params):
  """Eager evaluation of primitive `p`: compiled, so that the CPU kernel runs as under jit."""
  return jax.jit(lambda *args: p.bind(*args, **dict(params)))


def define_primitive(name, reference, abstract_eval, native_target=None):
  """A primitive defined by `reference` (a jax.numpy function returning a tuple of arrays):
  its lowering, its JVP and its eager evaluation. With `native_target` (an FFI target name
  without its dtype suffix) it lowers to that CPU kernel for float32/bfloat16 input, when the
  native library is loaded."""
  p = jex_core.Primitive(name)
  p.multiple_results = True
  p.def_impl(lambda *args, **params: _compiled_bind(p, tuple(sorted(params.items())))(*args))
  p.def_abstract_eval(abstract_eval)
  reference_lowering = mlir.lower_fun(reference, multiple_results=True)
  mlir.register_lowering(p, reference_lowering)
  if native_target is not None and _native.NATIVE:
    mlir.register_lowering(p, _native_lowering(native_target, reference_lowering),
                           platform="cpu")

  def jvp(primals, tangents, **params):
    tangents = tuple(ad.instantiate_zeros(t) for t in tangents)
    primals_out, tangents_out = jax.jvp(functools.partial(reference, **params), tuple(primals),
                                        tangents)
    return list(primals_out), list(tangents_out)
  ad.primitive_jvps[p] = jvp
  return p


def _native_lowering(target, fallback):
  def lowering(ctx, *args, **params):
    dtype = _NATIVE_DTYPES.get(jnp.dtype(ctx.avals_in[0].dtype))
    if dtype is None:
      return fallback(ctx, *args, **params)
    params = {k: np.float32(v) if isinstance(v, float) else
              bool(v) if isinstance(v, (bool, np.bool_)) else np.int64(v)
              for k, v in params.items()}
    return jax.ffi.ffi_lowering(f"{target}{dtype}")(ctx, *args, **params)
  return lowering


def _shaped(shape, dtype):
  return jax.core.ShapedArray(shape, dtype)


def _forward_abstract(x, scale, bias, *, eps, centered, per_row):
  del scale, bias, eps, centered, per_row
  row = _shaped(x.shape[:1], _F32)
  return [_shaped(x.shape, x.dtype), row, row, row]


def _tangent_abstract(x, *args, centered, per_row):
  del args, centered, per_row
  return [_shaped(x.shape, x.dtype)]


def _backward_abstract(x, g, shift, offset, rstd, scale, *, centered, per_row):
  del g, shift, offset, rstd, centered, per_row
  return [_shaped(x.shape, x.dtype), _shaped(scale.shape, _F32), _shaped(scale.shape, _F32)]


rows_forward_p = define_primitive("normjax_rows_forward", _forward_reference, _forward_abstract,
                                  native_target="NormjaxRowsForward")
rows_tangent_p = define_primitive("normjax_rows_tangent", _tangent_reference, _tangent_abstract)
rows_backward_p = define_primitive("normjax_rows_backward", _backward_reference,
                                   _backward_abstract, native_target="NormjaxRowsBackward")


def _tangent_transpose(cts, x, shift, offset, rstd, scale, dx, dscale, dbias, *, centered,
                       per_row):
  (ct,) = cts
  linear = (dx, dscale, dbias)
  if type(ct) is ad.Zero:
    return [None] * 5 + [None] * 3
  grads = rows_backward_p.bind(x, ct, shift, offset, rstd, scale, centered=centered,
                               per_row=per_row)
  return [None] * 5 + [g if ad.is_undefined_primal(v) else None for g, v in zip(grads, linear)]


ad.primitive_transposes[rows_tangent_p] = _tangent_transpose


# ----------------------------------------------------------------- batching

def _batch_by_reference(reference):
  def rule(args, dims, **params):
    outs = jax.vmap(functools.partial(reference, **params), in_axes=tuple(dims))(*args)
    return outs, [0] * len(outs)
  return rule


def _batch_rows(p, reference, feature_operands, sums_over_rows=False):
  """Folds the batch into the rows when only per-row operands are batched: every output of a
  per-row computation is per row, so `[B, rows, ...]` is `[B * rows, ...]`. The operands at
  `feature_operands` are per feature (unless `per_row`), and a batch along them (a batched
  scale, say) is handled by `jax.vmap` of the `jax.numpy` definition instead; so is every
  batch of a primitive that `sums_over_rows` into per-feature outputs (unless `per_row`)."""
  fallback = _batch_by_reference(reference)

  def rule(args, dims, **params):
    per_feature = () if params["per_row"] else feature_operands
    if (sums_over_rows and not params["per_row"]) or any(dims[i] is not None
                                                        for i in per_feature):
      return fallback(args, dims, **params)
    size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
    args = list(args)
    for i in range(len(args)):
      if i not in per_feature:
        a = batching.bdim_at_front(args[i], dims[i], size)
        args[i] = a.reshape((-1,) + a.shape[2:])
    outs = p.bind(*args, **params)
    return [o.reshape((size, -1) + o.shape[1:]) for o in outs], [0] * len(outs)
  return rule


batching.primitive_batchers[rows_forward_p] = _batch_rows(
    rows_forward_p, _forward_reference, (1, 2))
batching.primitive_batchers[rows_tangent_p] = _batch_rows(
    rows_tangent_p, _tangent_reference, (4, 6, 7))
batching.primitive_batchers[rows_backward_p] = _batch_rows(
    rows_backward_p, _backward_reference, (5,), sums_over_rows=True)


# ----------------------------------------------------------------- the row normalization

_STATS_NAME = _core._STATS_NAME


def standardize_rows(x: jax.Array, n_axes: int, scale, bias, eps: float, *,
                     centered: bool = True,
                     layout: str = "features") -> tuple[jax.Array, _core.Moments]:
  """`_core.standardize` over the last `n_axes` axes via the primitives; `layout` is
  `param_layout(...)` ("features": parameters per feature, "rows": per row)."""
  lead, features = x.shape[:x.ndim - n_axes], x.shape[x.ndim - n_axes:]
  rows, n = math.prod(lead), math.prod(features)
  x2 = x.reshape(rows, n)
  per_row = layout == "rows"
  size = rows if per_row else n

  def as_vector(p, default):
    if p is None:
      return jnp.full((size,), default, _F32)
    if per_row:
      p = jnp.broadcast_to(p, lead + (1,) * n_axes)
    return p.reshape(size).astype(_F32)
  g, b = as_vector(scale, 1.0), as_vector(bias, 0.0)
  kw = dict(centered=centered, per_row=per_row)

  @jax.custom_jvp
  def fn(x2, g, b):
    y2, shift, offset, var = rows_forward_p.bind(x2, g, b, eps=eps, **kw)
    return y2, (shift, offset, var)

  @fn.defjvp
  def fn_jvp(primals, tangents):
    x2, g, b = primals
    dx, dg, db = tangents
    y2, shift, offset, var = rows_forward_p.bind(x2, g, b, eps=eps, **kw)
    rstd = _rstd(var, eps)
    shift, offset, rstd = checkpoint_name((shift, offset, rstd), _STATS_NAME)
    (dy,) = rows_tangent_p.bind(x2, shift, offset, rstd, g, dx, dg.astype(_F32),
                                db.astype(_F32), **kw)
    xhat_dx = jnp.mean(_xhat(x2, shift, offset, rstd) * dx.astype(_F32), axis=1)
    dvar = 2.0 * xhat_dx / rstd                                  # 2 E[(x - mean) dx]
    doffset = jnp.mean(dx.astype(_F32), axis=1) if centered else jnp.zeros_like(offset)
    return (y2, (shift, offset, var)), (dy, (jnp.zeros_like(shift), doffset, dvar))

  policy = jax.checkpoint_policies.save_only_these_names(_STATS_NAME)
  y2, (shift, offset, var) = jax.checkpoint(fn, policy=policy)(x2, g, b)
  stats_shape = lead + (1,) * n_axes
  stats_of = lambda v: v.reshape(stats_shape)
  count = jnp.asarray(n, _F32)
  if centered:
    stats = _core.Moments(shift=stats_of(shift), offset=stats_of(offset), var=stats_of(var),
                          count=count)
  else:
    stats = _core.Moments(shift=None, offset=None, var=stats_of(var), count=count)
  return y2.reshape(x.shape), stats
