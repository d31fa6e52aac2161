"""Gated RMS norm (Mamba-2's `RMSNormGated`, Qwen3-Next): an RMS norm and a SiLU gate `z`."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax

from normjax._src import checks
from normjax._src import dispatch
from normjax._src import shapes


def gated_rms_norm(x: jax.Array, z: jax.Array, scale: jax.Array | None = None, *,
                   axis: int | Sequence[int] = -1, group_size: int | None = None,
                   norm_before_gate: bool = False, eps: float = 1e-6) -> jax.Array:
  """Gated RMS normalization (Mamba-2): the gate `silu(z)` before or after an RMS norm.

  `norm_before_gate=False` (Mamba-2's default): `rms_norm(x * silu(z)) * scale`;
  `norm_before_gate=True`: `rms_norm(x) * scale * silu(z)`. The gate and the product are formed
  in float32 and the result rounded to `x.dtype` once. With `group_size=g` the mean square is
  taken per group of `g` consecutive features along `axis` (Mamba-2's `ngroups`), whose size
  `g` must divide.

  Args:
    x: floating input, e.g. `[B, T, D]`.
    z: the gate, of `x`'s shape.
    scale: the feature-shaped multiplier (the normalized axes in increasing order), or None.
    axis: the axis or axes normalized over (one axis with `group_size`).
    group_size: features per group of the mean square, or None for all of `axis`.
    norm_before_gate: apply the gate after the norm (True) or to its input (False).
    eps: added to the mean square.

  Returns:
    Array of `x.shape` and `x.dtype`.

  Raises:
    TypeError: non-floating `x`, `z` or `scale`, a non-bool `norm_before_gate`, a non-int
      `group_size`, and `rms_norm`'s type errors.
    ValueError: `z` of another shape than `x`, a `group_size` that does not divide the axis
      (or with several axes), and `rms_norm`'s value errors.

  Example:
    >>> import jax.numpy as jnp, normjax as nj
    >>> x, z = jnp.array([[3.0, 4.0]]), jnp.array([[20.0, 20.0]])    # silu(20) = 20
    >>> nj.gated_rms_norm(x, z, eps=0.0)
    Array([[0.84852815, 1.1313709 ]], dtype=float32)
  """
  x = checks.check_floating(x)
  z = checks.check_same_shape(z, x, "z")
  axes = checks.canonicalize_axes(axis, x.ndim, "axis")
  if not axes:
    raise ValueError(f"axis must name at least one axis to normalize over; got axis={axis!r}.")
  scale = checks.check_param(scale, "scale", tuple(x.shape[a] for a in axes))
  eps = checks.check_eps(eps)
  before = checks.check_bool(norm_before_gate, "norm_before_gate",
                             "True for rms_norm(x) * scale * silu(z)")
  if group_size is not None:
    group_size = checks.check_positive_int(group_size, "group_size")
    if len(axes) != 1 or x.shape[axes[0]] % group_size:
      raise ValueError(f"group_size={group_size} must divide the one normalized axis; got "
                       f"axis={axis!r} of size {[x.shape[a] for a in axes]} for x of shape "
                       f"{tuple(x.shape)}.")
  factor = shapes.broadcast_to_axes(scale, x.ndim, axes)
  # The gate inside the kernel, where one applies.
  y = dispatch.gated_rms_norm(x, z, axes, factor, eps, before=before, group_size=group_size)
  if y is not None:
    return y
  if before and group_size is None:   # the value as below, a faster derivative
    return _norm_then_gate(x, z, factor, axes, eps)
  return _gated(x, z, factor, axes, eps, group_size, before)


def _gated(x, z, factor, axes, eps, group_size, before):
  """The gated norm as one normalize step whose factor holds the gate (`norm_before_gate`)
  or whose input does; `factor` is the broadcast-shaped scale or None."""
  gate = dispatch.silu(z)
  if before:   # the gate joins the scale: one normalize step, one rounding
    factor = gate if factor is None else gate * factor.astype(gate.dtype)
    inner = x
  else:
    inner = x.astype(gate.dtype) * gate
  if group_size is not None:
    a = axes[0]
    split = x.shape[:a] + (x.shape[a] // group_size, group_size) + x.shape[a + 1:]
    y, _ = dispatch.standardize(inner.reshape(split), (a + 1,),
                                None if factor is None
                                else _split(factor, x.shape, a, group_size),
                                None, eps, centered=False)
    return y.reshape(x.shape).astype(x.dtype)
  y, _ = dispatch.standardize(inner, axes, factor, None, eps, centered=False)
  return y.astype(x.dtype)


@functools.partial(jax.custom_jvp, nondiff_argnums=(3, 4))
def _norm_then_gate(x, z, factor, axes, eps):
  """`rms_norm(x) * scale * silu(z)`.

  The value is `_gated`'s (one normalize step, XLA fuses the gate into it: the fastest
  forward, rounded once); the derivative is that of the norm with its feature scale times the
  gate (on the native path the rows kernels' backward, XLA for the gate). Training step
  against a user's `rms_norm(x, scale) * silu(z)`: float32 0.9-1.05, bfloat16 0.6; with
  `_gated`'s own derivative (its full-shaped factor, the gate times the scale) it took
  1.1-2.0x (float32) and 0.75-1.25x (bfloat16) on the native path.
  """
  return _gated(x, z, factor, axes, eps, None, True)


@_norm_then_gate.defjvp
def _norm_then_gate_jvp(axes, eps, primals, tangents):
  def composed(x, z, factor):
    y, _ = dispatch.standardize(x, axes, factor, None, eps, centered=False)
    gate = dispatch.silu(z)
    return y.astype(gate.dtype) * gate
  # The value is `_gated`'s whatever the mode (rounded to `x.dtype` once, bit for bit the
  # forward's); `composed`'s own value is left for XLA to drop.
  _, dy = jax.jvp(composed, primals, tangents)
  x, z, factor = primals
  y = _gated(x, z, factor, axes, eps, None, True)
  return y, dy.astype(y.dtype)


def _split(factor: jax.Array, x_shape: tuple[int, ...], a: int, size: int) -> jax.Array:
  """A factor broadcast-shaped against `x` as one against `x` with axis `a` split into
  `(x_shape[a] // size, size)`."""
  full = jax.numpy.broadcast_to(factor, tuple(x_shape[a] if i == a else d
                                              for i, d in enumerate(factor.shape)))
  return full.reshape(full.shape[:a] + (x_shape[a] // size, size) + full.shape[a + 1:])
