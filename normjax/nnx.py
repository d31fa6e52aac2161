"""Flax NNX wrappers: drop-in replacements for `flax.nnx`'s normalization modules.

`BatchNorm`, `LayerNorm`, `RMSNorm`, `InstanceNorm` and `GroupNorm` are constructed like their
`flax.nnx` namesakes (flax 0.12): `num_features`, the same keyword options and defaults, and
`rngs=`. They hold `nnx.Param` variables `scale` and `bias` and (`BatchNorm`) `nnx.BatchStat`
variables `mean` and `var`, so `nnx.update(ours, nnx.state(theirs))` loads a flax module's
state. Train/eval switching is flax's: the `use_running_average` attribute or call argument,
set for a whole model by `model.train()` / `model.eval()` or `nnx.view`. They work under
`nnx.jit`, `nnx.vmap`, `nnx.grad` and `nnx.value_and_grad`.

Each wrapper creates its variables, translates its options to one normjax function call and
calls it; the maths is normjax's. The differences from flax and the extras are those listed in
`normjax.linen` (stable variance whatever `use_fast_variance` says; `momentum=None` adds a
`count` BatchStat; `unbiased_running_var`; `mask` everywhere; `GroupNorm(feature_axis=1)`);
besides, the default `promote_dtype` also works under `jax_numpy_dtype_promotion="strict"`.

`AddLayerNorm` and `AddRMSNorm` are `LayerNorm` and `RMSNorm` (same constructor and
variables) called with the residual stream: `y, h = AddLayerNorm(C, rngs=rngs)(x, residual)`
is `h = x + residual; y = LayerNorm(C, rngs=rngs)(h)` in one pass (`normjax.add_layer_norm`;
a separate module rather than a `residual=` argument, so that the return type never depends
on an argument).

As in `normjax.linen`: `scale_offset` (zero-centered scale), `AdaptiveLayerNorm`,
`AdaptiveGroupNorm`, `DynamicTanh`, and `record_health=True`, which sows `normjax.norm_health`
as an `nnx.Intermediate` named `norm_health`; `nnx.capture` collects it in a training step:

    >>> import jax.numpy as jnp, optax, normjax.nnx as njnnx
    >>> from flax import nnx
    >>> model = njnnx.RMSNorm(3, record_health=True, rngs=nnx.Rngs(0))
    >>> optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
    >>> @nnx.jit
    ... def train_step(model, optimizer, x):
    ...   def loss(model):
    ...     y, intermediates = nnx.capture(model, nnx.Intermediate)(x)
    ...     return jnp.sum(y ** 2), intermediates["norm_health"][0]
    ...   (value, health), grads = nnx.value_and_grad(loss, has_aux=True)(model)
    ...   optimizer.update(model, grads)
    ...   return health
    >>> x = jnp.array([[1.0, 2.0, 4.0], [3.0, 3.0, 3.0]])     # one row of two is constant
    >>> health = train_step(model, optimizer, x)
    >>> {k: round(float(v), 2) for k, v in health._asdict().items()}
    {'ill_conditioned': 0.0, 'eps_dominated': 0.5, 'constant': 0.5, 'nonfinite': 0.0}
"""

from __future__ import annotations

from types import MappingProxyType
from typing import TYPE_CHECKING
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.module import first_from
from flax.nnx.nn import initializers
from flax.typing import Axes
from flax.typing import Dtype
from flax.typing import Initializer

from normjax._src import flax_adapter as _flax
from normjax._src import state as _state
from normjax._src import weights as _weights
from normjax._src.state import BatchStats

__all__ = ("AdaptiveGroupNorm", "AdaptiveLayerNorm", "AddLayerNorm", "AddRMSNorm", "BatchNorm",
           "BatchRenorm", "DynamicTanh", "FilterResponseNorm", "GroupNorm", "InstanceNorm",
           "LayerNorm", "RMSNorm", "SpectralNorm", "WSConv", "WeightNorm")

_NO_METADATA: MappingProxyType[str, Any] = MappingProxyType({})


def _param(use: bool, init: Initializer, rngs: nnx.Rngs, shape: tuple[int, ...], dtype: Dtype,
           metadata: Any) -> Any:
  """An `nnx.Param` from `init`, drawing one `rngs.params()` key as flax does; or no param."""
  return nnx.Param(init(rngs.params(), shape, dtype), **metadata) if use else nnx.data(None)


def _value(variable: Any) -> jax.Array | None:
  return None if variable is None else variable[...]


def _sow_health(module: nnx.Module, health: Any, *args: Any, **kwargs: Any) -> None:
  """With `record_health`, sows `health(*args, **kwargs)` (a `NormHealth`) as an
  `nnx.Intermediate` named `norm_health`."""
  if module.record_health:  # type: ignore[attr-defined]
    module.sow(nnx.Intermediate, "norm_health", health(*args, **kwargs))


def _store_options(module: nnx.Module, options: dict[str, Any]) -> None:
  """Keeps the constructor's options as attributes, as flax does (`locals()` of `__init__`)."""
  for name, value in options.items():
    if name not in ("self", "rngs", "bias_init", "scale_init", "bias_metadata", "scale_metadata"):
      setattr(module, name, value)


class BatchNorm(nnx.Module):
  """Batch normalization (`normjax.batch_norm`) with `flax.nnx.BatchNorm`'s interface.

  Args:
    num_features: the number of channels (the size of the `axis` dimension(s)).
    use_running_average: True to normalize with the stored statistics (evaluation); False
      (the default, as in flax) for batch statistics and an update of `mean`/`var`.
    axis: the feature axis (or a tuple of them, merged into one channel axis).
    momentum: `new = momentum * old + (1 - momentum) * batch`; None for the cumulative
      average over all batches, which adds a `count` BatchStat (the number of batches
      averaged). A flax state has no `count`: after `nnx.update(bn, nnx.state(flax_bn))` the
      count stays 0, so set `bn.count[...] = n` (the number of batches the loaded mean and var
      average) before training, or the first batch replaces them.
    epsilon: added to the variance.
    dtype: computation and output dtype (default: promoted from the input and parameters).
    param_dtype: dtype of `scale` and `bias`.
    use_bias, use_scale: create `bias` / `scale`.
    bias_init, scale_init: their initializers.
    axis_name: mapped axis (`nnx.vmap`, `nnx.pmap`, shard_map) the batch is split over.
    axis_index_groups: device groups along `axis_name` that share statistics.
    use_fast_variance: accepted for compatibility, ignored (the variance is always stable).
    promote_dtype: `fn((x, mean, var, scale, bias), dtype=...)` as in flax.
    unbiased_running_var: store the unbiased `n / (n - 1)` batch variance (PyTorch).
    virtual_batch_size: ghost batch norm in training: groups of this many consecutive
      examples along axis 0 are normalized separately (`normjax.batch_norm`).
    record_health: on every call, sow `normjax.norm_health` of the input, per channel (over
      every axis but `axis`: its fractions count channels), as an `nnx.Intermediate` named
      `norm_health`, which `nnx.capture(model, nnx.Intermediate)` collects (see
      `LayerNorm`). False (the default) adds nothing to the program.
    rngs: the `nnx.Rngs` the parameters are drawn from.
    bias_metadata, scale_metadata: metadata of the `nnx.Param`s.

  Example:
    >>> import jax, jax.numpy as jnp, normjax.nnx as njnnx
    >>> from flax import nnx
    >>> bn = njnnx.BatchNorm(3, momentum=0.9, rngs=nnx.Rngs(0))
    >>> y = bn(jnp.arange(12.0).reshape(4, 3))      # training mode: updates mean and var
    >>> bn.mean[...].round(4)                       # 0.9 * 0 + 0.1 * batch mean
    Array([0.45, 0.55, 0.65], dtype=float32)
    >>> bn.eval()
    >>> y = bn(jnp.arange(12.0).reshape(4, 3))      # uses the stored statistics
  """

  if TYPE_CHECKING:  # the constructor's options, set by `_store_options`
    axis: int | tuple[int, ...]
    momentum: float | None
    epsilon: float
    dtype: Dtype | None
    axis_name: str | None
    axis_index_groups: Any
    promote_dtype: Any
    unbiased_running_var: bool
    virtual_batch_size: int | None
    record_health: bool

  def __init__(self, num_features: int, *, use_running_average: bool | None = False,
               axis: int | tuple[int, ...] = -1, momentum: float | None = 0.99,
               epsilon: float = 1e-5, dtype: Dtype | None = None,
               param_dtype: Dtype = jnp.float32, use_bias: bool = True, use_scale: bool = True,
               bias_init: Initializer = initializers.zeros_init(),
               scale_init: Initializer = initializers.ones_init(), axis_name: str | None = None,
               axis_index_groups: Any = None, use_fast_variance: bool = True,
               promote_dtype: Any = _flax.promote_dtype, unbiased_running_var: bool = False,
               virtual_batch_size: int | None = None, record_health: bool = False,
               rngs: nnx.Rngs, bias_metadata: Any = _NO_METADATA,
               scale_metadata: Any = _NO_METADATA):
    num_features = _flax.check_num_features(num_features)
    self.mean = nnx.BatchStat(jnp.zeros((num_features,), jnp.float32))
    self.var = nnx.BatchStat(jnp.ones((num_features,), jnp.float32))
    if momentum is None:
      self.count = nnx.BatchStat(jnp.zeros((), jnp.int32))
    self.scale = _param(use_scale, scale_init, rngs, (num_features,), param_dtype, scale_metadata)
    self.bias = _param(use_bias, bias_init, rngs, (num_features,), param_dtype, bias_metadata)
    _store_options(self, locals())

  def __call__(self, x: jax.Array, use_running_average: bool | None = None, *,
               mask: jax.Array | None = None) -> jax.Array:
    """Normalizes `x`; in training mode updates `mean`, `var` (and `count`).

    Args:
      x: floating input.
      use_running_average: overrides the attribute for this call.
      mask: optional bool array broadcastable to `x`; True elements enter the statistics.
    """
    use_running_average = first_from(
        use_running_average, self.use_running_average,
        error_msg="No use_running_average was given to BatchNorm: pass it to the constructor, "
                  "to the call, or set it with model.train() / model.eval().")
    use_running_average = _flax.check_use_running_average(use_running_average)
    _sow_health(self, _flax.batch_health, x, axis=self.axis, eps=self.epsilon, mask=mask)
    x, mean, var, scale, bias = self.promote_dtype(
        (_flax.check_input(x), self.mean[...], self.var[...], _value(self.scale),
         _value(self.bias)), dtype=self.dtype)
    train = not use_running_average
    count = self.count[...] if self.momentum is None else jnp.zeros((), jnp.int32)
    stats = BatchStats(self.mean[...], self.var[...], count) if train else BatchStats(mean, var,
                                                                                       count)
    y, new = _flax.batch_norm(
        x, scale, bias, stats, axis=self.axis, dtype=self.dtype, mask=mask, train=train,
        momentum=self.momentum, eps=self.epsilon, axis_name=self.axis_name,
        axis_index_groups=self.axis_index_groups, unbiased_running_var=self.unbiased_running_var,
        virtual_batch_size=self.virtual_batch_size)
    if train:
      self.mean[...], self.var[...] = new.mean, new.var
      if self.momentum is None:
        self.count[...] = new.count
    return y

  def set_view(self, use_running_average: bool | None = None):
    """Used by `nnx.view(model, use_running_average=...)` (and described by `nnx.view_info`).

    Args:
      use_running_average: if True, the stored batch statistics are used instead of the
        statistics of the input (evaluation); False for training; None leaves it unchanged.
    """
    if use_running_average is not None:
      self.use_running_average = use_running_average



class BatchRenorm(nnx.Module):
  """Batch renormalization (`normjax.batch_renorm`, Ioffe 2017) as an NNX module.

  Constructed as `BatchNorm` (without `momentum=None`, `unbiased_running_var` and
  `virtual_batch_size`) plus `r_max`, `d_max` and `warmup_steps`; holds `nnx.BatchStat`s
  `mean`, `var` and `count` (int32, the training steps so far, which drives the warmup).

  Example:
    >>> import jax.numpy as jnp, normjax.nnx as njnnx
    >>> from flax import nnx
    >>> brn = njnnx.BatchRenorm(3, warmup_steps=10, rngs=nnx.Rngs(0))
    >>> y = brn(jnp.arange(12.0).reshape(4, 3))      # training mode
    >>> int(brn.count[...])
    1
  """

  if TYPE_CHECKING:  # the constructor's options, set by `_store_options`
    axis: int | tuple[int, ...]
    momentum: float
    epsilon: float
    dtype: Dtype | None
    axis_name: str | None
    axis_index_groups: Any
    promote_dtype: Any
    r_max: Any
    d_max: Any
    warmup_steps: Any

  def __init__(self, num_features: int, *, use_running_average: bool | None = False,
               axis: int | tuple[int, ...] = -1, momentum: float = 0.99,
               epsilon: float = 1e-5, dtype: Dtype | None = None,
               param_dtype: Dtype = jnp.float32, use_bias: bool = True, use_scale: bool = True,
               bias_init: Initializer = initializers.zeros_init(),
               scale_init: Initializer = initializers.ones_init(), axis_name: str | None = None,
               axis_index_groups: Any = None, use_fast_variance: bool = True,
               promote_dtype: Any = _flax.promote_dtype, r_max: Any = 3.0, d_max: Any = 5.0,
               warmup_steps: Any = 0, rngs: nnx.Rngs, bias_metadata: Any = _NO_METADATA,
               scale_metadata: Any = _NO_METADATA):
    num_features = _flax.check_num_features(num_features)
    self.mean = nnx.BatchStat(jnp.zeros((num_features,), jnp.float32))
    self.var = nnx.BatchStat(jnp.ones((num_features,), jnp.float32))
    self.count = nnx.BatchStat(jnp.zeros((), jnp.int32))
    self.scale = _param(use_scale, scale_init, rngs, (num_features,), param_dtype, scale_metadata)
    self.bias = _param(use_bias, bias_init, rngs, (num_features,), param_dtype, bias_metadata)
    _store_options(self, locals())

  def __call__(self, x: jax.Array, use_running_average: bool | None = None, *,
               mask: jax.Array | None = None) -> jax.Array:
    """Normalizes `x`; in training mode updates `mean`, `var` and `count`.

    Args:
      x: floating input.
      use_running_average: overrides the attribute for this call.
      mask: optional bool array broadcastable to `x`; True elements enter the statistics.
    """
    use_running_average = first_from(
        use_running_average, self.use_running_average,
        error_msg="No use_running_average was given to BatchRenorm: pass it to the "
                  "constructor, to the call, or set it with model.train() / model.eval().")
    use_running_average = _flax.check_use_running_average(use_running_average)
    x, mean, var, scale, bias = self.promote_dtype(
        (_flax.check_input(x), self.mean[...], self.var[...], _value(self.scale),
         _value(self.bias)), dtype=self.dtype)
    train = not use_running_average
    stats = (BatchStats(self.mean[...], self.var[...], self.count[...]) if train
             else BatchStats(mean, var, self.count[...]))
    y, new = _flax.batch_renorm(
        x, scale, bias, stats, axis=self.axis, dtype=self.dtype, mask=mask, train=train,
        momentum=self.momentum, eps=self.epsilon, r_max=self.r_max, d_max=self.d_max,
        warmup_steps=self.warmup_steps, axis_name=self.axis_name,
        axis_index_groups=self.axis_index_groups)
    if train:
      self.mean[...], self.var[...], self.count[...] = new.mean, new.var, new.count
    return y

  def set_view(self, use_running_average: bool | None = None):
    """Used by `nnx.view(model, use_running_average=...)`: True for evaluation."""
    if use_running_average is not None:
      self.use_running_average = use_running_average


class LayerNorm(nnx.Module):
  """Layer normalization (`normjax.layer_norm`) with `flax.nnx.LayerNorm`'s interface.

  `scale` and `bias` have `num_features` values, laid out over `feature_axes` (which need not
  be among `reduction_axes`: `reduction_axes=(1, 2), feature_axes=-1` is an instance norm).

  Args:
    num_features: the number of values in `scale` / `bias` (the size of the feature axes).
    epsilon: added to the variance (default 1e-6).
    dtype, param_dtype, use_bias, use_scale, bias_init, scale_init: as in `BatchNorm`.
    reduction_axes: the axes normalized over.
    feature_axes: the axes `scale` and `bias` vary along.
    axis_name: a mapped axis that is itself one of the normalized axes (sharded features).
    axis_index_groups: not supported (must be None).
    use_fast_variance: accepted for compatibility, ignored.
    promote_dtype: `fn((x, scale, bias), dtype=...)` as in flax.
    scale_offset: a Python float added to `scale` (in float32): `y = xhat * (scale_offset +
      scale) + bias`. The zero-centered scale of Gemma and Qwen3-Next is `scale_offset=1.0`
      with `scale_init=nnx.initializers.zeros` (the default initializer stays ones: give the
      zeros yourself). Needs `use_scale`.
    record_health: on every call, sow `normjax.norm_health` of the input over
      `reduction_axes` (its fractions count the normalized rows) as an `nnx.Intermediate`
      named `norm_health`, which `nnx.capture(model, nnx.Intermediate)` collects (a tuple,
      one `NormHealth` per call). False (the default) adds nothing to the program.
    rngs, bias_metadata, scale_metadata: as in `BatchNorm`.

  Example:
    >>> import jax.numpy as jnp, normjax.nnx as njnnx
    >>> from flax import nnx
    >>> njnnx.LayerNorm(3, epsilon=0.0, rngs=nnx.Rngs(0))(jnp.array([[1.0, 2.0, 3.0]])).round(4)
    Array([[-1.2247,  0.    ,  1.2247]], dtype=float32)

    Recording the input's health (a training step returns what `nnx.capture` collects, and
    the loop logs it):

    >>> ln = njnnx.LayerNorm(2, record_health=True, rngs=nnx.Rngs(0))
    >>> x = jnp.array([[1.0, 2.0], [5.0, 5.0]])                 # the second row is constant
    >>> y, intermediates = nnx.capture(ln, nnx.Intermediate)(x)
    >>> float(intermediates["norm_health"][0].constant)
    0.5
  """

  if TYPE_CHECKING:  # the constructor's options, set by `_store_options`
    epsilon: float
    dtype: Dtype | None
    reduction_axes: Axes
    feature_axes: Axes
    axis_name: str | None
    promote_dtype: Any
    scale_offset: float
    record_health: bool

  def __init__(self, num_features: int, *, epsilon: float = 1e-6, dtype: Dtype | None = None,
               param_dtype: Dtype = jnp.float32, use_bias: bool = True, use_scale: bool = True,
               bias_init: Initializer = initializers.zeros_init(),
               scale_init: Initializer = initializers.ones_init(), reduction_axes: Axes = -1,
               feature_axes: Axes = -1, axis_name: str | None = None,
               axis_index_groups: Any = None, use_fast_variance: bool = True,
               promote_dtype: Any = _flax.promote_dtype, scale_offset: float = 0.0,
               record_health: bool = False, rngs: nnx.Rngs,
               bias_metadata: Any = _NO_METADATA, scale_metadata: Any = _NO_METADATA):
    num_features = _flax.check_num_features(num_features)
    _flax.no_index_groups(axis_index_groups, "LayerNorm")
    self.scale = _param(use_scale, scale_init, rngs, (num_features,), param_dtype, scale_metadata)
    self.bias = _param(use_bias, bias_init, rngs, (num_features,), param_dtype, bias_metadata)
    _store_options(self, locals())

  def __call__(self, x: jax.Array, *, mask: jax.Array | None = None) -> jax.Array:
    """Normalizes `x`; `mask` (bool, broadcastable to `x`) selects what enters the statistics."""
    _sow_health(self, _flax.norm_health, x, reduction_axes=self.reduction_axes,
                eps=self.epsilon, mask=mask)
    x, scale, bias = self.promote_dtype(
        (_flax.check_input(x), _value(self.scale), _value(self.bias)), dtype=self.dtype)
    return _flax.layer_norm(x, scale, bias, reduction_axes=self.reduction_axes,
                            feature_axes=self.feature_axes, dtype=self.dtype, mask=mask,
                            eps=self.epsilon, axis_name=self.axis_name,
                            scale_offset=self.scale_offset)


class RMSNorm(nnx.Module):
  """RMS normalization (`normjax.rms_norm`) with `flax.nnx.RMSNorm`'s interface (no bias).

  Args:
    num_features: the number of values in `scale`.
    epsilon: added to the mean square (default 1e-6).
    dtype, param_dtype, use_scale, scale_init: as in `BatchNorm`.
    reduction_axes, feature_axes, axis_name, axis_index_groups: as in `LayerNorm`.
    use_fast_variance: accepted for compatibility, ignored.
    promote_dtype: `fn((x, scale), dtype=...)` as in flax.
    scale_offset: as in `LayerNorm`: `y = x * rsqrt(mean(x**2) + epsilon) * (scale_offset +
      scale)`; Gemma's RMSNorm is `RMSNorm(C, scale_offset=1.0,
      scale_init=nnx.initializers.zeros, rngs=rngs)` (the default initializer stays ones).
    record_health: as in `LayerNorm` (the health of the rows' mean and variance, as
      `normjax.norm_health` takes them).
    rngs, scale_metadata: as in `BatchNorm`.

  Example:
    >>> import jax.numpy as jnp, normjax.nnx as njnnx
    >>> from flax import nnx
    >>> njnnx.RMSNorm(2, epsilon=0.0, rngs=nnx.Rngs(0))(jnp.array([[3.0, -3.0]]))
    Array([[ 1., -1.]], dtype=float32)

    Gemma's zero-centered scale: `scale` starts at zeros and the factor applied is `1 + scale`.

    >>> gemma = njnnx.RMSNorm(2, epsilon=0.0, scale_offset=1.0,
    ...                       scale_init=nnx.initializers.zeros, rngs=nnx.Rngs(0))
    >>> gemma.scale[...], gemma(jnp.array([[3.0, -3.0]]))
    (Array([0., 0.], dtype=float32), Array([[ 1., -1.]], dtype=float32))
  """

  if TYPE_CHECKING:  # the constructor's options, set by `_store_options`
    epsilon: float
    dtype: Dtype | None
    reduction_axes: Axes
    feature_axes: Axes
    axis_name: str | None
    promote_dtype: Any
    scale_offset: float
    record_health: bool

  def __init__(self, num_features: int, *, epsilon: float = 1e-6, dtype: Dtype | None = None,
               param_dtype: Dtype = jnp.float32, use_scale: bool = True,
               scale_init: Initializer = initializers.ones, reduction_axes: Axes = -1,
               feature_axes: Axes = -1, axis_name: str | None = None,
               axis_index_groups: Any = None, use_fast_variance: bool = True,
               promote_dtype: Any = _flax.promote_dtype, scale_offset: float = 0.0,
               record_health: bool = False, rngs: nnx.Rngs,
               scale_metadata: Any = _NO_METADATA):
    num_features = _flax.check_num_features(num_features)
    _flax.no_index_groups(axis_index_groups, "RMSNorm")
    self.scale = _param(use_scale, scale_init, rngs, (num_features,), param_dtype, scale_metadata)
    _store_options(self, locals())

  def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Normalizes `x`; `mask` (bool, broadcastable to `x`) selects what enters the statistics."""
    _sow_health(self, _flax.norm_health, x, reduction_axes=self.reduction_axes,
                eps=self.epsilon, mask=mask)
    x, scale = self.promote_dtype((_flax.check_input(x), _value(self.scale)), dtype=self.dtype)
    return _flax.layer_norm(x, scale, None, reduction_axes=self.reduction_axes,
                            feature_axes=self.feature_axes, dtype=self.dtype, mask=mask,
                            centered=False, eps=self.epsilon, axis_name=self.axis_name,
                            scale_offset=self.scale_offset)


class AddLayerNorm(LayerNorm):
  """`LayerNorm` of the residual sum: `__call__(x, residual) -> (y, h)` with `h = x +
  residual` and `y` the layer norm of `h` (`normjax.add_layer_norm`). Same constructor and
  variables as `LayerNorm` (`scale_offset` included; `record_health` sows the health of `h`).

  Example:
    >>> import jax.numpy as jnp, normjax.nnx as njnnx
    >>> from flax import nnx
    >>> norm = njnnx.AddLayerNorm(3, epsilon=0.0, rngs=nnx.Rngs(0))
    >>> y, h = norm(jnp.array([[1.0, 2.0, 3.0]]), jnp.array([[0.0, 1.0, 2.0]]))
    >>> h, y.round(4)
    (Array([[1., 3., 5.]], dtype=float32), Array([[-1.2247,  0.    ,  1.2247]], dtype=float32))
  """

  def __call__(self, x: jax.Array,  # type: ignore[override]
               residual: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`(y, h)`: the normalized sum and the sum (`residual` of `x`'s shape and dtype)."""
    x = _flax.check_input(x)
    residual = _flax.check_residual(residual, x)
    x, residual, scale, bias = self.promote_dtype(
        (x, residual, _value(self.scale), _value(self.bias)), dtype=self.dtype)
    y, h = _flax.add_layer_norm(x, residual, scale, bias, reduction_axes=self.reduction_axes,
                                feature_axes=self.feature_axes, dtype=self.dtype,
                                eps=self.epsilon, axis_name=self.axis_name,
                                scale_offset=self.scale_offset)
    _sow_health(self, _flax.norm_health, h, reduction_axes=self.reduction_axes,
                eps=self.epsilon)
    return y, h


class AddRMSNorm(RMSNorm):
  """`RMSNorm` of the residual sum: `__call__(x, residual) -> (y, h)`, as `AddLayerNorm`.

  Example:
    >>> import jax.numpy as jnp, normjax.nnx as njnnx
    >>> from flax import nnx
    >>> norm = njnnx.AddRMSNorm(2, epsilon=0.0, rngs=nnx.Rngs(0))
    >>> y, h = norm(jnp.array([[3.0, -1.0]]), jnp.array([[-2.0, 0.0]]))   # rms(h) = 1
    >>> h, y.round(4)
    (Array([[ 1., -1.]], dtype=float32), Array([[ 1., -1.]], dtype=float32))
  """

  def __call__(self, x: jax.Array,  # type: ignore[override]
               residual: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`(y, h)`: the normalized sum and the sum (`residual` of `x`'s shape and dtype)."""
    x = _flax.check_input(x)
    residual = _flax.check_residual(residual, x)
    x, residual, scale = self.promote_dtype((x, residual, _value(self.scale)), dtype=self.dtype)
    y, h = _flax.add_layer_norm(x, residual, scale, None, reduction_axes=self.reduction_axes,
                                feature_axes=self.feature_axes, dtype=self.dtype,
                                centered=False, eps=self.epsilon, axis_name=self.axis_name,
                                scale_offset=self.scale_offset)
    _sow_health(self, _flax.norm_health, h, reduction_axes=self.reduction_axes,
                eps=self.epsilon)
    return y, h


class InstanceNorm(nnx.Module):
  """Instance normalization (`normjax.instance_norm`) with `flax.nnx.InstanceNorm`'s interface.

  Axis 0 is the batch axis; statistics per example and feature over every other axis.
  `feature_axes=1` is the channels-first (`NC...`) layout.

  Args:
    num_features: the number of channels.
    epsilon: added to the variance (default 1e-6).
    dtype, param_dtype, use_bias, use_scale, bias_init, scale_init: as in `BatchNorm`.
    feature_axes: the channel axis (or several, merged into one).
    axis_name: a mapped axis that is one of the reduced (spatial) axes.
    axis_index_groups: not supported (must be None).
    use_fast_variance: accepted for compatibility, ignored.
    promote_dtype: `fn((x, scale, bias), dtype=...)` as in flax.
    rngs, bias_metadata, scale_metadata: as in `BatchNorm`.

  Example:
    >>> import jax.numpy as jnp, normjax.nnx as njnnx
    >>> from flax import nnx
    >>> inorm = njnnx.InstanceNorm(1, epsilon=0.0, rngs=nnx.Rngs(0))
    >>> inorm(jnp.array([[[0.0], [2.0]]]))[..., 0]      # [N=1, L=2, C=1]
    Array([[-1.,  1.]], dtype=float32)
  """

  if TYPE_CHECKING:  # the constructor's options, set by `_store_options`
    epsilon: float
    dtype: Dtype | None
    feature_axes: Axes
    axis_name: str | None
    promote_dtype: Any

  def __init__(self, num_features: int, *, epsilon: float = 1e-6, dtype: Dtype | None = None,
               param_dtype: Dtype = jnp.float32, use_bias: bool = True, use_scale: bool = True,
               bias_init: Initializer = initializers.zeros,
               scale_init: Initializer = initializers.ones, feature_axes: Axes = -1,
               axis_name: str | None = None, axis_index_groups: Any = None,
               use_fast_variance: bool = True, promote_dtype: Any = _flax.promote_dtype,
               rngs: nnx.Rngs, bias_metadata: Any = _NO_METADATA,
               scale_metadata: Any = _NO_METADATA):
    num_features = _flax.check_num_features(num_features)
    _flax.no_index_groups(axis_index_groups, "InstanceNorm")
    self.scale = _param(use_scale, scale_init, rngs, (num_features,), param_dtype, scale_metadata)
    self.bias = _param(use_bias, bias_init, rngs, (num_features,), param_dtype, bias_metadata)
    _store_options(self, locals())

  def __call__(self, x: jax.Array, *, mask: jax.Array | None = None) -> jax.Array:
    """Normalizes `x`; `mask` (bool, broadcastable to `x`) selects what enters the statistics."""
    x, scale, bias = self.promote_dtype(
        (_flax.check_input(x), _value(self.scale), _value(self.bias)), dtype=self.dtype)
    return _flax.instance_norm(x, scale, bias, feature_axes=self.feature_axes, dtype=self.dtype,
                               mask=mask, eps=self.epsilon, axis_name=self.axis_name)


class GroupNorm(nnx.Module):
  """Group normalization (`normjax.group_norm`) with `flax.nnx.GroupNorm`'s interface.

  As in flax, `num_groups` defaults to 32: pass `num_groups=None` to give `group_size`; both
  are checked against `num_features` at construction, with `normjax.group_norm`'s errors.

  Args:
    num_features: the number of channels.
    num_groups: the number of channel groups (default 32).
    group_size: the number of channels per group (give exactly one of the two).
    epsilon: added to the variance (default 1e-6).
    dtype, param_dtype, use_bias, use_scale, bias_init, scale_init: as in `BatchNorm`.
    reduction_axes: the axes normalized over, including the channel axis; None for every axis
      but 0. Axes not listed are per-example (batch-like) axes.
    axis_name: a mapped axis that is one of the reduced (spatial) axes.
    axis_index_groups: not supported (must be None).
    use_fast_variance: accepted for compatibility, ignored.
    promote_dtype: `fn((x, scale, bias), dtype=...)` as in flax.
    feature_axis: the channel axis, -1 as in flax; 1 for channels-first (`NC...`) input.
    rngs, bias_metadata, scale_metadata: as in `BatchNorm`.

  Example:
    >>> import jax.numpy as jnp, normjax.nnx as njnnx
    >>> from flax import nnx
    >>> gn = njnnx.GroupNorm(4, num_groups=2, epsilon=0.0, rngs=nnx.Rngs(0))
    >>> gn(jnp.array([[0.0, 2.0, 10.0, 14.0]]))
    Array([[-1.,  1., -1.,  1.]], dtype=float32)
  """

  if TYPE_CHECKING:  # the constructor's options, set by `_store_options`
    num_features: int
    num_groups: int | None
    epsilon: float
    dtype: Dtype | None
    reduction_axes: Axes | None
    axis_name: str | None
    promote_dtype: Any
    feature_axis: int

  def __init__(self, num_features: int, num_groups: int | None = 32,
               group_size: int | None = None, *, epsilon: float = 1e-6,
               dtype: Dtype | None = None, param_dtype: Dtype = jnp.float32,
               use_bias: bool = True, use_scale: bool = True,
               bias_init: Initializer = initializers.zeros_init(),
               scale_init: Initializer = initializers.ones_init(),
               reduction_axes: Axes | None = None, axis_name: str | None = None,
               axis_index_groups: Any = None, use_fast_variance: bool = True,
               promote_dtype: Any = _flax.promote_dtype, feature_axis: int = -1,
               rngs: nnx.Rngs, bias_metadata: Any = _NO_METADATA,
               scale_metadata: Any = _NO_METADATA):
    num_features = _flax.check_num_features(num_features)
    _flax.no_index_groups(axis_index_groups, "GroupNorm")
    group_size = _flax.check_group_size(num_features, num_groups, group_size)
    num_groups = num_features // group_size
    self.scale = _param(use_scale, scale_init, rngs, (num_features,), param_dtype, scale_metadata)
    self.bias = _param(use_bias, bias_init, rngs, (num_features,), param_dtype, bias_metadata)
    _store_options(self, locals())

  def __call__(self, x: jax.Array, *, mask: jax.Array | None = None) -> jax.Array:
    """Normalizes `x`; `mask` (bool, broadcastable to `x`) selects what enters the statistics."""
    x, scale, bias = self.promote_dtype(
        (_flax.check_input(x), _value(self.scale), _value(self.bias)), dtype=self.dtype)
    # Checked here, not only through the scale's shape: without scale and bias, `num_groups`
    # alone would split another channel count into groups of another size.
    _flax.check_channels(x, self.feature_axis, self.num_features)
    return _flax.group_norm(x, scale, bias, reduction_axes=self.reduction_axes,
                            feature_axis=self.feature_axis, dtype=self.dtype, mask=mask,
                            num_groups=self.num_groups, eps=self.epsilon,
                            axis_name=self.axis_name)


class FilterResponseNorm(nnx.Module):
  """Filter response normalization + TLU (`normjax.filter_response_norm`); see
  `normjax.linen.FilterResponseNorm` for the options. Params `scale`, `bias`, `tau` (`[C]`)
  and, with `learned_epsilon`, a scalar `eps` (`eps = epsilon + |eps|`).

  Example:
    >>> import jax.numpy as jnp, normjax.nnx as njnnx
    >>> from flax import nnx
    >>> frn = njnnx.FilterResponseNorm(1, epsilon=0.0, rngs=nnx.Rngs(0))
    >>> frn(jnp.array([[[2.0], [-2.0]]]))[..., 0]
    Array([[1., 0.]], dtype=float32)
  """

  if TYPE_CHECKING:  # the constructor's options, set by `_store_options`
    epsilon: float
    learned_epsilon: bool
    dtype: Dtype | None
    feature_axis: int
    promote_dtype: Any

  def __init__(self, num_features: int, *, epsilon: float = 1e-6, learned_epsilon: bool = False,
               dtype: Dtype | None = None, param_dtype: Dtype = jnp.float32,
               use_bias: bool = True, use_scale: bool = True, use_tau: bool = True,
               bias_init: Initializer = initializers.zeros_init(),
               scale_init: Initializer = initializers.ones_init(),
               tau_init: Initializer = initializers.zeros_init(),
               epsilon_init: Initializer = initializers.constant(1e-4), feature_axis: int = -1,
               promote_dtype: Any = _flax.promote_dtype, rngs: nnx.Rngs):
    num_features = _flax.check_num_features(num_features)
    shape = (num_features,)
    self.scale = _param(use_scale, scale_init, rngs, shape, param_dtype, _NO_METADATA)
    self.bias = _param(use_bias, bias_init, rngs, shape, param_dtype, _NO_METADATA)
    self.tau = _param(use_tau, tau_init, rngs, shape, param_dtype, _NO_METADATA)
    self.eps = _param(learned_epsilon, epsilon_init, rngs, (), param_dtype, _NO_METADATA)
    _store_options(self, {k: v for k, v in locals().items()
                          if k not in ("tau_init", "epsilon_init", "shape")})

  def __call__(self, x: jax.Array, *, mask: jax.Array | None = None) -> jax.Array:
    """Normalizes `x`; `mask` (bool, broadcastable to `x`) selects what enters `mean(x**2)`."""
    x, scale, bias, tau = self.promote_dtype(
        (_flax.check_input(x), _value(self.scale), _value(self.bias), _value(self.tau)),
        dtype=self.dtype)
    eps: float | jax.Array = self.epsilon
    if self.learned_epsilon:
      eps = eps + jnp.abs(self.eps[...])
    return _flax.filter_response_norm(x, scale, bias, tau, channel_axis=self.feature_axis,
                                      eps=eps, dtype=self.dtype, mask=mask)


class AdaptiveLayerNorm(nnx.Module):
  """Adaptive layer norm with a zero-initialised modulation (adaLN-Zero, DiT); see
  `normjax.linen.AdaptiveLayerNorm` for what it computes.

  `__call__(x, cond)` with `x` of shape `[B, ..., num_features]` and `cond` of shape
  `[B, cond_features]`: `silu(cond)` (as DiT) goes through the `nnx.Linear` named
  `modulation` (`kernel` `(cond_features, n * num_features)`, `bias` `(n * num_features,)`,
  n = 3 with the gate, else 2; both initialised to zeros), whose output is split in DiT's
  `chunk` order into `shift`, `scale` and `gate`, each reshaped to `[B, 1, ..., 1,
  num_features]`; `y = layer_norm(x) * (1 + scale) + shift`. Returns `(y, gate)` with
  `use_gate`, else `y`. At initialisation `y` is the plain layer norm and `gate` is 0.

  Args:
    num_features: the size of `x`'s last axis.
    cond_features: the size of the conditioning vector.
    epsilon: added to the variance (DiT's 1e-6).
    use_gate: also compute and return a `gate`.
    dtype: computation dtype of the Linear and output dtype of `y` (default: promoted).
    param_dtype: dtype of the Linear's parameters.
    rngs: the `nnx.Rngs` the Linear draws its (zero) parameters from.

  Example:
    >>> import jax.numpy as jnp, normjax as nj, normjax.nnx as njnnx
    >>> from flax import nnx
    >>> ada = njnnx.AdaptiveLayerNorm(4, 5, rngs=nnx.Rngs(0))
    >>> ada.modulation.kernel.shape
    (5, 12)
    >>> x, cond = jnp.arange(24.0).reshape(2, 3, 4), jnp.ones((2, 5))
    >>> y, gate = ada(x, cond)                                   # at init: layer_norm(x), 0
    >>> bool(jnp.allclose(y, nj.layer_norm(x, eps=1e-6))), gate.shape, float(abs(gate).max())
    (True, (2, 1, 4), 0.0)
  """

  if TYPE_CHECKING:  # the constructor's options, set by `_store_options`
    num_features: int
    cond_features: int
    epsilon: float
    use_gate: bool
    dtype: Dtype | None

  def __init__(self, num_features: int, cond_features: int, *, epsilon: float = 1e-6,
               use_gate: bool = True, dtype: Dtype | None = None,
               param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
    self.modulation = _zero_linear(cond_features,
                                   _flax.modulation_features(num_features, use_gate), dtype,
                                   param_dtype, rngs)
    _store_options(self, locals())

  def __call__(self, x: jax.Array, cond: jax.Array, *, mask: jax.Array | None = None) -> Any:
    """`(y, gate)` with `use_gate`, else `y`; `mask` (bool, broadcastable to `x`) selects
    what enters the statistics."""
    return _flax.adaptive_layer_norm(x, cond, self._modulation, use_gate=self.use_gate,
                                     dtype=self.dtype, eps=self.epsilon, mask=mask,
                                     num_features=self.num_features,
                                     cond_features=self.cond_features)

  def _modulation(self, h: jax.Array, features: int) -> jax.Array:
    del features  # the Linear was made with them
    return self.modulation(h)


class AdaptiveGroupNorm(nnx.Module):
  """Adaptive group norm (AdaGN), channels-last; see `normjax.linen.AdaptiveGroupNorm`.

  `__call__(x, cond)`: `silu(cond)` through the zero-initialised `nnx.Linear` `modulation`
  (`(cond_features, 2 * num_features)`), split into `shift`, `scale` (that order) of shape
  `[B, 1, ..., 1, num_features]`; returns `group_norm(x) * (1 + scale) + shift`.

  Args:
    num_features: the number of channels (the size of `x`'s last axis).
    cond_features: the size of the conditioning vector.
    num_groups: the number of channel groups (default 32, as `GroupNorm`).
    group_size: the number of channels per group (give exactly one of the two).
    epsilon: added to the variance (default 1e-5).
    dtype, param_dtype, rngs: as in `AdaptiveLayerNorm`.

  Example:
    >>> import jax.numpy as jnp, normjax.nnx as njnnx
    >>> from flax import nnx
    >>> agn = njnnx.AdaptiveGroupNorm(8, 16, num_groups=4, rngs=nnx.Rngs(0))
    >>> agn(jnp.ones((2, 4, 4, 8)), jnp.ones((2, 16))).shape
    (2, 4, 4, 8)
  """

  if TYPE_CHECKING:  # the constructor's options, set by `_store_options`
    num_features: int
    cond_features: int
    num_groups: int
    epsilon: float
    dtype: Dtype | None

  def __init__(self, num_features: int, cond_features: int, *, num_groups: int | None = 32,
               group_size: int | None = None, epsilon: float = 1e-5,
               dtype: Dtype | None = None, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
    features = _flax.modulation_features(num_features, False)
    num_groups = num_features // _flax.check_group_size(num_features, num_groups, group_size)
    self.modulation = _zero_linear(cond_features, features, dtype, param_dtype, rngs)
    _store_options(self, {k: v for k, v in locals().items() if k not in ("features",
                                                                          "group_size")})

  def __call__(self, x: jax.Array, cond: jax.Array, *,
               mask: jax.Array | None = None) -> jax.Array:
    """The modulated group norm of `x`; `mask` (bool, broadcastable to `x`) selects what
    enters the statistics."""
    return _flax.adaptive_group_norm(x, cond, self._modulation, dtype=self.dtype,
                                     num_groups=self.num_groups, group_size=None,
                                     eps=self.epsilon, mask=mask,
                                     num_features=self.num_features,
                                     cond_features=self.cond_features)

  def _modulation(self, h: jax.Array, features: int) -> jax.Array:
    del features  # the Linear was made with them
    return self.modulation(h)


def _zero_linear(cond_features: int, features: int, dtype: Dtype | None, param_dtype: Dtype,
                 rngs: nnx.Rngs) -> nnx.Linear:
  """The adaptive modules' `modulation` Linear, zero-initialised (adaLN-Zero)."""
  return nnx.Linear(_flax.check_cond_features(cond_features), features, dtype=dtype,
                    param_dtype=param_dtype, kernel_init=initializers.zeros_init(),
                    bias_init=initializers.zeros_init(),
                    # The same-length tuple flax's PromoteDtypeFn types as its TupleArg.
                    promote_dtype=_flax.promote_dtype,  # type: ignore[arg-type]
                    rngs=rngs)


class DynamicTanh(nnx.Module):
  """Dynamic tanh (`normjax.dynamic_tanh`; Zhu et al., 2025): `tanh(alpha * x) * scale + bias`
  over the last axis; see `normjax.linen.DynamicTanh`.

  Params: `alpha` (a scalar, `alpha_init`), `scale` (ones) and `bias` (zeros) of shape
  `(num_features,)`.

  Args:
    num_features: the size of `x`'s last axis.
    alpha_init: the initial `alpha` (the paper's 0.5).
    dtype: output dtype (default: promoted from the input and the parameters).
    param_dtype: dtype of the parameters.
    promote_dtype: `fn((x, alpha, scale, bias), dtype=...)` as the other modules'.
    rngs: the `nnx.Rngs` (one key drawn per parameter, as flax's initializers do).

  Example:
    >>> import jax.numpy as jnp, normjax.nnx as njnnx
    >>> from flax import nnx
    >>> dyt = njnnx.DynamicTanh(3, rngs=nnx.Rngs(0))
    >>> float(dyt.alpha[...]), dyt(jnp.array([[0.0, 100.0, -100.0]]))
    (0.5, Array([[ 0.,  1., -1.]], dtype=float32))
  """

  if TYPE_CHECKING:  # the constructor's options, set by `_store_options`
    dtype: Dtype | None
    promote_dtype: Any

  def __init__(self, num_features: int, *, alpha_init: float = 0.5, dtype: Dtype | None = None,
               param_dtype: Dtype = jnp.float32, promote_dtype: Any = _flax.promote_dtype,
               rngs: nnx.Rngs):
    num_features = _flax.check_num_features(num_features)
    self.alpha = _param(True, initializers.constant(alpha_init), rngs, (), param_dtype,
                        _NO_METADATA)
    self.scale = _param(True, initializers.ones_init(), rngs, (num_features,), param_dtype,
                        _NO_METADATA)
    self.bias = _param(True, initializers.zeros_init(), rngs, (num_features,), param_dtype,
                       _NO_METADATA)
    _store_options(self, locals())

  def __call__(self, x: jax.Array) -> jax.Array:
    """`tanh(alpha * x) * scale + bias` over the last axis."""
    x, alpha, scale, bias = self.promote_dtype(
        (_flax.check_input(x), self.alpha[...], self.scale[...], self.bias[...]),
        dtype=self.dtype)
    return _flax.dynamic_tanh(x, alpha, scale, bias, dtype=self.dtype)


class _StandardizedConv:
  """`conv_general_dilated` with its kernel (`rhs`) weight-standardized over the fan-in."""

  def __init__(self, conv: Any, eps: float):
    self.conv, self.eps = conv, eps

  def __call__(self, lhs, rhs, *args, **kwargs):
    return self.conv(lhs, _weights.weight_standardize(rhs, eps=self.eps), *args, **kwargs)


class WSConv(nnx.Conv):
  """`flax.nnx.Conv` whose kernel is weight-standardized (`normjax.weight_standardize`) over
  its fan-in on every call; same arguments and variables (the stored `kernel` is the raw one),
  plus `ws_epsilon`. Pair it with `GroupNorm`, as the paper recommends.

  Example:
    >>> import jax.numpy as jnp, normjax.nnx as njnnx
    >>> from flax import nnx
    >>> conv = njnnx.WSConv(3, 8, (3, 3), rngs=nnx.Rngs(0))
    >>> gn = njnnx.GroupNorm(8, num_groups=4, rngs=nnx.Rngs(0))
    >>> gn(conv(jnp.ones((2, 5, 5, 3)))).shape
    (2, 5, 5, 8)
  """

  def __init__(self, *args: Any, ws_epsilon: float = 1e-5, **kwargs: Any):
    super().__init__(*args, **kwargs)
    self.ws_epsilon = ws_epsilon
    self.conv_general_dilated = _StandardizedConv(self.conv_general_dilated, ws_epsilon)


class WeightNorm(nnx.WeightNorm):
  """`flax.nnx.WeightNorm` (same arguments, variables and in-place behaviour) computed by
  `normjax.weight_norm`.

  Example:
    >>> import jax.numpy as jnp, normjax.nnx as njnnx
    >>> from flax import nnx
    >>> layer = njnnx.WeightNorm(nnx.Linear(2, 3, rngs=nnx.Rngs(0)), rngs=nnx.Rngs(1))
    >>> layer(jnp.ones((1, 2))).shape
    (1, 3)
  """

  def _weightnorm_inplace(self, path: Any, param: Any) -> None:
    if not self.variable_filter(path, param):
      return
    value = param[...]
    feature_axes = _flax.feature_axes(self.feature_axes, value.ndim, "feature_axes")
    reduction = tuple(a for a in range(value.ndim) if a not in feature_axes)
    g = None
    if self.use_scale:
      assert self.scales is not None  # flax's WeightNorm makes them when use_scale
      if path not in self.scales:
        raise RuntimeError(f"WeightNorm: no scale for the param {path}; the parameters of the "
                           f"wrapped layer must not change after construction.")
      g = jnp.reshape(self.scales[path], [value.shape[a] for a in feature_axes])
    dtype = _flax.result_dtype(value, g, dtype=self.dtype)
    compute = _flax.result_dtype(value, g)
    y = _weights.weight_norm(value.astype(compute), None if g is None else g.astype(compute),
                             axis=reduction, eps=self.epsilon)
    param.set_value(y.astype(dtype))


class SpectralNorm(nnx.SpectralNorm):
  """`flax.nnx.SpectralNorm` (same arguments, `batch_stats` and in-place behaviour) computed by
  `normjax.spectral_normalize`; as in flax, the power iteration runs on every call and
  `update_stats` decides whether `u` and `sigma` are stored.

  Example:
    >>> import jax.numpy as jnp, normjax.nnx as njnnx
    >>> from flax import nnx
    >>> layer = njnnx.SpectralNorm(nnx.Linear(2, 3, rngs=nnx.Rngs(0)), rngs=nnx.Rngs(1))
    >>> layer(jnp.ones((1, 2))).shape
    (1, 3)
  """

  def _spectral_normalize_inplace(self, path: Any, orig_param: Any, update_stats: bool) -> None:
    value = orig_param[...]
    if value.ndim <= 1 or self.n_steps < 1:
      return
    if value.ndim > 2 and self.error_on_non_matrix:
      raise ValueError(f"SpectralNorm: Input is {value.ndim}D but error_on_non_matrix is True: "
                       f"the parameter {path} has shape {tuple(value.shape)}; expected a matrix "
                       f"(rank 2).")
    path_u, path_sigma = path + ("u",), path + ("sigma",)
    if path_u not in self.batch_stats or path_sigma not in self.batch_stats:
      raise RuntimeError(f"SpectralNorm: no u/sigma batch stat for the param {path}; the "
                         f"parameters of the wrapped layer must not change after construction.")
    out = value.shape[-1]
    u, sigma = self.batch_stats[path_u], self.batch_stats[path_sigma]
    state = _state.SpectralState(u=u[...].reshape(out), sigma=sigma[...])
    value_bar, new = _weights.spectral_normalize(value, state, train=True, n_steps=self.n_steps,
                                                 eps=self.epsilon)
    if update_stats:
      u[...], sigma[...] = new.u.reshape(1, out), new.sigma
    orig_param[...] = value_bar.astype(_flax.result_dtype(value, new.u, new.sigma,
                                                          dtype=self.dtype))
