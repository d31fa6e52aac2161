"""Per-example (conditional) modulation: adaLN / adaLN-Zero (DiT) and AdaGN (diffusion U-Nets).

`y = norm(x) * (1 + scale) + shift`, the norm without affine parameters, with `shift` and
`scale` computed per example from a conditioning vector (a timestep, a class). The factors are
formed in float32 and applied in the normalize step itself, so the closed-form derivative
covers them (in `x`, `shift` and `scale`, any order) and `xhat` is never rounded to a
low-precision `x.dtype` before the modulation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax

from normjax._src import checks
from normjax._src import dispatch
from normjax._src import group


def adaptive_layer_norm(x: jax.Array, shift: jax.Array | None = None,
                        scale: jax.Array | None = None, *, axis: int | Sequence[int] = -1,
                        eps: float = 1e-6, mask: jax.Array | None = None) -> jax.Array:
  """Adaptive layer norm (adaLN, DiT): `layer_norm(x) * (1 + scale) + shift`.

  DiT's `modulate(norm(x), shift, scale)` with `norm = LayerNorm(elementwise_affine=False,
  eps=1e-6)`, in one normalize step.

  Args:
    x: floating input, e.g. `[B, T, D]`.
    shift: per-example offset of `x`'s rank, broadcastable to `x` (`[B, 1, D]` for `[B, T, D]`,
      `[B, 1, 1, C]` for NHWC), or None.
    scale: per-example scale of the same kind (the modulation is `1 + scale`, formed in
      float32), or None.
    axis: the axis or axes normalized over.
    eps: added to the variance (DiT's 1e-6 by default).
    mask: optional bool array broadcastable to `x`; only True elements enter the statistics.

  Returns:
    Array of `x.shape` and `x.dtype`.

  Raises:
    TypeError: non-floating `x`, `shift` or `scale`, and `layer_norm`'s type errors.
    ValueError: a `shift`/`scale` of another rank than `x` or not broadcastable to it, and
      `layer_norm`'s value errors.

  Example:
    >>> import jax.numpy as jnp, normjax as nj
    >>> x = jnp.array([[[1.0, 3.0]], [[1.0, 3.0]]])                 # [B=2, T=1, D=2]
    >>> scale = jnp.array([0.0, 1.0]).reshape(2, 1, 1)             # per example
    >>> nj.adaptive_layer_norm(x, None, scale, eps=0.0)[:, 0]
    Array([[-1.,  1.],
           [-2.,  2.]], dtype=float32)
  """
  x, axes, mask, eps, factor, offset = _prepare(x, shift, scale, axis, eps, mask)
  y, _ = dispatch.standardize(x, axes, factor, offset, eps, mask=mask)
  return y


def adaptive_rms_norm(x: jax.Array, scale: jax.Array | None = None, *,
                      axis: int | Sequence[int] = -1, eps: float = 1e-6,
                      mask: jax.Array | None = None) -> jax.Array:
  """Adaptive RMS norm: `rms_norm(x) * (1 + scale)`, `scale` per example.

  Args:
    x: floating input, e.g. `[B, T, D]`.
    scale: per-example scale of `x`'s rank, broadcastable to `x`, or None.
    axis, eps, mask: as in `adaptive_layer_norm`.

  Returns:
    Array of `x.shape` and `x.dtype`.

  Raises:
    TypeError, ValueError: as `adaptive_layer_norm`.

  Example:
    >>> import jax.numpy as jnp, normjax as nj
    >>> nj.adaptive_rms_norm(jnp.array([[3.0, 4.0]]), jnp.array([[1.0, 1.0]]), eps=0.0)
    Array([[1.6970563, 2.2627418]], dtype=float32)
  """
  x, axes, mask, eps, factor, _ = _prepare(x, None, scale, axis, eps, mask)
  y, _ = dispatch.standardize(x, axes, factor, None, eps, mask=mask, centered=False)
  return y


def adaptive_group_norm(x: jax.Array, shift: jax.Array | None = None,
                        scale: jax.Array | None = None, *, num_groups: int | None = None,
                        group_size: int | None = None, channel_axis: int = -1,
                        batch_axis: int | None = 0, eps: float = 1e-5,
                        mask: jax.Array | None = None) -> jax.Array:
  """Adaptive group norm (AdaGN, diffusion U-Nets): `group_norm(x) * (1 + scale) + shift`.

  Args:
    x: `[N, ..., C]` (or `[N, C, ...]` with `channel_axis=1`).
    shift: per-example offset of `x`'s rank, broadcastable to `x` (`[N, 1, 1, C]` for NHWC),
      or None.
    scale: per-example scale of the same kind (the modulation is `1 + scale`, formed in
      float32), or None.
    num_groups, group_size, channel_axis, batch_axis, eps, mask: as in `group_norm`.

  Returns:
    Array of `x.shape` and `x.dtype`.

  Raises:
    TypeError, ValueError: `group_norm`'s errors, and a `shift`/`scale` of another rank than
      `x` or not broadcastable to it.

  Example:
    >>> import jax.numpy as jnp, normjax as nj
    >>> x = jnp.array([[[0.0, 2.0]], [[0.0, 2.0]]])                 # [N=2, L=1, C=2]
    >>> shift = jnp.array([0.0, 5.0]).reshape(2, 1, 1)
    >>> nj.adaptive_group_norm(x, shift, num_groups=1, eps=0.0)[:, 0]
    Array([[-1.,  1.],
           [ 4.,  6.]], dtype=float32)
  """
  x = checks.check_floating(x)
  modulation = (checks.check_modulation(shift, "shift", x),
                checks.check_modulation(scale, "scale", x))
  return group.normalize_groups(x, None, None, num_groups=num_groups, group_size=group_size,
                                channel_axis=channel_axis, batch_axis=batch_axis, eps=eps,
                                mask=mask, axis_name=None, fast_variance=False,
                                single_element=False, modulation=modulation)


def _prepare(x: Any, shift: Any, scale: Any, axis: Any, eps: Any, mask: Any):
  """The checked arguments and the modulation as the normalize step's `scale` and `bias`."""
  x = checks.check_floating(x)
  axes = checks.canonicalize_axes(axis, x.ndim, "axis")
  if not axes:
    raise ValueError(f"axis must name at least one axis to normalize over; got axis={axis!r}.")
  shift = checks.check_modulation(shift, "shift", x)
  scale = checks.check_modulation(scale, "scale", x)
  eps = checks.check_eps(eps)
  mask = checks.check_mask(mask, x.shape)
  factor = None if scale is None else dispatch.offset_scale(scale, 1.0)
  return x, axes, mask, eps, factor, shift
