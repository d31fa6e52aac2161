"""Batch normalization and batch renormalization: statistics over every axis but the channel
axis, with running state; one implementation (`normalize_batch`) for both."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from normjax._src import checks
from normjax._src import dispatch
from normjax._src import shapes
from normjax._src.state import BatchStats
from normjax._src.state import update_running_stats


def batch_norm(x: jax.Array, scale: jax.Array | None, bias: jax.Array | None, stats: BatchStats,
               *, train: bool, channel_axis: int = -1, momentum: float | None = 0.99,
               eps: float = 1e-5, mask: jax.Array | None = None, axis_name: Any = None,
               axis_index_groups: Any = None, unbiased_running_var: bool = False,
               fast_variance: bool = False,
               virtual_batch_size: int | None = None) -> tuple[jax.Array, BatchStats]:
  """Batch normalization (Ioffe & Szegedy, 2015) with explicit running statistics.

  In training, `y = (x - E[x]) / sqrt(Var[x] + eps) * scale + bias` with the biased statistics of
  this batch, taken over every axis but `channel_axis` (and across `axis_name`), and the running
  statistics are updated: `new = momentum * old + (1 - momentum) * batch`. In evaluation the
  stored `stats` are used and returned unchanged.

  A single value per channel in training (e.g. a batch of one `[1, C]`) raises, as PyTorch
  does: its batch variance is 0 and the output is just `bias`. The Flax modules
  (`normjax.linen.BatchNorm`, `normjax.nnx.BatchNorm`) follow flax instead and return `bias`.

  Args:
    x: `[N, ..., C]` (or `[N, C, ...]` with `channel_axis=1`) floating input.
    scale: `[C]` multiplier, or None.
    bias: `[C]` offset, or None.
    stats: the running `BatchStats` (`[C]` mean and var, scalar count).
    train: True to normalize with batch statistics and update `stats`; False to use `stats`.
    channel_axis: the channel axis (-1 channels-last, 1 for PyTorch's NCHW).
    momentum: decay of the running averages, in [0, 1] (PyTorch's `momentum=m` is `1 - m`
      here); None for the cumulative average over the `count` batches counted (PyTorch's
      None): the `k`-th counted batch is folded in as `new = old + (batch - old) / k`.
      A batch is counted when some channel has an (unmasked) element: an empty batch (`x`
      of shape `(0, C)`, an all-False mask) changes neither `count` nor any statistic. The
      average is exact for every channel that has data in every counted batch: always
      without a mask, and with a mask shared by all channels (padding). `count` is one
      scalar (PyTorch's `num_batches_tracked`), so a channel with no element in a counted
      batch keeps its mean and var for that batch, and its next batch is weighed `1 / count`
      all the same (its missed batches count as its running value, the initial 0 and 1
      included); a per-channel mask that empties some channels only is better served by a
      `momentum`.
    eps: added to the variance: a finite number >= 0, used as a Python float (a traced eps is
      used unchanged, and is differentiable).
    mask: optional bool array broadcastable to `x`; only True elements enter the statistics.
      Channels with no True element keep their running statistics.
    axis_name: a `vmap`/`pmap`/`shard_map` axis whose shards are part of the batch: sums and
      counts are psum'd over it (count-weighted, exact for uneven masks).
    axis_index_groups: device groups along `axis_name` that share statistics (equal-size
      groups; requires `axis_name`).
    unbiased_running_var: store `n / (n - 1)` times the batch variance in the running `var`, as
      PyTorch does (normalization always uses the biased variance).
    fast_variance: one-pass variance `E[x^2] - E[x]^2`, less accurate for large means.
    virtual_batch_size: ghost batch norm (Hoffer et al., 2017), training only: axis 0 (`N`) is
      split into `N / k` consecutive groups of `k = virtual_batch_size` examples, each
      normalized with its own statistics; the running statistics are updated once, with the
      mean over groups of the group means and of the group variances (unweighted: every
      group counts once, however many of its elements the mask keeps). With `mask`, a group
      with no True element in a channel is left out of that channel's mean over groups (it
      would otherwise pull the running statistics towards 0); its outputs are those of any
      channel with no True element (mean 0, variance 0: `x / sqrt(eps) * scale + bias`), and
      a channel empty in every group keeps its running statistics. None (the default)
      normalizes the whole batch at once. With `axis_name`, group `i` of every device is
      normalized together. Evaluation ignores it.

  Returns:
    `(y, new_stats)`: `y` of `x.shape` and `x.dtype`, and the updated (training) or the same
    (evaluation) `BatchStats`.

  Raises:
    TypeError: `x`, `scale`, `bias`, `stats.mean` or `stats.var` is not floating, `stats` is
      not a BatchStats (or `stats.count` is not an integer array), `train`,
      `unbiased_running_var` or `fast_variance` is not a bool, `channel_axis` is not an int,
      `eps`/`momentum` is not a real number, or `mask` is not boolean.
    ValueError: an out-of-range axis, a `scale`/`bias`/`stats` shape other than `[C]` (a
      non-scalar `stats.count`), `momentum` outside [0, 1], a negative, NaN or infinite `eps`,
      `axis_index_groups` without `axis_name` (or of unequal groups), a mask not broadcastable
      to `x`, training with a single value per channel, or a `virtual_batch_size` < 1 or not
      dividing `N` (a non-int one is a TypeError).

  Example:
    >>> import jax.numpy as jnp, normjax as nj
    >>> x = jnp.arange(12.0).reshape(4, 3)
    >>> y, stats = nj.batch_norm(x, None, None, nj.init_batch_stats(3), train=True)
    >>> stats.mean
    Array([0.045, 0.055, 0.065], dtype=float32)
  """
  return normalize_batch(x, scale, bias, stats, train=train, channel_axis=channel_axis,
                         momentum=momentum, eps=eps, mask=mask, axis_name=axis_name,
                         axis_index_groups=axis_index_groups,
                         unbiased_running_var=unbiased_running_var,
                         fast_variance=fast_variance, single_value=False,
                         virtual_batch_size=virtual_batch_size)


def batch_renorm(x: jax.Array, scale: jax.Array | None, bias: jax.Array | None,
                 stats: BatchStats, *, train: bool, r_max: Any = 3.0, d_max: Any = 5.0,
                 warmup_steps: Any = 0, channel_axis: int = -1, momentum: float | None = 0.99,
                 eps: float = 1e-5, mask: jax.Array | None = None, axis_name: Any = None,
                 axis_index_groups: Any = None) -> tuple[jax.Array, BatchStats]:
  """Batch renormalization (Ioffe, 2017) with explicit running statistics.

  In training, with the biased batch statistics `mu_B`, `var_B`, `sigma_B = sqrt(var_B + eps)`
  and the running ones before this step, `sigma = sqrt(stats.var + eps)`:

    r = stop_gradient(clip(sigma_B / sigma, 1 / r_max, r_max))
    d = stop_gradient(clip((mu_B - stats.mean) / sigma, -d_max, d_max))
    y = ((x - mu_B) / sigma_B * r + d) * scale + bias

  While `stats.count < warmup_steps`, `r = 1` and `d = 0` (plain batch norm). Gradients flow
  through `mu_B` and `sigma_B` as in batch norm, not through `r` and `d`. The running
  statistics are updated exactly as `batch_norm` updates them, and evaluation is
  `batch_norm`'s. `r_max=1, d_max=0` is batch norm.

  Args:
    x: `[N, ..., C]` (or `[N, C, ...]` with `channel_axis=1`) floating input.
    scale: `[C]` multiplier, or None.
    bias: `[C]` offset, or None.
    stats: the running `BatchStats`; `count` (the number of training steps so far) drives the
      warmup.
    train: True for the batch statistics and an update of `stats`; False to use `stats`.
    r_max: bound of `r`, >= 1; may be a traced scalar (a schedule under `jit`).
    d_max: bound of `|d|`, >= 0; may be a traced scalar.
    warmup_steps: the number of first steps (`stats.count < warmup_steps`) that are plain
      batch norm; an int >= 0 or a traced integer scalar.
    channel_axis, momentum, eps, mask, axis_name, axis_index_groups: as in `batch_norm`.

  Returns:
    `(y, new_stats)` as in `batch_norm`.

  Raises:
    ValueError: `r_max < 1`, `d_max < 0`, `warmup_steps < 0` or above the largest
      `stats.count` of its dtype (when concrete), and `batch_norm`'s errors.
    TypeError: a non-real `r_max`/`d_max`, a non-integer `warmup_steps`, and `batch_norm`'s
      errors.

  Example:
    >>> import jax.numpy as jnp, normjax as nj
    >>> x = jnp.array([[0.0], [2.0]])            # batch mean 1, batch variance 1
    >>> stats = nj.init_batch_stats(1)          # running mean 0, variance 1: d = 1, r = 1
    >>> y, stats = nj.batch_renorm(x, None, None, stats, train=True, eps=0.0)
    >>> y
    Array([[0.],
           [2.]], dtype=float32)
  """
  return normalize_batch(x, scale, bias, stats, train=train, channel_axis=channel_axis,
                         momentum=momentum, eps=eps, mask=mask, axis_name=axis_name,
                         axis_index_groups=axis_index_groups, unbiased_running_var=False,
                         fast_variance=False, single_value=False,
                         renorm=checks.check_renorm(r_max, d_max, warmup_steps))


def normalize_batch(x: jax.Array, scale: jax.Array | None, bias: jax.Array | None,
                    stats: BatchStats, *, train: bool, channel_axis: int,
                    momentum: float | None, eps: float, mask: jax.Array | None, axis_name: Any,
                    axis_index_groups: Any, unbiased_running_var: bool, fast_variance: bool,
                    single_value: bool, virtual_batch_size: int | None = None,
                    renorm: checks.Renorm | None = None) -> tuple[jax.Array, BatchStats]:
  """`batch_norm` and `batch_renorm`, with flax's semantics as named options.

  Args:
    single_value: also train on one value per channel (flax's behaviour; `batch_norm`
      raises): the batch mean is that value and the batch variance 0, so the output is
      `bias` (0 without bias) and the derivatives are finite. The Flax modules pass True.
    renorm: `checks.check_renorm`'s settings to make it batch renormalization, or None.
    The others: as in `batch_norm`.
  """
  x = checks.check_floating(x)
  train = checks.check_bool(train, "train",
                           "True for batch statistics, False for the running statistics")
  c_axis = checks.canonicalize_axis(channel_axis, x.ndim, "channel_axis")
  num_channels = x.shape[c_axis]
  scale = checks.check_channel_param(scale, "scale", x.shape, c_axis)
  bias = checks.check_channel_param(bias, "bias", x.shape, c_axis)
  checks.check_stats(stats, num_channels)
  if renorm is not None:
    checks.check_warmup_fits(renorm, stats.count.dtype)
  eps = checks.check_eps(eps)
  momentum = checks.check_momentum(momentum)
  mask = checks.check_mask(mask, x.shape)
  checks.check_axis_index_groups(axis_index_groups, axis_name)
  unbiased_running_var = checks.check_bool(
      unbiased_running_var, "unbiased_running_var",
      "True to store the unbiased variance n / (n - 1) * var, as PyTorch does")
  fast_variance = checks.check_bool(fast_variance, "fast_variance",
                                   "True for the one-pass variance")
  if virtual_batch_size is not None:
    virtual_batch_size = checks.check_positive_int(virtual_batch_size, "virtual_batch_size")
    if x.ndim < 2 or c_axis == 0 or x.shape[0] % virtual_batch_size:
      raise ValueError(
          f"virtual_batch_size={virtual_batch_size} must divide the batch axis 0 of x (into "
          f"groups of consecutive examples), which must not be the channel axis; got x of shape "
          f"{tuple(x.shape)} with channel_axis={channel_axis}.")
  per_channel = lambda p: shapes.broadcast_to_axes(p, x.ndim, (c_axis,))

  if not train:
    mean, var = (shapes.broadcast_to_axes(v, x.ndim, (c_axis,)) for v in (stats.mean, stats.var))
    return dispatch.normalize_with_stats(x, mean, var, per_channel(scale), per_channel(bias),
                                         eps), stats

  xg, mg, cg = x, mask, c_axis
  if virtual_batch_size is not None:  # ghost batch norm: [N, ...] -> [N / k, k, ...]
    split = lambda a: a.reshape((-1, virtual_batch_size) + a.shape[1:])
    xg, mg, cg = split(x), None if mask is None else split(mask), c_axis + 1
  kept = (cg,) if virtual_batch_size is None else (0, cg)
  reduce_axes = tuple(a for a in range(xg.ndim) if a not in kept)
  devices = shapes.axis_size(axis_name, axis_index_groups)
  if (not single_value and mask is None and devices is not None and
      shapes.reduced_size(xg.shape, reduce_axes) * devices == 1):
    raise ValueError(f"batch_norm with train=True needs more than 1 value per channel; got x of "
                     f"shape {tuple(x.shape)} with channel_axis={channel_axis} (and {devices} "
                     f"device(s) along axis_name={axis_name!r}, virtual_batch_size="
                     f"{virtual_batch_size}). Use a larger batch, or train=False.")
  as_kept = lambda p: shapes.broadcast_to_axes(p, xg.ndim, (cg,))
  kw = dict(mask=mg, axis_name=axis_name, axis_index_groups=axis_index_groups,
            fast_variance=fast_variance)
  if renorm is None:
    y, batch = dispatch.standardize(xg, reduce_axes, as_kept(scale), as_kept(bias), eps, **kw)
  else:
    xhat, batch = dispatch.standardize(xg, reduce_axes, None, None, eps, **kw)
    active = stats.count >= jnp.asarray(renorm.warmup_steps, stats.count.dtype)
    mean, var = (shapes.broadcast_to_axes(v, xg.ndim, (cg,)) for v in (stats.mean, stats.var))
    y = dispatch.renormalize(xhat, batch, mean, var, as_kept(scale), as_kept(bias), eps,
                             renorm.r_max, renorm.d_max, active)
  y = y.reshape(x.shape)

  per_group = lambda v: jnp.broadcast_to(v, batch.var.shape).reshape(-1, num_channels)
  batch_mean = per_group(lax.stop_gradient(batch.mean))
  batch_var = per_group(lax.stop_gradient(batch.var))
  count = per_group(batch.count)
  if unbiased_running_var:
    batch_var = batch_var * count / jnp.maximum(count - 1, jnp.ones((), count.dtype))
  # One group, or ghost batch norm's mean over the groups of the group statistics: per
  # channel, over the groups with at least one (unmasked) element, so that a fully masked
  # group does not pull the running statistics towards its placeholder 0 mean and variance.
  has_data = count > 0                                               # [groups, C]
  groups = jnp.sum(has_data.astype(batch_mean.dtype), axis=0)
  over_groups = lambda v: (jnp.sum(jnp.where(has_data, v, jnp.zeros((), v.dtype)), axis=0)
                           / jnp.maximum(groups, jnp.ones((), groups.dtype)))
  new_stats = update_running_stats(stats, over_groups(batch_mean), over_groups(batch_var),
                                   groups > 0, momentum)
  return y, new_stats
