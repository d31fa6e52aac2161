"""Dynamic tanh's derivative over contiguous rows, with its backward in one native pass.

`y = tanh(alpha * x) * scale + bias` over the `[rows, n]` view with per-feature `scale` and
`bias` and a scalar `alpha`. The forward stays XLA's (one fused elementwise pass: nothing to
gain); its derivative is

  * `tanh_tangent_p`: `x, alpha, scale, dx, dalpha, dscale, dbias -> dy`, linear in the
    tangents, the JVP of the numerics' `dynamic_tanh`; its transpose is
  * `tanh_backward_p`: `x, alpha, scale, g -> dx, dalpha, dscale, dbias`.

On CPU the backward lowers to the native kernel (`level_tanh.h`): one read of `x` and `g`,
`tanh` recomputed (within 3 ulp of float64's), `dx` written and every sum (over the row for
`dalpha`, over the rows for `dscale` and `dbias`) taken in the same pass. XLA:CPU splits the
same backward into several fusions that read `x` and `g` again (a training step took about
2.3-2.6x a pass over `x, g -> y, dx`). Every other platform, and every higher derivative, runs
the definitions.
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


def _tangent_reference(x: jax.Array, alpha: jax.Array, scale: jax.Array, dx: jax.Array,
                       dalpha: jax.Array, dscale: jax.Array,
                       dbias: jax.Array) -> tuple[jax.Array]:
  def forward(x: jax.Array, alpha: jax.Array, scale: jax.Array, bias: jax.Array) -> jax.Array:
    return pointwise.dynamic_tanh(x, alpha[0], scale[None], bias[None])
  _, dy = jax.jvp(forward, (x, alpha, scale, jnp.zeros_like(dbias)), (dx, dalpha, dscale, dbias))
  return (dy,)


def _backward_reference(x: jax.Array, alpha: jax.Array, scale: jax.Array,
                        g: jax.Array) -> tuple[jax.Array, ...]:
  def linear(dx: jax.Array, dalpha: jax.Array, dscale: jax.Array, dbias: jax.Array) -> jax.Array:
    return _tangent_reference(x, alpha, scale, dx, dalpha, dscale, dbias)[0]
  like = (jax.ShapeDtypeStruct(x.shape, x.dtype), jax.ShapeDtypeStruct((1,), F32),
          jax.ShapeDtypeStruct(scale.shape, F32), jax.ShapeDtypeStruct(scale.shape, F32))
  return tuple(jax.linear_transpose(linear, *like)(g))


def _tangent_abstract(x: ShapedArray, *args: ShapedArray) -> list[ShapedArray]:
  del args
  return [ShapedArray(x.shape, x.dtype)]


def _backward_abstract(x: ShapedArray, alpha: ShapedArray, scale: ShapedArray,
                       g: ShapedArray) -> list[ShapedArray]:
  del g
  return [ShapedArray(x.shape, x.dtype), ShapedArray(alpha.shape, F32),
          ShapedArray(scale.shape, F32), ShapedArray(scale.shape, F32)]


tanh_tangent_p = primitives.define_primitive(
    "normjax_tanh_tangent", _tangent_reference, _tangent_abstract)
tanh_backward_p = primitives.define_primitive(
    "normjax_tanh_backward", _backward_reference, _backward_abstract,
    target="NormjaxTanhBackward")


def _tangent_transpose(cts: Sequence[jax.Array | ad.Zero], x: jax.Array, alpha: jax.Array,
                       scale: jax.Array, dx: Linear, dalpha: Linear, dscale: Linear,
                       dbias: Linear) -> list[jax.Array | None]:
  (ct,) = cts
  linear = (dx, dalpha, dscale, dbias)
  none: list[jax.Array | None] = [None] * 3
  if type(ct) is ad.Zero:
    return none + [None] * 4
  grads = tanh_backward_p.bind(x, alpha, scale, ad.instantiate_zeros(ct))
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
  y = _rows(*primals, scaled, biased)
  x, alpha, scale, _ = primals
  (dy,) = tanh_tangent_p.bind(x, alpha, scale, *tangents)
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
