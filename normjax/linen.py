"""Flax linen wrappers: drop-in replacements for `flax.linen`'s normalization modules.

`BatchNorm`, `LayerNorm`, `RMSNorm`, `InstanceNorm` and `GroupNorm` have the attributes, the
defaults, the variable names and the collections of their `flax.linen` namesakes (flax 0.12):
`params` holds `scale` and `bias`, `batch_stats` holds `mean` and `var`. Variables made by
`flax.linen.X(...).init(...)` load unchanged and give the same output, so switching is

    import flax.linen as nn          ->   import normjax.linen as nn   (for these five modules)

Each wrapper creates its variables, translates its attributes to the arguments of one normjax
function and calls it; the maths is normjax's (see `normjax._core`). Differences from flax:

* The variance is always the stable shifted two-pass one. `use_fast_variance` (flax's default
  True: the one-pass `E[x^2] - E[x]^2`, which is garbage for inputs like `1e4 + N(0, 1)` in
  float32) is accepted for compatibility and ignored.
* Statistics are always reduced in at least float32. `force_float32_reductions=False` is
  accepted; as in flax it makes the `batch_stats` variables `param_dtype`.
* Complex input raises `TypeError` (flax normalizes it).
* `axis_index_groups` is supported by `BatchNorm` only; the others raise `ValueError` for it.

As in flax, `BatchNorm` in `init` with `use_running_average=False` normalizes the returned
output with the batch statistics (taken without `axis_name`) and leaves the running ones at
their initial values; a single value per channel in training (a batch of one) gives variance 0
and the output `bias`, and so does `InstanceNorm` with nothing left to reduce (`[N, C]` input).

Extras flax lacks: `momentum=None` (a cumulative average; adds a `count` to `batch_stats`),
`unbiased_running_var` (PyTorch's running variance), a `mask` call argument honoured by every
module, and a channels-first `GroupNorm` (`feature_axis=1`; `InstanceNorm` already takes
`feature_axes=1`).

`AddLayerNorm` and `AddRMSNorm` are `LayerNorm` and `RMSNorm` (same attributes and variables,
so checkpoints carry over) called with the residual stream: `y, h = AddLayerNorm()(x,
residual)` is `h = x + residual; y = LayerNorm()(h)` computed in one pass
(`normjax.add_layer_norm`; a separate module rather than a `residual=` argument, so that the
return type never depends on an argument).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.typing import Axes, Dtype, Initializer
from jax.nn import initializers

from normjax import _flax
from normjax._state import BatchStats

__all__ = ("AddLayerNorm", "AddRMSNorm", "BatchNorm", "GroupNorm", "InstanceNorm", "LayerNorm",
           "RMSNorm")


def _affine(module: nn.Module, shape: tuple[int, ...], bias: bool = True):
  """Creates `scale` then `bias` (flax's order, so random initializers draw the same keys)."""
  m = module
  scale = m.param("scale", m.scale_init, shape, m.param_dtype) if m.use_scale else None
  if not bias:
    return scale
  return scale, (m.param("bias", m.bias_init, shape, m.param_dtype) if m.use_bias else None)


class BatchNorm(nn.Module):
  """Batch normalization (`normjax.batch_norm`) with `flax.linen.BatchNorm`'s interface.

  Attributes:
    use_running_average: True to normalize with the stored statistics (evaluation); may be
      given here or at call time (exactly one of the two, as in flax).
    axis: the feature axis, or a tuple of feature axes (merged into one channel axis).
    momentum: decay of the running averages, `new = momentum * old + (1 - momentum) * batch`;
      None for the cumulative average over all batches (adds `batch_stats/count`, int32, the
      number of batches averaged). Variables without a `count` (made by flax) evaluate as they
      are; training them raises `ValueError` until a `count` is added.
    epsilon: added to the variance.
    dtype: output dtype (default: promoted from the input and the parameters).
    param_dtype: dtype of `scale` and `bias`.
    use_bias: create and add `bias`.
    use_scale: create and multiply by `scale`.
    bias_init: initializer of `bias`.
    scale_init: initializer of `scale`.
    axis_name: mapped axis (pmap, shard_map, vmap) over which the batch is split.
    axis_index_groups: device groups along `axis_name` that share statistics.
    use_fast_variance: accepted for compatibility, ignored (the variance is always stable).
    force_float32_reductions: False stores `batch_stats` in `param_dtype` (as flax does);
      reductions are in at least float32 either way.
    unbiased_running_var: store the unbiased `n / (n - 1)` batch variance in `var` (PyTorch).

  Example:
    >>> import jax, jax.numpy as jnp, normjax.linen as njnn
    >>> x = jax.random.normal(jax.random.key(0), (8, 3))
    >>> bn = njnn.BatchNorm(momentum=0.9)
    >>> variables = bn.init(jax.random.key(1), x, use_running_average=False)
    >>> y, updates = bn.apply(variables, x, use_running_average=False, mutable=["batch_stats"])
    >>> jax.tree.map(jnp.shape, updates)
    {'batch_stats': {'mean': (3,), 'var': (3,)}}
  """
  use_running_average: bool | None = None
  axis: int | tuple[int, ...] = -1
  momentum: float | None = 0.99
  epsilon: float = 1e-5
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  use_bias: bool = True
  use_scale: bool = True
  bias_init: Initializer = initializers.zeros
  scale_init: Initializer = initializers.ones
  axis_name: str | None = None
  axis_index_groups: Any = None
  use_fast_variance: bool = True
  force_float32_reductions: bool = True
  unbiased_running_var: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, use_running_average: bool | None = None, *,
               mask: jax.Array | None = None) -> jax.Array:
    """Normalizes `x`; in training (not during `init`) updates `batch_stats` (mutable).

    Args:
      x: floating input.
      use_running_average: True for the stored statistics; give it here or as the attribute,
        not both (flax's `merge_param` rule).
      mask: optional bool array broadcastable to `x`; True elements enter the statistics.
    """
    use_running_average = nn.merge_param("use_running_average", self.use_running_average,
                                         use_running_average)
    feature_axes = _flax.feature_axes(self.axis, jnp.ndim(x), "axis")
    shape = tuple(jnp.shape(x)[a] for a in feature_axes)
    stats_dtype = jnp.float32 if self.force_float32_reductions else self.param_dtype
    mean = self.variable("batch_stats", "mean", jnp.zeros, shape, stats_dtype)
    var = self.variable("batch_stats", "var", jnp.ones, shape, stats_dtype)
    init = self.is_initializing()
    update = not use_running_average and not init  # flax: init uses but never updates them
    count = None
    if self.momentum is None and (init or self.has_variable("batch_stats", "count")):
      count = self.variable("batch_stats", "count", jnp.zeros, (), jnp.int32)
    elif self.momentum is None and update:
      where = "".join(f"[{k!r}]" for k in ("batch_stats", *self.scope.path, "count"))
      raise ValueError(
          "BatchNorm(momentum=None) averages over all batches so far, counted by "
          "batch_stats/count, which these variables lack (flax's BatchNorm does not make it); "
          "got batch_stats with " + ", ".join(sorted(self.variables.get("batch_stats", {})))
          + f". Add it before training: variables{where} = jnp.asarray(n, jnp.int32), n the "
          "number of batches the loaded mean and var average (0 restarts the average: the "
          "first batch replaces them).")
    scale, bias = _affine(self, shape)
    stats = BatchStats(mean.value, var.value,
                       jnp.zeros((), jnp.int32) if count is None else count.value)
    y, new = _flax.batch_norm(
        x, scale, bias, stats, axis=self.axis, dtype=self.dtype, mask=mask,
        train=not use_running_average, momentum=self.momentum, eps=self.epsilon,
        axis_name=None if init else self.axis_name,
        axis_index_groups=None if init else self.axis_index_groups,
        unbiased_running_var=self.unbiased_running_var)
    if update:
      mean.value, var.value = new.mean, new.var
      if count is not None:
        count.value = new.count
    return y


class LayerNorm(nn.Module):
  """Layer normalization (`normjax.layer_norm`) with `flax.linen.LayerNorm`'s interface.

  Statistics are taken over `reduction_axes`; `scale` and `bias` have the shape of
  `feature_axes` (which need not be among the reduction axes:
  `LayerNorm(reduction_axes=(1, 2), feature_axes=-1)` is an instance norm).

  Attributes:
    epsilon: added to the variance (flax's default 1e-6).
    dtype, param_dtype, use_bias, use_scale, bias_init, scale_init: as in `BatchNorm`.
    reduction_axes: the axes normalized over.
    feature_axes: the axes `scale` and `bias` vary along.
    axis_name: a mapped axis that is itself one of the normalized axes (sharded features).
    axis_index_groups: not supported (must be None).
    use_fast_variance: accepted for compatibility, ignored (the variance is always stable).
    force_float32_reductions: accepted, ignored (reductions are in at least float32).

  Example:
    >>> import jax, jax.numpy as jnp, normjax.linen as njnn
    >>> x = jnp.array([[1.0, 2.0, 3.0]])
    >>> ln = njnn.LayerNorm(epsilon=0.0)
    >>> ln.apply(ln.init(jax.random.key(0), x), x).round(4)
    Array([[-1.2247,  0.    ,  1.2247]], dtype=float32)
  """
  epsilon: float = 1e-6
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  use_bias: bool = True
  use_scale: bool = True
  bias_init: Initializer = initializers.zeros
  scale_init: Initializer = initializers.ones
  reduction_axes: Axes = -1
  feature_axes: Axes = -1
  axis_name: str | None = None
  axis_index_groups: Any = None
  use_fast_variance: bool = True
  force_float32_reductions: bool = True

  @nn.compact
  def __call__(self, x: jax.Array, *, mask: jax.Array | None = None) -> jax.Array:
    """Normalizes `x`; `mask` (bool, broadcastable to `x`) selects what enters the statistics."""
    _flax.no_index_groups(self.axis_index_groups, "LayerNorm")
    feature_axes = _flax.feature_axes(self.feature_axes, jnp.ndim(x), "feature_axes")
    scale, bias = _affine(self, tuple(jnp.shape(x)[a] for a in feature_axes))
    return _flax.layer_norm(x, scale, bias, reduction_axes=self.reduction_axes,
                            feature_axes=self.feature_axes, dtype=self.dtype, mask=mask,
                            eps=self.epsilon, axis_name=self.axis_name)


class RMSNorm(nn.Module):
  """RMS normalization (`normjax.rms_norm`) with `flax.linen.RMSNorm`'s interface.

  `x * rsqrt(mean(x**2) + epsilon) * scale` over `reduction_axes`; no bias.

  Attributes:
    epsilon: added to the mean square (default 1e-6).
    dtype, param_dtype, use_scale, scale_init: as in `BatchNorm`.
    reduction_axes, feature_axes, axis_name, axis_index_groups: as in `LayerNorm`.
    use_fast_variance, force_float32_reductions: accepted for compatibility, ignored.

  Example:
    >>> import jax, jax.numpy as jnp, normjax.linen as njnn
    >>> x = jnp.array([[3.0, -3.0]])
    >>> rms = njnn.RMSNorm(epsilon=0.0)
    >>> rms.apply(rms.init(jax.random.key(0), x), x)
    Array([[ 1., -1.]], dtype=float32)
  """
  epsilon: float = 1e-6
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  use_scale: bool = True
  scale_init: Initializer = initializers.ones
  reduction_axes: Axes = -1
  feature_axes: Axes = -1
  axis_name: str | None = None
  axis_index_groups: Any = None
  use_fast_variance: bool = True
  force_float32_reductions: bool = True

  @nn.compact
  def __call__(self, x: jax.Array, *, mask: jax.Array | None = None) -> jax.Array:
    """Normalizes `x`; `mask` (bool, broadcastable to `x`) selects what enters the statistics."""
    _flax.no_index_groups(self.axis_index_groups, "RMSNorm")
    feature_axes = _flax.feature_axes(self.feature_axes, jnp.ndim(x), "feature_axes")
    scale = _affine(self, tuple(jnp.shape(x)[a] for a in feature_axes), bias=False)
    return _flax.layer_norm(x, scale, None, reduction_axes=self.reduction_axes,
                            feature_axes=self.feature_axes, dtype=self.dtype, mask=mask,
                            centered=False, eps=self.epsilon, axis_name=self.axis_name)


class AddLayerNorm(LayerNorm):
  """`LayerNorm` of the residual sum: `__call__(x, residual) -> (y, h)` with `h = x +
  residual` and `y = LayerNorm(...)(h)` (`normjax.add_layer_norm`: one pass on the native
  kernels). Same attributes and variables as `LayerNorm`.

  Example:
    >>> import jax, jax.numpy as jnp, normjax.linen as njnn
    >>> x, r = jnp.array([[1.0, 2.0, 3.0]]), jnp.array([[0.0, 1.0, 2.0]])
    >>> ln = njnn.AddLayerNorm(epsilon=0.0)
    >>> y, h = ln.apply(ln.init(jax.random.key(0), x, r), x, r)
    >>> h, y.round(4)
    (Array([[1., 3., 5.]], dtype=float32), Array([[-1.2247,  0.    ,  1.2247]], dtype=float32))
  """

  @nn.compact
  def __call__(self, x: jax.Array,  # type: ignore[override]
               residual: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`(y, h)`: the normalized sum and the sum (`residual` of `x`'s shape and dtype)."""
    _flax.no_index_groups(self.axis_index_groups, "AddLayerNorm")
    feature_axes = _flax.feature_axes(self.feature_axes, jnp.ndim(x), "feature_axes")
    scale, bias = _affine(self, tuple(jnp.shape(x)[a] for a in feature_axes))
    return _flax.add_layer_norm(x, residual, scale, bias, reduction_axes=self.reduction_axes,
                                feature_axes=self.feature_axes, dtype=self.dtype,
                                eps=self.epsilon, axis_name=self.axis_name)


class AddRMSNorm(RMSNorm):
  """`RMSNorm` of the residual sum: `__call__(x, residual) -> (y, h)`, as `AddLayerNorm`."""

  @nn.compact
  def __call__(self, x: jax.Array,  # type: ignore[override]
               residual: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`(y, h)`: the normalized sum and the sum (`residual` of `x`'s shape and dtype)."""
    _flax.no_index_groups(self.axis_index_groups, "AddRMSNorm")
    feature_axes = _flax.feature_axes(self.feature_axes, jnp.ndim(x), "feature_axes")
    scale = _affine(self, tuple(jnp.shape(x)[a] for a in feature_axes), bias=False)
    return _flax.add_layer_norm(x, residual, scale, None, reduction_axes=self.reduction_axes,
                                feature_axes=self.feature_axes, dtype=self.dtype,
                                centered=False, eps=self.epsilon, axis_name=self.axis_name)


class InstanceNorm(nn.Module):
  """Instance normalization (`normjax.instance_norm`) with `flax.linen.InstanceNorm`'s interface.

  Axis 0 is the batch axis; statistics are taken per example and feature over every other axis.
  `feature_axes=1` is the channels-first (PyTorch `NC...`) layout.

  Attributes:
    epsilon: added to the variance (default 1e-6).
    dtype, param_dtype, use_bias, use_scale, bias_init, scale_init: as in `BatchNorm`.
    feature_axes: the channel axis (or several, merged into one).
    axis_name: a mapped axis that is one of the reduced (spatial) axes.
    axis_index_groups: not supported (must be None).
    use_fast_variance, force_float32_reductions: accepted for compatibility, ignored.

  Example:
    >>> import jax, jax.numpy as jnp, normjax.linen as njnn
    >>> x = jnp.array([[[0.0], [2.0]]])   # [N=1, L=2, C=1]
    >>> inorm = njnn.InstanceNorm(epsilon=0.0)
    >>> inorm.apply(inorm.init(jax.random.key(0), x), x)[..., 0]
    Array([[-1.,  1.]], dtype=float32)
  """
  epsilon: float = 1e-6
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  use_bias: bool = True
  use_scale: bool = True
  bias_init: Initializer = initializers.zeros
  scale_init: Initializer = initializers.ones
  feature_axes: Axes = -1
  axis_name: str | None = None
  axis_index_groups: Any = None
  use_fast_variance: bool = True
  force_float32_reductions: bool = True

  @nn.compact
  def __call__(self, x: jax.Array, *, mask: jax.Array | None = None) -> jax.Array:
    """Normalizes `x`; `mask` (bool, broadcastable to `x`) selects what enters the statistics."""
    _flax.no_index_groups(self.axis_index_groups, "InstanceNorm")
    feature_axes = _flax.feature_axes(self.feature_axes, jnp.ndim(x), "feature_axes")
    scale, bias = _affine(self, tuple(jnp.shape(x)[a] for a in feature_axes))
    return _flax.instance_norm(x, scale, bias, feature_axes=self.feature_axes, dtype=self.dtype,
                               mask=mask, eps=self.epsilon, axis_name=self.axis_name)


class GroupNorm(nn.Module):
  """Group normalization (`normjax.group_norm`) with `flax.linen.GroupNorm`'s interface.

  `num_groups=1` is a layer norm over all non-batch axes; `group_size=1` is an instance norm.
  As in flax, `num_groups` defaults to 32: pass `num_groups=None` to give `group_size`.

  Attributes:
    num_groups: the number of channel groups (default 32).
    group_size: the number of channels per group (give exactly one of the two).
    epsilon: added to the variance (default 1e-6).
    dtype, param_dtype, use_bias, use_scale, bias_init, scale_init: as in `BatchNorm`.
    reduction_axes: the axes normalized over, which must include the channel axis; None for
      every axis but 0. Axes not listed are per-example (batch-like) axes.
    axis_name: a mapped axis that is one of the reduced (spatial) axes.
    axis_index_groups: not supported (must be None).
    use_fast_variance, force_float32_reductions: accepted for compatibility, ignored.
    feature_axis: the channel axis, -1 as in flax; 1 for channels-first (`NC...`) input.

  Example:
    >>> import jax, jax.numpy as jnp, normjax.linen as njnn
    >>> x = jnp.array([[0.0, 2.0, 10.0, 14.0]])        # [N=1, C=4]
    >>> gn = njnn.GroupNorm(num_groups=2, epsilon=0.0)
    >>> gn.apply(gn.init(jax.random.key(0), x), x)
    Array([[-1.,  1., -1.,  1.]], dtype=float32)
  """
  num_groups: int | None = 32
  group_size: int | None = None
  epsilon: float = 1e-6
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  use_bias: bool = True
  use_scale: bool = True
  bias_init: Initializer = initializers.zeros
  scale_init: Initializer = initializers.ones
  reduction_axes: Axes | None = None
  axis_name: str | None = None
  axis_index_groups: Any = None
  use_fast_variance: bool = True
  force_float32_reductions: bool = True
  feature_axis: int = -1

  @nn.compact
  def __call__(self, x: jax.Array, *, mask: jax.Array | None = None) -> jax.Array:
    """Normalizes `x`; `mask` (bool, broadcastable to `x`) selects what enters the statistics."""
    _flax.no_index_groups(self.axis_index_groups, "GroupNorm")
    channel_axis = _flax.feature_axes(self.feature_axis, jnp.ndim(x), "feature_axis")
    scale, bias = _affine(self, tuple(jnp.shape(x)[a] for a in channel_axis))
    return _flax.group_norm(x, scale, bias, reduction_axes=self.reduction_axes,
                            feature_axis=self.feature_axis, dtype=self.dtype, mask=mask,
                            num_groups=self.num_groups, group_size=self.group_size,
                            eps=self.epsilon, axis_name=self.axis_name)
