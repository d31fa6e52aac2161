"""The gated RMS norm over contiguous rows (Mamba-2's `RMSNormGated`), with its gate inside.

`y = rms_norm(x * silu(z)) * scale` (`before=False`, the gate first) or
`y = rms_norm(x) * scale * silu(z)` (`before=True`), over the last axis of the `[rows, n]`
view, with a per-feature `scale`, or with `groups=G` a `[G, n]` scale whose row `r % G` scales
row `r` (Mamba-2's `ngroups`: a feature axis of `G * n` cut into groups of `n`, each group a
row); the gate, the products and the statistics in float32, `y` rounded to `x.dtype` once.
Three primitives, as the rows norm's (`normjax._src.kernels.rows`):

  * `rows_gated_forward_p`: `x, z, scale -> y` (static `eps`, `before`, `groups`).
  * `rows_gated_tangent_p`: the tangent of `y`, linear in `(dx, dz, dscale)`; its transpose is
  * `rows_gated_backward_p`: `x, z, scale, g -> dx, dz, dscale`.

Their definitions are the numerics' (`moments`, `normalize`, `silu`; the tangent is the JVP of
the forward's definition and the backward its transpose), which every platform but a CPU with
the native library runs, and which gives every higher derivative. On CPU the forward and the
backward lower to the native kernels (`level_gated.h`): the gate is computed in the kernel
(as XLA's, within 3 ulp of float64), so `x` and `z` are read once per pass and no gated copy of
either is written: a user's `rms_norm(x * silu(z), w)` writes `x * silu(z)` before the norm
kernel reads it, and its backward writes and reads the norm's `dx` again. The backward
recomputes each row's mean square from the same sums as the forward (the same bits), so it
takes no statistics from the forward.
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
from normjax._src.numerics.moments import moments
from normjax._src.numerics.pointwise import silu
from normjax._src.numerics.standardize import normalize

F32 = primitives.F32
ShapedArray = jax.core.ShapedArray
Linear = primitives.Linear


def _scale_rows(scale: jax.Array, rows: int, groups: int) -> jax.Array:
  """The `[groups * n]` scale as an operand of `[rows, n]`: row `r` takes `r % groups`."""
  if groups == 1:
    return scale[None]
  per_group = scale.reshape(groups, -1)
  return jnp.broadcast_to(per_group, (rows // groups,) + per_group.shape).reshape(rows, -1)


def _forward_reference(x: jax.Array, z: jax.Array, scale: jax.Array, *, eps: float,
                       before: bool, groups: int = 1) -> tuple[jax.Array]:
  gate = silu(z)
  inner = x.astype(gate.dtype)
  if not before:
    inner = inner * gate
  stats = moments(inner, (1,), centered=False)
  factor = _scale_rows(scale, x.shape[0], groups)
  factor = factor * gate if before else factor
  return (normalize(inner, stats, factor, None, eps).astype(x.dtype),)


def _tangent_reference(x: jax.Array, z: jax.Array, scale: jax.Array, dx: jax.Array,
                       dz: jax.Array, dscale: jax.Array, *, eps: float, before: bool,
                       groups: int = 1) -> tuple[jax.Array]:
  forward = functools.partial(_forward_reference, eps=eps, before=before, groups=groups)
  _, (dy,) = jax.jvp(forward, (x, z, scale), (dx, dz, dscale))
  return (dy,)


def _backward_reference(x: jax.Array, z: jax.Array, scale: jax.Array, g: jax.Array, *,
                        eps: float, before: bool, groups: int = 1) -> tuple[jax.Array, ...]:
  def linear(dx: jax.Array, dz: jax.Array, dscale: jax.Array) -> jax.Array:
    return _tangent_reference(x, z, scale, dx, dz, dscale, eps=eps, before=before,
                              groups=groups)[0]
  like = (jax.ShapeDtypeStruct(x.shape, x.dtype), jax.ShapeDtypeStruct(z.shape, z.dtype),
          jax.ShapeDtypeStruct(scale.shape, F32))
  return tuple(jax.linear_transpose(linear, *like)(g))


def _forward_abstract(x: ShapedArray, z: ShapedArray, scale: ShapedArray, *, eps: float,
                      before: bool, groups: int = 1) -> list[ShapedArray]:
  del z, scale, eps, before, groups
  return [ShapedArray(x.shape, x.dtype)]


def _tangent_abstract(x: ShapedArray, *args: ShapedArray, eps: float, before: bool,
                      groups: int = 1) -> list[ShapedArray]:
  del args, eps, before, groups
  return [ShapedArray(x.shape, x.dtype)]


def _backward_abstract(x: ShapedArray, z: ShapedArray, scale: ShapedArray, g: ShapedArray, *,
                       eps: float, before: bool, groups: int = 1) -> list[ShapedArray]:
  del g, eps, before, groups
  return [ShapedArray(x.shape, x.dtype), ShapedArray(z.shape, z.dtype),
          ShapedArray(scale.shape, F32)]


# A bind may leave out `groups` (one scale vector).
_DEFAULTS: dict[str, primitives.Param] = {"groups": 1}
rows_gated_forward_p = primitives.define_primitive(
    "normjax_rows_gated_forward", _forward_reference, _forward_abstract,
    target="NormjaxRowsGatedForward", defaults=_DEFAULTS)
rows_gated_tangent_p = primitives.define_primitive(
    "normjax_rows_gated_tangent", _tangent_reference, _tangent_abstract)
rows_gated_backward_p = primitives.define_primitive(
    "normjax_rows_gated_backward", _backward_reference, _backward_abstract,
    target="NormjaxRowsGatedBackward", defaults=_DEFAULTS)


def _forward_jvp(primals: Sequence[jax.Array], tangents: Sequence[jax.Array | ad.Zero], *,
                 eps: float, before: bool,
                 groups: int = 1) -> tuple[list[jax.Array], list[jax.Array]]:
  """The forward's JVP through the tangent primitive (whose transpose is the backward
  kernel), rather than the JVP of the definition."""
  y = rows_gated_forward_p.bind(*primals, eps=eps, before=before, groups=groups)
  dense = [ad.instantiate_zeros(t) for t in tangents]
  dy = rows_gated_tangent_p.bind(*primals, *dense, eps=eps, before=before, groups=groups)
  return y, dy


ad.primitive_jvps[rows_gated_forward_p] = _forward_jvp


def _tangent_transpose(cts: Sequence[jax.Array | ad.Zero], x: jax.Array, z: jax.Array,
                       scale: jax.Array, dx: Linear, dz: Linear, dscale: Linear, *, eps: float,
                       before: bool, groups: int = 1) -> list[jax.Array | None]:
  (ct,) = cts
  linear = (dx, dz, dscale)
  none: list[jax.Array | None] = [None] * 3
  if type(ct) is ad.Zero:
    return none * 2
  grads = rows_gated_backward_p.bind(x, z, scale, ad.instantiate_zeros(ct), eps=eps,
                                     before=before, groups=groups)
  return none + primitives.linear_cotangents(grads, linear)


ad.primitive_transposes[rows_gated_tangent_p] = _tangent_transpose
for _p, _reference in ((rows_gated_forward_p, _forward_reference),
                       (rows_gated_tangent_p, _tangent_reference),
                       (rows_gated_backward_p, _backward_reference)):
  batching.primitive_batchers[_p] = primitives.batch_by_reference(_reference)


def gated_rms_norm(x: jax.Array, z: jax.Array, scale: jax.Array | None, n_axes: int,
                   eps: float, *, before: bool, group_size: int | None = None) -> jax.Array:
  """The gated RMS norm of `x` over its last `n_axes` axes through the primitives; `scale`
  holds one value per normalized element (any shape of that size, or None), `z` is of `x`'s
  shape and dtype. With `group_size` (one normalized axis, which it divides), the mean square
  is per group of `group_size` consecutive features: each group is a row of the view, and the
  scale's groups its `groups` rows."""
  n = math.prod(x.shape[x.ndim - n_axes:])
  vector = jnp.ones((n,), F32) if scale is None else scale.reshape(n).astype(F32)
  groups = 1
  if group_size is not None:
    groups, n = n // group_size, group_size
  rows = math.prod(x.shape[:x.ndim - n_axes]) * groups
  (y,) = rows_gated_forward_p.bind(x.reshape(rows, n), z.reshape(rows, n), vector, eps=eps,
                                   before=before, groups=groups)
  return y.reshape(x.shape)
