"""Instance and group normalization: statistics per example and channel (group of channels)."""

from __future__ import annotations

from typing import Any

import jax

from normjax._src import checks
from normjax._src import dispatch
from normjax._src import shapes


def instance_norm(x: jax.Array, scale: jax.Array | None = None, bias: jax.Array | None = None, *,
                  channel_axis: int = -1, batch_axis: int | None = 0, eps: float = 1e-5,
                  mask: jax.Array | None = None, axis_name: Any = None,
                  fast_variance: bool = False) -> jax.Array:
  """Instance normalization (Ulyanov et al., 2016): per example and channel, over the rest.

  Equals `group_norm` with `group_size=1`, and `torch.nn.functional.instance_norm` (no running
  statistics) on NCHW input with `channel_axis=1`.

  Args:
    x: `[N, ..., C]` (or `[N, C, ...]` with `channel_axis=1`; `[..., C]` with `batch_axis=None`).
    scale: `[C]` multiplier, or None.
    bias: `[C]` offset, or None.
    channel_axis: the channel axis.
    batch_axis: the example axis, or None when `x` is a single example (e.g. inside `jax.vmap`).
    eps: added to the variance.
    mask: optional bool array broadcastable to `x`; only True elements enter the statistics.
    axis_name: a mapped/sharded axis that is one of the reduced (spatial) axes.
    fast_variance: one-pass variance, less accurate for large means.

  Returns:
    Array of `x.shape` and `x.dtype`.

  Example:
    >>> import jax.numpy as jnp, normjax as nj
    >>> nj.instance_norm(jnp.array([[[0.0], [2.0]]]), eps=0.0)   # [N=1, L=2, C=1]
    Array([[[-1.],
            [ 1.]]], dtype=float32)
  """
  return group_norm(x, scale, bias, group_size=1, channel_axis=channel_axis,
                    batch_axis=batch_axis, eps=eps, mask=mask, axis_name=axis_name,
                    fast_variance=fast_variance)


def group_norm(x: jax.Array, scale: jax.Array | None = None, bias: jax.Array | None = None, *,
               num_groups: int | None = None, group_size: int | None = None,
               channel_axis: int = -1, batch_axis: int | None = 0, eps: float = 1e-5,
               mask: jax.Array | None = None, axis_name: Any = None,
               fast_variance: bool = False) -> jax.Array:
  """Group normalization (Wu & He, 2018): per example and group of consecutive channels.

  The `C` channels are split into `num_groups` groups of `group_size = C // num_groups`
  consecutive channels; statistics are taken per example and group over the group's channels
  and every other non-batch axis. `num_groups=1` is a layer norm over all non-batch axes (with
  per-channel scale); `group_size=1` is `instance_norm`. Matches
  `torch.nn.functional.group_norm` with `channel_axis=1` and `flax.linen.GroupNorm` with -1.

  Args:
    x: `[N, ..., C]` (or `[N, C, ...]` with `channel_axis=1`; `[..., C]` with `batch_axis=None`).
    scale: `[C]` multiplier, or None.
    bias: `[C]` offset, or None.
    num_groups: the number of groups; give exactly one of `num_groups` and `group_size`.
    group_size: the number of channels per group.
    channel_axis: the channel axis.
    batch_axis: the example axis, or None when `x` is a single example.
    eps: added to the variance: a finite number >= 0, used as a Python float (a traced eps is
      used unchanged, and is differentiable).
    mask: optional bool array broadcastable to `x`; only True elements enter the statistics.
    axis_name: a mapped/sharded axis that is one of the reduced (spatial) axes.
    fast_variance: one-pass variance, less accurate for large means.

  Returns:
    Array of `x.shape` and `x.dtype`.

  Raises:
    TypeError: non-floating `x`, `scale` or `bias`, a non-int axis, a non-integral
      `num_groups`/`group_size`, a non-real `eps`, a non-bool `fast_variance` or a non-boolean
      `mask`.
    ValueError: both or neither of `num_groups`/`group_size`, a count that does not divide `C`,
      `channel_axis == batch_axis`, bad shapes, a negative, NaN or infinite `eps`, or a single
      element per group (the Flax modules instead return `bias` there, as flax does).

  Example:
    >>> import jax.numpy as jnp, normjax as nj
    >>> x = jnp.array([[0.0, 2.0, 10.0, 14.0]])         # [N=1, C=4]
    >>> nj.group_norm(x, num_groups=2, eps=0.0)
    Array([[-1.,  1., -1.,  1.]], dtype=float32)
  """
  return normalize_groups(x, scale, bias, num_groups=num_groups, group_size=group_size,
                          channel_axis=channel_axis, batch_axis=batch_axis, eps=eps, mask=mask,
                          axis_name=axis_name, fast_variance=fast_variance,
                          single_element=False)


def normalize_groups(x: jax.Array, scale: jax.Array | None, bias: jax.Array | None, *,
                     num_groups: int | None, group_size: int | None, channel_axis: int,
                     batch_axis: int | None, eps: float, mask: jax.Array | None,
                     axis_name: Any, fast_variance: bool, single_element: bool,
                     modulation: tuple[jax.Array | None, jax.Array | None] | None = None
                     ) -> jax.Array:
  """`group_norm`, `instance_norm` and `adaptive_group_norm`, with flax's semantics as a
  named option.

  Args:
    single_element: also accept one element per example and group (flax's behaviour;
      `group_norm` raises), as the Flax modules do (e.g. `InstanceNorm` on `[N, C]` input):
      the mean is that element and the variance 0, so the output is `bias` (0 without bias),
      with finite derivatives.
    modulation: `(shift, scale)`, per-example factors checked by `checks.check_modulation`
      (either may be None), for `y = norm(x) * (1 + scale) + shift` in place of the
      per-channel `scale` and `bias` (which must then be None): `adaptive_group_norm`.
    The others: as in `group_norm`.
  """
  x = checks.check_floating(x)
  c_axis, b_axis = checks.channel_and_batch_axes(channel_axis, batch_axis, x.ndim)
  num_channels = x.shape[c_axis]
  size = checks.check_group_size(num_channels, num_groups, group_size)
  scale = checks.check_channel_param(scale, "scale", x.shape, c_axis)
  bias = checks.check_channel_param(bias, "bias", x.shape, c_axis)
  eps = checks.check_eps(eps)
  checks.check_bool(fast_variance, "fast_variance", "True for the one-pass variance")
  mask = checks.check_mask(mask, x.shape)

  # Statistics per example and group: reduce every axis but the batch and channel axes (per
  # channel, channels contiguous), then the channels of each group (`groups` of the numerics'
  # `moments`).
  reduce_axes = tuple(a for a in range(x.ndim) if a not in (b_axis, c_axis))
  if (not single_element and axis_name is None and
      shapes.reduced_size(x.shape, reduce_axes) * size == 1):
    raise ValueError(f"group_norm/instance_norm needs more than one element per example and group "
                     f"to normalize over; got x of shape {tuple(x.shape)} with group_size={size}, "
                     f"channel_axis={channel_axis}, batch_axis={batch_axis}.")
  if num_channels == 0:
    return x   # no channel, no group: nothing to normalize (any group count divides 0)
  factor = shapes.broadcast_to_axes(scale, x.ndim, (c_axis,))
  offset = shapes.broadcast_to_axes(bias, x.ndim, (c_axis,))
  if modulation is not None:
    shift, modulated = modulation
    factor = None if modulated is None else dispatch.offset_scale(modulated, 1.0)
    offset = shift
  y, _ = dispatch.standardize(x, reduce_axes, factor, offset, eps,
                               mask=mask, axis_name=axis_name, fast_variance=fast_variance,
                               groups=None if size == 1 else (c_axis, size))
  return y
