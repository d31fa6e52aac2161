"""Normalization over contiguous rows: layer, RMS and instance norm over trailing axes.

The input is viewed as `[rows, features]` and these primitives do the work:

  * `rows_forward_p`: `x, scale, bias -> y, shift, offset, var` (per-row statistics; the mean
    is `shift + offset`, as in `Moments`).
  * `rows_tangent_p`: the tangent of `y`, linear in `(dx, dscale, dbias)`: `tangent`.
    Its transpose is
  * `rows_backward_p`: `x, g, shift, offset, rstd, scale -> dx, dscale, dbias`, whose
    definition is the transpose of `tangent` (`jax.linear_transpose`): the closed-form
    derivative is written once, in the numerics (`normjax._src.numerics`).
  * `rows_add_forward_p`: `x, residual, scale, bias -> y, h, shift, offset, var`, the forward
    of `h = x + residual` (in `x.dtype`) that also returns `h`: the residual add of a pre-norm
    block inside the kernel, which reads `x` and `residual` once and writes `y` and `h` (see
    the fusion barrier below). `rows_add_forward_mixed_p` is the same for a bfloat16 `x` and
    a float32 `residual` (`h` in float32, `y` in bfloat16; native only).
  * `rows_add_tangent_p`: the tangents of `y` and `h` at `h`, linear in the tangents of `x`
    and `residual` (and of scale and bias), `dh = dx + dresidual` in `h`'s dtype and `dy` in
    `x`'s; its transpose is
  * `rows_add_backward_p`: `x, g, g_h, shift, offset, rstd, scale -> dx, dscale, dbias`, the
    rows backward with `h`'s cotangent `g_h` added to `dx` in the same pass: the native
    residual-add norms' derivative (`add_ops`; elsewhere the rows tangent/backward at `h`).
    `rows_add_backward_mixed_p` is the same for a float32 `h` and a bfloat16 `g` (a float32
    residual stream): `-> dx, dh, dscale, dbias`, `dh` the float32 sum and `dx` its bfloat16
    rounding, the cotangents of `residual` and of `x` (native only); `rows_backward_mixed_p`
    is it without `g_h` (where `h` is not used after the norm: no float32 zeros to add).

Scale and bias are vectors: per feature (layer/RMS norm, `per_row=False`), per row
(instance norm with channels first, `per_row=True`), or per example and feature
(`example_rows=T > 0`: `[rows / T * features]`, one vector for each run of `T` consecutive
rows, as adaLN's `[B, 1, D]` modulation of `[B, T, D]`). On CPU, when the native library is
loaded (`normjax._src.kernels.cpu`), the forward and backward lower to its kernels: one read of
each row per pass, on XLA's intra-op threads. With `implementation="pallas"` (a parameter of
every rows primitive), the forward, the residual-add forward and the backward lower to the
Pallas kernels instead (`normjax._src.kernels.pallas`; interpret mode on CPU). `ops` gives
`standardize` the `forward`/`tangent` pair for one call; `normjax._src.dispatch` decides when
it applies and which implementation it asks for.

Costs of a custom call: it is a fusion barrier (an elementwise op producing `x`, such as a
residual add, is written out before the kernel reads it), and XLA's SPMD partitioner does not
know how to split it: under `jit` with an input sharded along `Auto` mesh axes the call runs
on the gathered input (correct, not fast). Inputs sharded along `Explicit` mesh axes take the
reference path (see `normjax._src.dispatch`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.extend import core as jex_core
from jax.interpreters import ad
from jax.interpreters import batching

from normjax._src.kernels import pallas
from normjax._src.kernels import primitives
from normjax._src.numerics.moments import Moments
from normjax._src.numerics.moments import moments
from normjax._src.numerics.rounding import pin_rounding
from normjax._src.numerics.rounding import residual_sum
from normjax._src.numerics.standardize import AddTangent
from normjax._src.numerics.standardize import normalize
from normjax._src.numerics.standardize import sum_tangent
from normjax._src.numerics.standardize import tangent

F32 = primitives.F32
Shape = tuple[int, ...]
ShapedArray = jax.core.ShapedArray
Vector = jax.Array | None  # a scale or bias (None: absent)
Linear = primitives.Linear
# `forward(x, scale, bias, mask) -> (y, Moments)`;
# `tangent(x, stats, rstd, scale, dx, dscale, dbias, mask) -> dy`;
# `add_forward(x, residual, scale, bias) -> (y, h, Moments of h)`.
Forward = Callable[[jax.Array, Vector, Vector, Vector], tuple[jax.Array, Moments]]
Tangent = Callable[[jax.Array, Moments, jax.Array, Vector, jax.Array, Vector, Vector, Vector],
                   jax.Array]
AddForward = Callable[[jax.Array, jax.Array, Vector, Vector],
                      tuple[jax.Array, jax.Array, Moments]]


def _expand(param: jax.Array, per_row: bool, example_rows: int = 0,
            n: int | None = None) -> jax.Array:
  """A per-feature `[features]`, per-row `[rows]` or per-example `[examples * features]`
  vector as a 2-D operand broadcasting against `[rows, features]`."""
  if per_row:
    return param[:, None]
  if example_rows:
    assert n is not None
    per_example = param.reshape(-1, 1, n)
    shape = (per_example.shape[0], example_rows, n)
    return jnp.broadcast_to(per_example, shape).reshape(-1, n)
  return param[None]


def _row_stats(x: jax.Array, shift: jax.Array, offset: jax.Array, var: jax.Array,
               centered: bool) -> Moments:
  count = jnp.asarray(x.shape[1], F32)
  if not centered:
    return Moments(shift=None, offset=None, var=var[:, None], count=count)
  return Moments(shift=shift[:, None], offset=offset[:, None], var=var[:, None],
                       count=count)


# ----------------------------------------------------------------- definitions (the numerics)

def _forward_reference(x: jax.Array, scale: jax.Array, bias: jax.Array, *, eps: float,
                       centered: bool, per_row: bool,
                       example_rows: int = 0) -> tuple[jax.Array, ...]:
  e = functools.partial(_expand, per_row=per_row, example_rows=example_rows, n=x.shape[1])
  stats = moments(x, (1,), centered=centered)
  y = normalize(pin_rounding(x), stats, e(scale), e(bias), eps)
  zero = jnp.zeros_like(stats.var)
  shift = zero if stats.shift is None else stats.shift
  offset = zero if stats.offset is None else stats.offset
  return y, shift[:, 0], offset[:, 0], stats.var[:, 0]


def _add_forward_reference(x: jax.Array, residual: jax.Array, scale: jax.Array,
                           bias: jax.Array, *, eps: float, centered: bool,
                           per_row: bool, example_rows: int = 0) -> tuple[jax.Array, ...]:
  # `h` pinned to its rounding, as `add_standardize` returns it (and as the kernel
  # writes it): its consumers downstream see the `h` whose statistics were taken. A float32
  # residual with a bfloat16 `x` (`rows_add_forward_mixed_p`): `h` in float32, `y` in bfloat16.
  h = residual_sum(x.astype(residual.dtype), residual)
  y, shift, offset, var = _forward_reference(h, scale, bias, eps=eps, centered=centered,
                                             per_row=per_row, example_rows=example_rows)
  return y.astype(x.dtype), h, shift, offset, var


def _tangent_reference(x: jax.Array, shift: jax.Array, offset: jax.Array, rstd: jax.Array,
                       scale: jax.Array, dx: jax.Array, dscale: jax.Array, dbias: jax.Array, *,
                       centered: bool, per_row: bool,
                       example_rows: int = 0) -> tuple[jax.Array]:
  e = functools.partial(_expand, per_row=per_row, example_rows=example_rows, n=x.shape[1])
  stats = _row_stats(x, shift, offset, rstd, centered)
  return (tangent(x, stats, rstd[:, None], e(scale), dx, e(dscale), e(dbias), (1,)),)


def _backward_reference(x: jax.Array, g: jax.Array, shift: jax.Array, offset: jax.Array,
                        rstd: jax.Array, scale: jax.Array, *, centered: bool,
                        per_row: bool, example_rows: int = 0) -> tuple[jax.Array, ...]:
  def linear(dx: jax.Array, dscale: jax.Array, dbias: jax.Array) -> jax.Array:
    return _tangent_reference(x, shift, offset, rstd, scale, dx, dscale, dbias,
                              centered=centered, per_row=per_row,
                              example_rows=example_rows)[0]
  like = (jax.ShapeDtypeStruct(x.shape, x.dtype), jax.ShapeDtypeStruct(scale.shape, F32),
          jax.ShapeDtypeStruct(scale.shape, F32))
  return tuple(jax.linear_transpose(linear, *like)(g))


def _add_tangent_reference(h: jax.Array, shift: jax.Array, offset: jax.Array, rstd: jax.Array,
                           scale: jax.Array, dx: jax.Array, dresidual: jax.Array,
                           dscale: jax.Array, dbias: jax.Array, *, centered: bool,
                           per_row: bool, example_rows: int = 0) -> tuple[jax.Array, jax.Array]:
  """The tangents of the residual-add norm's `(y, h)` at `h`: `dh = dx + dresidual` (in `h`'s
  dtype, as `add_standardize` adds them) and the norm's tangent, in `dx`'s dtype (`y`'s)."""
  dh = dx.astype(h.dtype) + dresidual.astype(h.dtype)
  (dy,) = _tangent_reference(h, shift, offset, rstd, scale, dh, dscale, dbias,
                             centered=centered, per_row=per_row, example_rows=example_rows)
  return dy.astype(dx.dtype), dh


def _add_backward_reference(x: jax.Array, g: jax.Array, g_h: jax.Array, shift: jax.Array,
                            offset: jax.Array, rstd: jax.Array, scale: jax.Array, *,
                            centered: bool, per_row: bool,
                            example_rows: int = 0) -> tuple[jax.Array, ...]:
  """The transpose of `_add_tangent_reference`: the backward's `dx` plus `h`'s cotangent."""
  dx, dscale, dbias = _backward_reference(x, g, shift, offset, rstd, scale, centered=centered,
                                          per_row=per_row, example_rows=example_rows)
  return dx + g_h, dscale, dbias


def _add_backward_mixed_reference(h: jax.Array, g: jax.Array, g_h: jax.Array,
                                  shift: jax.Array, offset: jax.Array, rstd: jax.Array,
                                  scale: jax.Array, *, centered: bool, per_row: bool,
                                  example_rows: int = 0) -> tuple[jax.Array, ...]:
  """The transpose of `_add_tangent_reference` for a float32 `h` and a bfloat16 `dx`: `g`
  widened, then `_add_backward_reference`'s `dh`, and `dx` its rounding to `g`'s dtype."""
  dh, dscale, dbias = _add_backward_reference(h, g.astype(h.dtype), g_h, shift, offset, rstd,
                                              scale, centered=centered, per_row=per_row,
                                              example_rows=example_rows)
  return dh.astype(g.dtype), dh, dscale, dbias


def _backward_mixed_reference(h: jax.Array, g: jax.Array, shift: jax.Array, offset: jax.Array,
                              rstd: jax.Array, scale: jax.Array, *, centered: bool,
                              per_row: bool, example_rows: int = 0) -> tuple[jax.Array, ...]:
  """`_add_backward_mixed_reference` without `h`'s cotangent: `g` widened, the backward's
  `dh` at `h`, and `dx` its rounding to `g`'s dtype."""
  dh, dscale, dbias = _backward_reference(h, g.astype(h.dtype), shift, offset, rstd, scale,
                                          centered=centered, per_row=per_row,
                                          example_rows=example_rows)
  return dh.astype(g.dtype), dh, dscale, dbias


# ----------------------------------------------------------------- the primitives

def _shaped(shape: Shape, dtype: jnp.dtype) -> ShapedArray:
  return jax.core.ShapedArray(shape, dtype)


def _forward_abstract(x: ShapedArray, scale: ShapedArray, bias: ShapedArray, *, eps: float,
                      centered: bool, per_row: bool, example_rows: int = 0) -> list[ShapedArray]:
  del scale, bias, eps, centered, per_row, example_rows
  row = _shaped(x.shape[:1], F32)
  return [_shaped(x.shape, x.dtype), row, row, row]


def _add_forward_abstract(x: ShapedArray, residual: ShapedArray, scale: ShapedArray,
                          bias: ShapedArray, *, eps: float, centered: bool,
                          per_row: bool, example_rows: int = 0) -> list[ShapedArray]:
  del example_rows
  y, *stats = _forward_abstract(x, scale, bias, eps=eps, centered=centered, per_row=per_row)
  return [y, _shaped(x.shape, residual.dtype)] + stats


def _tangent_abstract(x: ShapedArray, *args: ShapedArray, centered: bool,
                      per_row: bool, example_rows: int = 0) -> list[ShapedArray]:
  del args, centered, per_row, example_rows
  return [_shaped(x.shape, x.dtype)]


def _add_tangent_abstract(h: ShapedArray, shift: ShapedArray, offset: ShapedArray,
                          rstd: ShapedArray, scale: ShapedArray, dx: ShapedArray,
                          *args: ShapedArray, centered: bool, per_row: bool,
                          example_rows: int = 0) -> list[ShapedArray]:
  del shift, offset, rstd, scale, args, centered, per_row, example_rows
  return [_shaped(h.shape, dx.dtype), _shaped(h.shape, h.dtype)]


def _add_backward_abstract(x: ShapedArray, g: ShapedArray, g_h: ShapedArray,
                           *args: ShapedArray, centered: bool, per_row: bool,
                           example_rows: int = 0) -> list[ShapedArray]:
  return _backward_abstract(x, g, *args, centered=centered, per_row=per_row,
                            example_rows=example_rows)


def _backward_mixed_abstract(h: ShapedArray, g: ShapedArray, *args: ShapedArray,
                             centered: bool, per_row: bool,
                             example_rows: int = 0) -> list[ShapedArray]:
  dh, dscale, dbias = _backward_abstract(h, g, *args, centered=centered, per_row=per_row,
                                         example_rows=example_rows)
  return [_shaped(h.shape, g.dtype), dh, dscale, dbias]


def _add_backward_mixed_abstract(h: ShapedArray, g: ShapedArray, g_h: ShapedArray,
                                 *args: ShapedArray, centered: bool, per_row: bool,
                                 example_rows: int = 0) -> list[ShapedArray]:
  return _backward_mixed_abstract(h, g, *args, centered=centered, per_row=per_row,
                                  example_rows=example_rows)


def _backward_abstract(x: ShapedArray, g: ShapedArray, shift: ShapedArray, offset: ShapedArray,
                       rstd: ShapedArray, scale: ShapedArray, *, centered: bool,
                       per_row: bool, example_rows: int = 0) -> list[ShapedArray]:
  del g, shift, offset, rstd, centered, per_row, example_rows
  return [_shaped(x.shape, x.dtype), _shaped(scale.shape, F32), _shaped(scale.shape, F32)]


# A bind may leave out `example_rows` (per-feature or per-row parameters).
_DEFAULTS: dict[str, primitives.Param] = {"example_rows": 0}
rows_forward_p = primitives.define_primitive(
    "normjax_rows_forward", _forward_reference, _forward_abstract, target="NormjaxRowsForward",
    kernel=pallas.forward, defaults=_DEFAULTS)
rows_add_forward_p = primitives.define_primitive(
    "normjax_rows_add_forward", _add_forward_reference, _add_forward_abstract,
    target="NormjaxRowsAddForward", kernel=pallas.add_forward, defaults=_DEFAULTS)
# bfloat16 `x`, float32 `residual` (a float32 residual stream): `h` float32, `y` bfloat16.
rows_add_forward_mixed_p = primitives.define_primitive(
    "normjax_rows_add_forward_mixed", _add_forward_reference, _add_forward_abstract,
    target="NormjaxRowsAddForwardMixed", defaults=_DEFAULTS)
rows_tangent_p = primitives.define_primitive(
    "normjax_rows_tangent", _tangent_reference, _tangent_abstract)
rows_backward_p = primitives.define_primitive(
    "normjax_rows_backward", _backward_reference, _backward_abstract,
    target="NormjaxRowsBackward", kernel=pallas.backward, defaults=_DEFAULTS)
# The residual-add norm's derivative at h: the tangent of (y, h), whose transpose takes both
# cotangents and adds h's to dx inside the backward kernel (native only).
rows_add_tangent_p = primitives.define_primitive(
    "normjax_rows_add_tangent", _add_tangent_reference, _add_tangent_abstract)
rows_add_backward_p = primitives.define_primitive(
    "normjax_rows_add_backward", _add_backward_reference, _add_backward_abstract,
    target="NormjaxRowsAddBackward", defaults=_DEFAULTS)
# float32 `h` and `g_h`, bfloat16 `g`: `dx` in bfloat16 and `dh` in float32 (native only).
rows_add_backward_mixed_p = primitives.define_primitive(
    "normjax_rows_add_backward_mixed", _add_backward_mixed_reference,
    _add_backward_mixed_abstract, target="NormjaxRowsAddBackwardMixed", defaults=_DEFAULTS)
rows_backward_mixed_p = primitives.define_primitive(
    "normjax_rows_backward_mixed", _backward_mixed_reference, _backward_mixed_abstract,
    target="NormjaxRowsBackwardMixed", defaults=_DEFAULTS)


def _tangent_transpose(cts: Sequence[jax.Array | ad.Zero], x: jax.Array, shift: jax.Array,
                       offset: jax.Array, rstd: jax.Array, scale: jax.Array, dx: Linear,
                       dscale: Linear, dbias: Linear, *, centered: bool, per_row: bool,
                       example_rows: int = 0,
                       implementation: str = "native") -> list[jax.Array | None]:
  (ct,) = cts
  linear = (dx, dscale, dbias)
  if type(ct) is ad.Zero:
    return [None] * 8
  grads = rows_backward_p.bind(x, ad.instantiate_zeros(ct), shift, offset, rstd, scale,
                               centered=centered, per_row=per_row, example_rows=example_rows,
                               implementation=implementation)
  return [None] * 5 + primitives.linear_cotangents(grads, linear)


ad.primitive_transposes[rows_tangent_p] = _tangent_transpose


def _add_tangent_transpose(cts: Sequence[jax.Array | ad.Zero], h: jax.Array, shift: jax.Array,
                           offset: jax.Array, rstd: jax.Array, scale: jax.Array, dx: Linear,
                           dresidual: Linear, dscale: Linear, dbias: Linear, *,
                           centered: bool, per_row: bool,
                           example_rows: int = 0) -> list[jax.Array | None]:
  """Both cotangents into one backward kernel: `dh`'s cotangent goes to `dx` and `dresidual`
  alike (in a mixed call, `dx`'s rounded to its bfloat16 by the kernel)."""
  ct, ct_h = cts
  linear = (dx, dresidual, dscale, dbias)
  if type(ct) is ad.Zero and type(ct_h) is ad.Zero:
    return [None] * 9
  kw = dict(centered=centered, per_row=per_row, example_rows=example_rows)
  ct = ad.instantiate_zeros(ct)
  if ct.dtype != h.dtype:
    if type(ct_h) is ad.Zero:
      grads = rows_backward_mixed_p.bind(h, ct, shift, offset, rstd, scale, **kw)
    else:
      grads = rows_add_backward_mixed_p.bind(h, ct, ct_h, shift, offset, rstd, scale, **kw)
  else:
    if type(ct_h) is ad.Zero:
      g, dsc, dbi = rows_backward_p.bind(h, ct, shift, offset, rstd, scale, **kw)
    else:
      g, dsc, dbi = rows_add_backward_p.bind(h, ct, ct_h, shift, offset, rstd, scale, **kw)
    grads = [g, g, dsc, dbi]
  return [None] * 5 + primitives.linear_cotangents(grads, linear)


ad.primitive_transposes[rows_add_tangent_p] = _add_tangent_transpose


# ----------------------------------------------------------------- batching

def _batch_rows(p: jex_core.Primitive, reference: primitives.Reference,
                feature_operands: tuple[int, ...],
                sums_over_rows: bool = False) -> primitives.BatchRule:
  """Folds the batch into the rows when only per-row operands are batched: every output of a
  per-row computation is per row, so `[B, rows, ...]` is `[B * rows, ...]`. The operands at
  `feature_operands` are per feature (unless `per_row`), and a batch along them (a batched
  scale, say) is handled by `jax.vmap` of the definition instead; so is every batch of a
  primitive that `sums_over_rows` into per-feature outputs (unless `per_row`), every batch of
  per-example parameters (`example_rows`), and an empty batch."""
  fallback = primitives.batch_by_reference(reference)

  def rule(args: Sequence[jax.Array], dims: Sequence[int | None],
           **params: primitives.Param) -> tuple[Sequence[jax.Array], Sequence[int]]:
    per_feature = () if params["per_row"] else feature_operands
    size = primitives.batch_size(args, dims)
    if (size == 0 or (sums_over_rows and not params["per_row"]) or params.get("example_rows")
        or any(dims[i] is not None for i in per_feature)):
      return fallback(args, dims, **params)
    args = list(args)
    for i in range(len(args)):
      if i not in per_feature:
        a = batching.bdim_at_front(args[i], dims[i], size)
        args[i] = a.reshape((size * a.shape[1],) + a.shape[2:])
    outs = p.bind(*args, **params)
    return [o.reshape((size, o.shape[0] // size) + o.shape[1:]) for o in outs], [0] * len(outs)
  return rule


batching.primitive_batchers[rows_forward_p] = _batch_rows(
    rows_forward_p, _forward_reference, (1, 2))
batching.primitive_batchers[rows_add_forward_p] = _batch_rows(
    rows_add_forward_p, _add_forward_reference, (2, 3))
batching.primitive_batchers[rows_add_forward_mixed_p] = _batch_rows(
    rows_add_forward_mixed_p, _add_forward_reference, (2, 3))
batching.primitive_batchers[rows_tangent_p] = _batch_rows(
    rows_tangent_p, _tangent_reference, (4, 6, 7))
batching.primitive_batchers[rows_backward_p] = _batch_rows(
    rows_backward_p, _backward_reference, (5,), sums_over_rows=True)
batching.primitive_batchers[rows_add_tangent_p] = _batch_rows(
    rows_add_tangent_p, _add_tangent_reference, (4, 7, 8))
batching.primitive_batchers[rows_add_backward_p] = _batch_rows(
    rows_add_backward_p, _add_backward_reference, (6,), sums_over_rows=True)
batching.primitive_batchers[rows_add_backward_mixed_p] = _batch_rows(
    rows_add_backward_mixed_p, _add_backward_mixed_reference, (6,), sums_over_rows=True)
batching.primitive_batchers[rows_backward_mixed_p] = _batch_rows(
    rows_backward_mixed_p, _backward_mixed_reference, (5,), sums_over_rows=True)


# ----------------------------------------------------------------- one call's forward/tangent

class _View:
  """An input of `x_shape` normalized over its last `n_axes` axes, as `[rows, n]`."""

  def __init__(self, x_shape: Shape, n_axes: int, centered: bool, per_row: bool,
               examples: int = 0):
    self.x_shape = tuple(x_shape)
    lead = self.x_shape[:len(x_shape) - n_axes]
    features = self.x_shape[len(x_shape) - n_axes:]
    self.rows, self.n = math.prod(lead), math.prod(features)
    self.stats_shape = lead + (1,) * n_axes
    self.centered, self.per_row = centered, per_row
    # Per-example parameters vary along the first `examples` axes and the features:
    # `[examples * n]` vectors, each for `example_rows` consecutive rows.
    self.example_rows = math.prod(lead[examples:]) if examples else 0
    self.param_shape = (lead[:examples] + (1,) * (len(lead) - examples) + features
                        if examples else None)

  def vector(self, p: Vector, default: float) -> jax.Array:
    """Scale or bias (None: `default`) as the kernels' float32 vector."""
    if self.per_row:
      size = self.rows
    elif self.param_shape is not None:
      size = math.prod(self.param_shape)
    else:
      size = self.n
    if p is None:
      return jnp.full((size,), default, F32)
    if self.per_row:
      p = jnp.broadcast_to(p, self.stats_shape)
    elif self.param_shape is not None:
      p = jnp.broadcast_to(p, self.param_shape)
    return p.reshape(size).astype(F32)

  def tangent_operands(self, x: jax.Array, stats: Moments, rstd: jax.Array, scale: Vector,
                       dxs: Sequence[jax.Array], dscale: Vector,
                       dbias: Vector) -> tuple[jax.Array, ...]:
    """The operands of `rows_tangent_p` (`dxs = (dx,)`) or `rows_add_tangent_p`
    (`dxs = (dx, dresidual)`) for one call's tangent."""
    zero = jnp.zeros((self.rows,), F32)
    per_row_stat = lambda s: zero if s is None else s.reshape(self.rows)
    return (x.reshape(self.rows, self.n), per_row_stat(stats.shift),
            per_row_stat(stats.offset), rstd.reshape(self.rows), self.vector(scale, 1.0),
            *(d.reshape(self.rows, self.n) for d in dxs), self.vector(dscale, 0.0),
            self.vector(dbias, 0.0))

  def moments(self, x2: jax.Array, shift: jax.Array, offset: jax.Array,
              var: jax.Array) -> Moments:
    """The kernel's per-row statistics as `Moments` of the input's rank."""
    stats = _row_stats(x2, shift, offset, var, self.centered)
    return jax.tree.map(lambda v: v.reshape(self.stats_shape) if v.ndim else v, stats)


def ops(x_shape: Shape, n_axes: int, eps: float, *, centered: bool, per_row: bool,
        examples: int = 0, implementation: str = "native") -> tuple[Forward, Tangent]:
  """`(forward, tangent)` for `standardize` over the last `n_axes` axes of an input of
  `x_shape`, through the primitives; `per_row`: scale and bias vary along the other axes only
  (one value per row), else along the normalized axes only (one per feature), or with
  `examples = k > 0` along those and the first `k` axes (per example and feature);
  `implementation`: the lowering the primitives ask for (`"native"` or `"pallas"`)."""
  v = _View(x_shape, n_axes, centered, per_row, examples)
  rows, n = v.rows, v.n
  kw = dict(centered=centered, per_row=per_row, example_rows=v.example_rows,
            implementation=implementation)

  def forward(x: jax.Array, scale: Vector, bias: Vector,
              mask: Vector) -> tuple[jax.Array, Moments]:
    del mask
    x2 = x.reshape(rows, n)
    y2, shift, offset, var = rows_forward_p.bind(x2, v.vector(scale, 1.0), v.vector(bias, 0.0),
                                                 eps=eps, **kw)
    return y2.reshape(x_shape), v.moments(x2, shift, offset, var)

  def tangent(x: jax.Array, stats: Moments, rstd: jax.Array, scale: Vector, dx: jax.Array,
              dscale: Vector, dbias: Vector, mask: Vector) -> jax.Array:
    del mask
    (dy,) = rows_tangent_p.bind(*v.tangent_operands(x, stats, rstd, scale, (dx,), dscale,
                                                    dbias), **kw)
    return dy.reshape(x_shape)

  return forward, tangent


def add_ops(x_shape: Shape, n_axes: int, eps: float, *, centered: bool, per_row: bool,
            examples: int = 0,
            implementation: str = "native") -> tuple[AddForward, AddTangent]:
  """`(add_forward, add_tangent)` for `add_standardize`: `add_forward(x, residual, scale,
  bias) -> (y, h, Moments of h)` through `rows_add_forward_p` (`rows_add_forward_mixed_p`
  for a bfloat16 `x` and a float32 `residual`, native only), and `add_tangent(h, stats, rstd,
  scale, dx, dresidual, dscale, dbias, mask) -> (dy, dh)`, the tangents of `y` and `h`.
  Natively that is `rows_add_tangent_p`'s, so that the backward kernel takes both
  cotangents, adds `h`'s to `dx` in its one pass and (mixed) reads `y`'s in bfloat16;
  otherwise it is `ops`' tangent at `dh = dx + dresidual`."""
  v = _View(x_shape, n_axes, centered, per_row, examples)
  rows, n = v.rows, v.n
  kw = dict(centered=centered, per_row=per_row, example_rows=v.example_rows,
            implementation=implementation)

  def add_forward(x: jax.Array, residual: jax.Array, scale: Vector,
                  bias: Vector) -> tuple[jax.Array, jax.Array, Moments]:
    p = rows_add_forward_p if x.dtype == residual.dtype else rows_add_forward_mixed_p
    y2, h2, shift, offset, var = p.bind(
        x.reshape(rows, n), residual.reshape(rows, n), v.vector(scale, 1.0),
        v.vector(bias, 0.0), eps=eps, **kw)
    return y2.reshape(x_shape), h2.reshape(x_shape), v.moments(h2, shift, offset, var)

  if implementation != "native":
    _, tangent = ops(x_shape, n_axes, eps, centered=centered, per_row=per_row,
                     examples=examples, implementation=implementation)
    return add_forward, sum_tangent(tangent)

  def add_tangent(h: jax.Array, stats: Moments, rstd: jax.Array, scale: Vector, dx: jax.Array,
                  dresidual: jax.Array, dscale: Vector, dbias: Vector,
                  mask: Vector) -> tuple[jax.Array, jax.Array]:
    del mask
    dy, dh = rows_add_tangent_p.bind(
        *v.tangent_operands(h, stats, rstd, scale, (dx, dresidual), dscale, dbias),
        centered=centered, per_row=per_row, example_rows=v.example_rows)
    return dy.reshape(x_shape), dh.reshape(x_shape)

  return add_forward, add_tangent
