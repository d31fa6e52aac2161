"""Dynamic tanh's derivative over contiguous rows, with its backward in one native pass.

`y = tanh(alpha * x) * scale + bias` over the `[rows, n]` view with per-feature `scale` and
`bias` and a scalar `alpha`. The forward stays XLA's (one fused elementwise pass: nothing to
gain; a native forward with the kernels' own float32 tanh, within 3 ulp and without FMA so
that every CPU level gives the same bits, took 2.2-2.7x as long as XLA's loop, which runs on
every core too); its derivative is

  * `tanh_tangent_p`: `x, t, alpha, scale, dx, dalpha, dscale, dbias -> dy`, linear in the
    tangents, the JVP of the numerics' `dynamic_tanh`, where `t` is the forward's
    `tanh(alpha * x)` in float32 (`pointwise.tanh_of`) if the static `saved` says so, else
    recomputed from `x` (and `t` not read: any array of its shape); its transpose is
  * `tanh_backward_p`: `x, t, alpha, scale, g -> dx, dalpha, dscale, dbias`.

On CPU the backward lowers to the native kernel (`level_tanh.h`): one read of `x`, `g` (and
`t` where saved), `dx` written and every sum (over the row for `dalpha`, over the rows for
`dscale` and `dbias`) taken in the same pass. XLA:CPU splits the same backward into several
fusions that read `x` and `g` again (a training step took about 2.3-2.6x a pass over
`x, g -> y, dx`). Every other platform, and every higher derivative, runs the definitions.

Which inputs save `t` (`_SAVES_TANH`): the kernels' tanh costs about 2.5x XLA's per element,
so a backward that recomputes it is compute-bound (about 3.2x a pass over `x, g -> dx`); a
saved `t` costs the forward a second loop (XLA:CPU does not fuse `t` and `y` into one) and the
backward a float32 read. For bfloat16 `x` (2 bytes an element) saving wins at every size
measured (a training step's forward+backward 0.51-0.67 of the recomputing one); for float32
`x` it lost (1.05-1.19x; docs/performance-history.md, session 21), so float32 recomputes.
A saved `t` is held from the forward to the backward: 4 bytes an element besides bfloat16
`x`'s 2, as in the unfused composition.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.interpreters import ad
from jax.interpreters import batching

from normjax._src.kernels import primitives
from normjax._src.numerics import pointwise

F32 = primitives.F32
ShapedArray = jax.core.ShapedArray
Linear = primitives.Linear


# The input dtypes whose training step saves the forward's tanh for the backward kernel.
_SAVES_TANH = frozenset({jnp.dtype(jnp.bfloat16)})


def _tangent_reference(x: jax.Array, t: jax.Array, alpha: jax.Array, scale: jax.Array,
                       dx: jax.Array, dalpha: jax.Array, dscale: jax.Array,
                       dbias: jax.Array, *, saved: bool) -> tuple[jax.Array]:
  """dy = (alpha dx + dalpha x) (1 - t^2) scale + t dscale + dbias, in `t`'s dtype, returned
  in `x.dtype` (the JVP of the forward, with `t = tanh(alpha * x)`: the operand where
  `saved`, else recomputed)."""
  if not saved:
    t = pointwise.tanh_of(x, alpha[0])
  f = lambda a: a.astype(t.dtype)
  s = 1 - t * t
  dy = ((f(alpha[0]) * f(dx) + f(dalpha[0]) * f(x)) * s) * f(scale[None]) + (
      t * f(dscale[None]) + f(dbias[None]))
  return (dy.astype(x.dtype),)


def _backward_reference(x: jax.Array, t: jax.Array, alpha: jax.Array, scale: jax.Array,
                        g: jax.Array, *, saved: bool) -> tuple[jax.Array, ...]:
  def linear(dx: jax.Array, dalpha: jax.Array, dscale: jax.Array, dbias: jax.Array) -> jax.Array:
    return _tangent_reference(x, t, alpha, scale, dx, dalpha, dscale, dbias, saved=saved)[0]
  like = (jax.ShapeDtypeStruct(x.shape, x.dtype), jax.ShapeDtypeStruct((1,), F32),
          jax.ShapeDtypeStruct(scale.shape, F32), jax.ShapeDtypeStruct(scale.shape, F32))
  return tuple(jax.linear_transpose(linear, *like)(g))


def _tangent_abstract(x: ShapedArray, *args: ShapedArray, saved: bool) -> list[ShapedArray]:
  del args, saved
  return [ShapedArray(x.shape, x.dtype)]


def _backward_abstract(x: ShapedArray, t: ShapedArray, alpha: ShapedArray, scale: ShapedArray,
                       g: ShapedArray, *, saved: bool) -> list[ShapedArray]:
  del t, g, saved
  return [ShapedArray(x.shape, x.dtype), ShapedArray(alpha.shape, F32),
          ShapedArray(scale.shape, F32), ShapedArray(scale.shape, F32)]


tanh_tangent_p = primitives.define_primitive(
    "normjax_tanh_tangent", _tangent_reference, _tangent_abstract)
tanh_backward_p = primitives.define_primitive(
    "normjax_tanh_backward", _backward_reference, _backward_abstract,
    target="NormjaxTanhBackward")


def _tangent_transpose(cts: Sequence[jax.Array | ad.Zero], x: jax.Array, t: jax.Array,
                       alpha: jax.Array, scale: jax.Array, dx: Linear, dalpha: Linear,
                       dscale: Linear, dbias: Linear, *, saved: bool
                       ) -> list[jax.Array | None]:
  (ct,) = cts
  linear = (dx, dalpha, dscale, dbias)
  none: list[jax.Array | None] = [None] * 4
  if type(ct) is ad.Zero:
    return none + [None] * 4
  grads = tanh_backward_p.bind(x, t, alpha, scale, ad.instantiate_zeros(ct), saved=saved)
  return none + primitives.linear_cotangents(grads, linear)


ad.primitive_transposes[tanh_tangent_p] = _tangent_transpose
batching.primitive_batchers[tanh_tangent_p] = primitives.batch_by_reference(_tangent_reference)
batching.primitive_batchers[tanh_backward_p] = primitives.batch_by_reference(
    _backward_reference)


@functools.partial(jax.custom_jvp, nondiff_argnums=(4, 5))
def _rows(x: jax.Array, alpha: jax.Array, scale: jax.Array, bias: jax.Array, scaled: bool,
          biased: bool) -> jax.Array:
  """Dynamic tanh of `x` [rows, n]; `alpha` [1], `scale` and `bias` [n] float32 (ones and
  zeros standing for absent ones, which the value leaves out: `scaled`, `biased`)."""
  return pointwise.dynamic_tanh(x, alpha[0], scale[None] if scaled else None,
                                bias[None] if biased else None)


@_rows.defjvp
def _rows_jvp(scaled: bool, biased: bool, primals: Sequence[jax.Array],
              tangents: Sequence[jax.Array]) -> tuple[jax.Array, jax.Array]:
  x, alpha, scale, bias = primals
  saved = jnp.dtype(x.dtype) in _SAVES_TANH
  if saved:
    t = pointwise.tanh_of(x, alpha[0])
    y = pointwise.tanh_affine(t, scale[None] if scaled else None,
                              bias[None] if biased else None, x.dtype)
  else:   # x, as float32, stands in for t: not read (the kernel and definition recompute t)
    y = _rows(*primals, scaled, biased)
    t = x.astype(F32)
  (dy,) = tanh_tangent_p.bind(x, t, alpha, scale, *tangents, saved=saved)
  return y, dy.astype(y.dtype)


def dynamic_tanh(x: jax.Array, alpha: jax.Array, scale: jax.Array | None,
                 bias: jax.Array | None, n_axes: int) -> jax.Array:
  """The numerics' `dynamic_tanh` over the last `n_axes` axes (`scale` and `bias` with one
  value per feature, any shape of that size, or None), differentiated through the
  primitives."""
  n = math.prod(x.shape[x.ndim - n_axes:])
  rows = math.prod(x.shape[:x.ndim - n_axes])
  vector = lambda p, fill: jnp.full((n,), fill, F32) if p is None else p.reshape(n).astype(F32)
  y = _rows(x.reshape(rows, n), alpha.reshape(1).astype(F32), vector(scale, 1.0),
            vector(bias, 0.0), scale is not None, bias is not None)
  return y.reshape(x.shape)
