"""Dynamic tanh (Zhu et al., 2025, "Transformers without Normalization"): a normalization
layer's replacement without statistics."""

from __future__ import annotations

from collections.abc import Sequence

import jax

from normjax._src import checks
from normjax._src import dispatch
from normjax._src import shapes


def dynamic_tanh(x: jax.Array, alpha: jax.Array, scale: jax.Array | None = None,
                 bias: jax.Array | None = None, *,
                 axis: int | Sequence[int] = -1) -> jax.Array:
  """Dynamic tanh: `tanh(alpha * x) * scale + bias`, computed in float32.

  Args:
    x: floating input.
    alpha: the learnable scalar (shape `()`), floating.
    scale: multiplier of the feature shape along `axis` (as `layer_norm`'s), or None.
    bias: offset of the same shape, or None.
    axis: the feature axis or axes of `scale` and `bias`.

  Returns:
    Array of `x.shape` and `x.dtype`.

  Raises:
    TypeError: non-floating `x`, `alpha`, `scale` or `bias`, or a bad `axis`.
    ValueError: `alpha` not a scalar, `scale`/`bias` not of the feature shape, or axes out of
      range or repeated.

  Example:
    >>> import jax.numpy as jnp, normjax as nj
    >>> nj.dynamic_tanh(jnp.array([[0.0, 100.0]]), jnp.asarray(0.5))
    Array([[0., 1.]], dtype=float32)
  """
  x = checks.check_floating(x)
  alpha = checks.check_floating(alpha, "alpha")
  if tuple(alpha.shape) != ():
    raise ValueError(f"alpha must be a scalar (shape ()), the learnable steepness; got shape "
                     f"{tuple(alpha.shape)}.")
  axes = checks.canonicalize_axes(axis, x.ndim, "axis")
  feature_shape = tuple(x.shape[a] for a in axes)
  scale = checks.check_param(scale, "scale", feature_shape)
  bias = checks.check_param(bias, "bias", feature_shape)
  return dispatch.dynamic_tanh(x, alpha, shapes.broadcast_to_axes(scale, x.ndim, axes),
                               shapes.broadcast_to_axes(bias, x.ndim, axes), axes)
