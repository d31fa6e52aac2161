"""Filter response normalization and the thresholded linear unit (Singh & Krishnan, 2019)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from normjax._src import checks
from normjax._src import dispatch
from normjax._src import shapes


def filter_response_norm(x: jax.Array, scale: jax.Array | None = None,
                         bias: jax.Array | None = None, tau: jax.Array | None = None, *,
                         channel_axis: int = -1, batch_axis: int | None = 0, eps: float = 1e-6,
                         mask: jax.Array | None = None) -> jax.Array:
  """Filter response normalization (Singh & Krishnan, 2019), followed by a TLU if `tau` is given.

  `nu2 = mean(x**2)` per example and channel over every other axis (no mean is subtracted);
  `y = x * rsqrt(nu2 + eps) * scale + bias`, then `max(y, tau)` when `tau` is given (`tlu`).
  On `[N, C]` input there is no other axis: `nu2 = x**2` (the paper's fully connected case,
  where a learned `eps` matters).

  Args:
    x: `[N, ..., C]` (or `[N, C, ...]` with `channel_axis=1`; `[..., C]` with `batch_axis=None`).
    scale: `[C]` multiplier (the paper's gamma), or None.
    bias: `[C]` offset (beta), or None.
    tau: `[C]` learned threshold of the TLU, or None for no TLU.
    channel_axis: the channel axis.
    batch_axis: the example axis, or None when `x` is a single example (e.g. inside `jax.vmap`).
    eps: added to `nu2`: a finite number >= 0. A traced eps (e.g. a learned one) is used as
      is, and is differentiable.
    mask: optional bool array broadcastable to `x`; only True elements enter `nu2`.

  Returns:
    Array of `x.shape` and `x.dtype`.

  Raises:
    TypeError: non-floating `x`, `scale`, `bias` or `tau`, a non-int axis, a non-real `eps`, or
      a non-boolean `mask`.
    ValueError: `channel_axis == batch_axis`, an axis out of range, `scale`/`bias`/`tau` not of
      shape `[C]`, a negative, NaN or infinite `eps`, or a mask not broadcastable to `x`.

  Example:
    >>> import jax.numpy as jnp, normjax as nj
    >>> x = jnp.array([[[2.0], [-2.0]]])                 # [N=1, L=2, C=1]: nu2 = 4
    >>> nj.filter_response_norm(x, eps=0.0)[..., 0]
    Array([[ 1., -1.]], dtype=float32)
    >>> nj.filter_response_norm(x, tau=jnp.array([0.0]), eps=0.0)[..., 0]
    Array([[1., 0.]], dtype=float32)
  """
  x = checks.check_floating(x)
  c_axis, b_axis = checks.channel_and_batch_axes(channel_axis, batch_axis, x.ndim)
  scale = checks.check_channel_param(scale, "scale", x.shape, c_axis)
  bias = checks.check_channel_param(bias, "bias", x.shape, c_axis)
  tau = checks.check_channel_param(tau, "tau", x.shape, c_axis)
  eps = checks.check_eps(eps)
  mask = checks.check_mask(mask, x.shape)
  per_channel = lambda p: shapes.broadcast_to_axes(p, x.ndim, (c_axis,))
  spatial = tuple(a for a in range(x.ndim) if a not in (b_axis, c_axis))
  # A traced eps (e.g. a learned one) takes the reference, whose derivative covers eps too.
  y, _ = dispatch.standardize(x, spatial, per_channel(scale), per_channel(bias), eps,
                               mask=mask, centered=False)
  return y if tau is None else _threshold(y, shapes.broadcast_to_axes(tau, x.ndim, (c_axis,)))


def tlu(x: jax.Array, tau: jax.Array, *, channel_axis: int = -1) -> jax.Array:
  """Thresholded linear unit (Singh & Krishnan, 2019): `max(x, tau)`, `tau` per channel.

  Args:
    x: floating input with channels on `channel_axis`.
    tau: `[C]` threshold.
    channel_axis: the channel axis.

  Returns:
    Array of `x.shape` and `x.dtype`.

  Raises:
    TypeError: non-floating `x` or `tau`, or a non-int `channel_axis`.
    ValueError: `channel_axis` out of range or `tau` not of shape `[C]`.

  Example:
    >>> import jax.numpy as jnp, normjax as nj
    >>> nj.tlu(jnp.array([[-1.0, 2.0], [3.0, -4.0]]), jnp.array([0.0, -3.0]))
    Array([[ 0.,  2.],
           [ 3., -3.]], dtype=float32)
  """
  x = checks.check_floating(x)
  c_axis = checks.canonicalize_axis(channel_axis, x.ndim, "channel_axis")
  checked = checks.check_channel_param(tau, "tau", x.shape, c_axis)
  if checked is None:
    raise TypeError("tau must be a floating array of shape [C]; got tau=None.")
  return _threshold(x, shapes.broadcast_to_axes(checked, x.ndim, (c_axis,)))


def _threshold(y: jax.Array, tau: jax.Array) -> jax.Array:
  """`max(y, tau)` in `y.dtype` (`tau` broadcast-shaped)."""
  return jnp.maximum(y, tau.astype(y.dtype))
