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

Layers of today's models, which flax lacks: `scale_offset` on `LayerNorm`/`RMSNorm` (and the
add-norms; Gemma's zero-centered `1 + scale`), `AdaptiveLayerNorm` (adaLN-Zero, DiT),
`AdaptiveGroupNorm` (AdaGN) and `DynamicTanh`. `record_health=True` on `LayerNorm`, `RMSNorm`
(and the add-norms) and `BatchNorm` sows `normjax.norm_health` of the input into
`intermediates`; a training step returns it for the loop to log:

    >>> import jax, jax.numpy as jnp, optax, normjax.linen as njnn
    >>> model = njnn.LayerNorm(record_health=True)
    >>> x = jnp.array([[1.0, 2.0, 4.0], [3.0, 3.0, 3.0]])     # one row of two is constant
    >>> params = model.init(jax.random.key(0), x)["params"]
    >>> opt = optax.sgd(0.1)
    >>> @jax.jit
    ... def train_step(params, opt_state, x):
    ...   def loss(params):
    ...     y, state = model.apply({"params": params}, x, mutable=["intermediates"])
    ...     return jnp.sum(y[:, 0] ** 2), state["intermediates"]["norm_health"][0]
    ...   (value, health), grads = jax.value_and_grad(loss, has_aux=True)(params)
    ...   updates, opt_state = opt.update(grads, opt_state)
    ...   return optax.apply_updates(params, updates), opt_state, health
    >>> opt_state = opt.init(params)
    >>> for step in range(2):
    ...   params, opt_state, health = train_step(params, opt_state, x)
    ...   print(step, {k: round(float(v), 2) for k, v in health._asdict().items()})
    0 {'ill_conditioned': 0.0, 'eps_dominated': 0.5, 'constant': 0.5, 'nonfinite': 0.0}
    1 {'ill_conditioned': 0.0, 'eps_dominated': 0.5, 'constant': 0.5, 'nonfinite': 0.0}
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.typing import Axes
from flax.typing import Dtype
from flax.typing import Initializer
from jax.nn import initializers

from normjax._src import flax_adapter as _flax
from normjax._src import state as _state
from normjax._src import weights as _weights
from normjax._src.state import BatchStats

__all__ = ("AdaptiveGroupNorm", "AdaptiveLayerNorm", "AddLayerNorm", "AddRMSNorm", "BatchNorm",
           "BatchRenorm", "DynamicTanh", "FilterResponseNorm", "GroupNorm", "InstanceNorm",
           "LayerNorm", "RMSNorm", "SpectralNorm", "WSConv", "WeightNorm")


def _affine(module: nn.Module, shape: tuple[int, ...], bias: bool = True):
  """Creates `scale` then `bias` (flax's order, so random initializers draw the same keys)."""
  m = module
  scale = m.param("scale", m.scale_init, shape, m.param_dtype) if m.use_scale else None
  if not bias:
    return scale
  return scale, (m.param("bias", m.bias_init, shape, m.param_dtype) if m.use_bias else None)


def _sow_health(module: nn.Module, health: Any, *args: Any, **kwargs: Any) -> None:
  """With `record_health`, sows `health(*args, **kwargs)` (a `NormHealth`) into
  `intermediates` under `norm_health` when that collection is mutable; not during `init`, so
  that the variables `init` returns hold no diagnostics to be carried into `apply`."""
  if (module.record_health and not module.is_initializing()
      and module.is_mutable_collection("intermediates")):
    module.sow("intermediates", "norm_health", health(*args, **kwargs))


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
    virtual_batch_size: ghost batch norm in training: groups of this many consecutive
      examples along axis 0 are normalized separately (`normjax.batch_norm`).
    record_health: sow `normjax.norm_health` of the input, per channel (over every axis but
      the feature axes: its fractions count channels), into the `intermediates` collection
      as `norm_health` on every `apply` that makes `intermediates` mutable (not in `init`).
      False (the default) adds nothing to the program.

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
  virtual_batch_size: int | None = None
  record_health: bool = False

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
    use_running_average = _flax.check_use_running_average(nn.merge_param(
        "use_running_average", self.use_running_average, use_running_average))
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
      assert self.scope is not None  # a bound module's call
      where = "".join(f"[{k!r}]" for k in ("batch_stats", *self.scope.path, "count"))
      raise ValueError(
          "BatchNorm(momentum=None) averages over all batches so far, counted by "
          "batch_stats/count, which these variables lack (flax's BatchNorm does not make it); "
          "got batch_stats with " + ", ".join(sorted(self.variables.get("batch_stats", {})))
          + f". Add it before training: variables{where} = jnp.asarray(n, jnp.int32), n the "
          "number of batches the loaded mean and var average (0 restarts the average: the "
          "first batch replaces them).")
    scale, bias = _affine(self, shape)
    _sow_health(self, _flax.batch_health, x, axis=self.axis, eps=self.epsilon, mask=mask)
    stats = BatchStats(mean.value, var.value,
                       jnp.zeros((), jnp.int32) if count is None else count.value)
    y, new = _flax.batch_norm(
        x, scale, bias, stats, axis=self.axis, dtype=self.dtype, mask=mask,
        train=not use_running_average, momentum=self.momentum, eps=self.epsilon,
        axis_name=None if init else self.axis_name,
        axis_index_groups=None if init else self.axis_index_groups,
        unbiased_running_var=self.unbiased_running_var,
        virtual_batch_size=None if init else self.virtual_batch_size)
    if update:
      mean.value, var.value = new.mean, new.var
      if count is not None:
        count.value = new.count
    return y


class BatchRenorm(nn.Module):
  """Batch renormalization (`normjax.batch_renorm`, Ioffe 2017) as a linen module.

  Attributes are `BatchNorm`'s (without `momentum=None`, `unbiased_running_var`,
  `virtual_batch_size`) plus `r_max`, `d_max` and `warmup_steps`. `batch_stats` holds `mean`,
  `var` and `count` (int32, the training steps so far, which drives the warmup). As flax's
  `BatchNorm`, `init` normalizes with plain batch statistics and updates nothing.

  Loading sbx's `BatchRenorm` (`sbx.common.jax_layers`, widely copied): its `batch_stats` hold
  `mean`, `var`, `r_max`, `d_max` and `steps`. Such variables load unchanged: `steps` is used
  as the count (and written back, incremented, in training), and the stored `r_max`/`d_max`
  replace the attributes. Its attributes map as `use_running_average`, `axis`, `momentum`,
  `epsilon` (same names; sbx's default epsilon is 1e-3) and `warm_up_steps` ->
  `warmup_steps` (sbx's default 100_000). The normalization differs from sbx's in where `eps`
  enters: sbx normalizes `x` with the corrected statistics `var_B / r**2` and
  `mu_B - d * sqrt(var_B) / r` and then adds `eps` to that variance, i.e.
  `y = (x - mu_B + d * sqrt(var_B) / r) / sqrt(var_B / r**2 + eps)`, which equals the paper's
  `(x - mu_B) / sigma_B * r + d` (ours, with `sigma_B = sqrt(var_B + eps)`) only as
  `eps -> 0`: to first order in `eps`, sbx's output minus ours is
  `-eps / (2 var_B) * (r (r**2 - 1) (x - mu_B) / sigma_B + r**2 d) * scale`. Both compute the
  same `r`, `d` (with `sqrt(var + eps)`), running statistics, warmup and evaluation, so on
  sbx's variables the two agree to float32 rounding (1e-5 over several training steps, tested
  against a re-implementation of sbx's arithmetic in tests/sbx_batch_renorm.py) when `eps` is
  negligible next to `var_B`, in warmup and in evaluation; with sbx's default `eps=1e-3` on
  unit-scale data past warmup (`var_B` 1.7-2.5, `r` 1.2-1.6, `d` 1.5-2.4) the outputs
  differ by up to 1.8e-3 (4e-4 of the largest output), as that formula predicts. sbx's
  batch variance is also flax's one-pass one by default.

  Example:
    >>> import jax, jax.numpy as jnp, normjax.linen as njnn
    >>> x = jax.random.normal(jax.random.key(0), (8, 3))
    >>> brn = njnn.BatchRenorm(momentum=0.9, warmup_steps=10)
    >>> variables = brn.init(jax.random.key(1), x, use_running_average=False)
    >>> y, updates = brn.apply(variables, x, use_running_average=False, mutable=["batch_stats"])
    >>> int(updates["batch_stats"]["count"])
    1
  """
  use_running_average: bool | None = None
  axis: int | tuple[int, ...] = -1
  momentum: float = 0.99
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
  r_max: Any = 3.0
  d_max: Any = 5.0
  warmup_steps: Any = 0

  @nn.compact
  def __call__(self, x: jax.Array, use_running_average: bool | None = None, *,
               mask: jax.Array | None = None) -> jax.Array:
    """Normalizes `x`; in training (not during `init`) updates `batch_stats` (mutable).

    Args:
      x: floating input.
      use_running_average: True for the stored statistics; here or as the attribute.
      mask: optional bool array broadcastable to `x`; True elements enter the statistics.
    """
    use_running_average = _flax.check_use_running_average(nn.merge_param(
        "use_running_average", self.use_running_average, use_running_average))
    feature_axes = _flax.feature_axes(self.axis, jnp.ndim(x), "axis")
    shape = tuple(jnp.shape(x)[a] for a in feature_axes)
    stats_dtype = jnp.float32 if self.force_float32_reductions else self.param_dtype
    mean = self.variable("batch_stats", "mean", jnp.zeros, shape, stats_dtype)
    var = self.variable("batch_stats", "var", jnp.ones, shape, stats_dtype)
    sbx = self.has_variable("batch_stats", "steps")   # variables made by sbx's BatchRenorm
    count = self.variable("batch_stats", "steps" if sbx else "count", jnp.zeros, (), jnp.int32)
    r_max, d_max = self.r_max, self.d_max
    if sbx and self.has_variable("batch_stats", "r_max"):
      r_max = self.get_variable("batch_stats", "r_max")
    if sbx and self.has_variable("batch_stats", "d_max"):
      d_max = self.get_variable("batch_stats", "d_max")
    init = self.is_initializing()
    update = not use_running_average and not init
    scale, bias = _affine(self, shape)
    stats = BatchStats(mean.value, var.value, jnp.asarray(count.value, jnp.int32))
    y, new = _flax.batch_renorm(
        x, scale, bias, stats, axis=self.axis, dtype=self.dtype, mask=mask,
        train=not use_running_average, momentum=self.momentum, eps=self.epsilon,
        r_max=None if init else r_max, d_max=d_max, warmup_steps=self.warmup_steps,
        axis_name=None if init else self.axis_name,
        axis_index_groups=None if init else self.axis_index_groups)
    if update:
      mean.value, var.value, count.value = new.mean, new.var, new.count
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
    scale_offset: a Python float added to `scale` (in float32): `y = xhat * (scale_offset +
      scale) + bias`. The zero-centered scale of Gemma and Qwen3-Next is `scale_offset=1.0`
      with `scale_init=nn.initializers.zeros` (the default initializer stays ones: give the
      zeros yourself). Needs `use_scale`.
    record_health: sow `normjax.norm_health` of the input over `reduction_axes` (its
      fractions count the normalized rows) into the `intermediates` collection as
      `norm_health` on every `apply` that makes `intermediates` mutable (not in `init`).
      False (the default) adds nothing to the program.

  Example:
    >>> import jax, jax.numpy as jnp, normjax.linen as njnn
    >>> x = jnp.array([[1.0, 2.0, 3.0]])
    >>> ln = njnn.LayerNorm(epsilon=0.0)
    >>> ln.apply(ln.init(jax.random.key(0), x), x).round(4)
    Array([[-1.2247,  0.    ,  1.2247]], dtype=float32)

    Recording the input's health during training (`intermediates` made mutable):

    >>> ln = njnn.LayerNorm(record_health=True)
    >>> x = jnp.array([[1.0, 2.0], [5.0, 5.0]])                 # the second row is constant
    >>> y, state = ln.apply(ln.init(jax.random.key(0), x), x, mutable=["intermediates"])
    >>> float(state["intermediates"]["norm_health"][0].constant)
    0.5
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
  scale_offset: float = 0.0
  record_health: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, *, mask: jax.Array | None = None) -> jax.Array:
    """Normalizes `x`; `mask` (bool, broadcastable to `x`) selects what enters the statistics."""
    _flax.no_index_groups(self.axis_index_groups, "LayerNorm")
    feature_axes = _flax.feature_axes(self.feature_axes, jnp.ndim(x), "feature_axes")
    scale, bias = _affine(self, tuple(jnp.shape(x)[a] for a in feature_axes))
    _sow_health(self, _flax.norm_health, x, reduction_axes=self.reduction_axes,
                eps=self.epsilon, mask=mask)
    return _flax.layer_norm(x, scale, bias, reduction_axes=self.reduction_axes,
                            feature_axes=self.feature_axes, dtype=self.dtype, mask=mask,
                            eps=self.epsilon, axis_name=self.axis_name,
                            scale_offset=self.scale_offset)


class RMSNorm(nn.Module):
  """RMS normalization (`normjax.rms_norm`) with `flax.linen.RMSNorm`'s interface.

  `x * rsqrt(mean(x**2) + epsilon) * scale` over `reduction_axes`; no bias.

  Attributes:
    epsilon: added to the mean square (default 1e-6).
    dtype, param_dtype, use_scale, scale_init: as in `BatchNorm`.
    reduction_axes, feature_axes, axis_name, axis_index_groups: as in `LayerNorm`.
    use_fast_variance, force_float32_reductions: accepted for compatibility, ignored.
    scale_offset: as in `LayerNorm`: `y = x * rsqrt(mean(x**2) + epsilon) * (scale_offset +
      scale)`; Gemma's RMSNorm is `RMSNorm(scale_offset=1.0,
      scale_init=nn.initializers.zeros)` (the default initializer stays ones).
    record_health: as in `LayerNorm` (the health of the rows' mean and variance, as
      `normjax.norm_health` takes them).

  Example:
    >>> import jax, jax.numpy as jnp, normjax.linen as njnn
    >>> x = jnp.array([[3.0, -3.0]])
    >>> rms = njnn.RMSNorm(epsilon=0.0)
    >>> rms.apply(rms.init(jax.random.key(0), x), x)
    Array([[ 1., -1.]], dtype=float32)

    Gemma's zero-centered scale: `scale` starts at zeros and the factor applied is `1 + scale`.

    >>> import flax.linen as nn
    >>> gemma = njnn.RMSNorm(epsilon=0.0, scale_offset=1.0, scale_init=nn.initializers.zeros)
    >>> variables = gemma.init(jax.random.key(0), x)
    >>> variables["params"]["scale"], gemma.apply(variables, x)
    (Array([0., 0.], dtype=float32), Array([[ 1., -1.]], dtype=float32))
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
  scale_offset: float = 0.0
  record_health: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, *, mask: jax.Array | None = None) -> jax.Array:
    """Normalizes `x`; `mask` (bool, broadcastable to `x`) selects what enters the statistics."""
    _flax.no_index_groups(self.axis_index_groups, "RMSNorm")
    feature_axes = _flax.feature_axes(self.feature_axes, jnp.ndim(x), "feature_axes")
    scale = _affine(self, tuple(jnp.shape(x)[a] for a in feature_axes), bias=False)
    _sow_health(self, _flax.norm_health, x, reduction_axes=self.reduction_axes,
                eps=self.epsilon, mask=mask)
    return _flax.layer_norm(x, scale, None, reduction_axes=self.reduction_axes,
                            feature_axes=self.feature_axes, dtype=self.dtype, mask=mask,
                            centered=False, eps=self.epsilon, axis_name=self.axis_name,
                            scale_offset=self.scale_offset)


class AddLayerNorm(LayerNorm):
  """`LayerNorm` of the residual sum: `__call__(x, residual) -> (y, h)` with `h = x +
  residual` and `y = LayerNorm(...)(h)` (`normjax.add_layer_norm`: one pass on the native
  kernels). Same attributes and variables as `LayerNorm` (`scale_offset` included;
  `record_health` sows the health of `h`).

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
    >>> import jax, jax.numpy as jnp, normjax.linen as njnn
    >>> x, r = jnp.array([[3.0, -1.0]]), jnp.array([[-2.0, 0.0]])
    >>> norm = njnn.AddRMSNorm(epsilon=0.0)
    >>> y, h = norm.apply(norm.init(jax.random.key(0), x, r), x, r)   # rms(h) = 1
    >>> h, y.round(4)
    (Array([[ 1., -1.]], dtype=float32), Array([[ 1., -1.]], dtype=float32))
  """

  @nn.compact
  def __call__(self, x: jax.Array,  # type: ignore[override]
               residual: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`(y, h)`: the normalized sum and the sum (`residual` of `x`'s shape and dtype)."""
    _flax.no_index_groups(self.axis_index_groups, "AddRMSNorm")
    feature_axes = _flax.feature_axes(self.feature_axes, jnp.ndim(x), "feature_axes")
    scale = _affine(self, tuple(jnp.shape(x)[a] for a in feature_axes), bias=False)
    y, h = _flax.add_layer_norm(x, residual, scale, None, reduction_axes=self.reduction_axes,
                                feature_axes=self.feature_axes, dtype=self.dtype,
                                centered=False, eps=self.epsilon, axis_name=self.axis_name,
                                scale_offset=self.scale_offset)
    _sow_health(self, _flax.norm_health, h, reduction_axes=self.reduction_axes,
                eps=self.epsilon)
    return y, h


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


class FilterResponseNorm(nn.Module):
  """Filter response normalization + TLU (`normjax.filter_response_norm`; Singh & Krishnan, 2019).

  `y = max(x * rsqrt(mean(x**2) + eps) * scale + bias, tau)`, the mean per example and channel
  over the spatial axes. Axis 0 is the batch axis.

  Attributes:
    epsilon: the fixed `eps` (default 1e-6); with `learned_epsilon`, its lower bound.
    learned_epsilon: learn `eps = epsilon + |eps_l|` (param `eps`, a scalar), as the paper
      does for `1x1` feature maps.
    dtype, param_dtype, use_bias, use_scale, bias_init, scale_init: as in `BatchNorm`.
    use_tau: apply the TLU with a learned `[C]` threshold `tau`.
    tau_init: initializer of `tau` (zeros: a ReLU at the start).
    epsilon_init: initializer of `eps` (1e-4, as in the paper).
    feature_axis: the channel axis, -1 (NHWC); 1 for channels-first input.

  Example:
    >>> import jax, jax.numpy as jnp, normjax.linen as njnn
    >>> x = jnp.array([[[2.0], [-2.0]]])                # [N=1, L=2, C=1]
    >>> frn = njnn.FilterResponseNorm(epsilon=0.0)
    >>> variables = frn.init(jax.random.key(0), x)
    >>> sorted(variables["params"])
    ['bias', 'scale', 'tau']
    >>> frn.apply(variables, x)[..., 0]
    Array([[1., 0.]], dtype=float32)
  """
  epsilon: float = 1e-6
  learned_epsilon: bool = False
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  use_bias: bool = True
  use_scale: bool = True
  use_tau: bool = True
  bias_init: Initializer = initializers.zeros
  scale_init: Initializer = initializers.ones
  tau_init: Initializer = initializers.zeros
  epsilon_init: Initializer = initializers.constant(1e-4)
  feature_axis: int = -1

  @nn.compact
  def __call__(self, x: jax.Array, *, mask: jax.Array | None = None) -> jax.Array:
    """Normalizes `x`; `mask` (bool, broadcastable to `x`) selects what enters `mean(x**2)`."""
    axis = _flax.feature_axes(self.feature_axis, jnp.ndim(x), "feature_axis")
    shape = (jnp.shape(x)[axis[0]],)
    scale, bias = _affine(self, shape)
    tau = self.param("tau", self.tau_init, shape, self.param_dtype) if self.use_tau else None
    eps: float | jax.Array = self.epsilon
    if self.learned_epsilon:
      eps = eps + jnp.abs(self.param("eps", self.epsilon_init, (), self.param_dtype))
    return _flax.filter_response_norm(x, scale, bias, tau, channel_axis=self.feature_axis,
                                      eps=eps, dtype=self.dtype, mask=mask)


class AdaptiveLayerNorm(nn.Module):
  """Adaptive layer norm with a zero-initialised modulation (adaLN-Zero, DiT; Peebles & Xie,
  2023): `normjax.adaptive_layer_norm` with per-example `shift`, `scale` (and `gate`)
  computed from a conditioning vector.

  `__call__(x, cond)` with `x` of shape `[B, ..., D]` and `cond` of shape
  `[B, cond_features]` (a timestep and class embedding): as DiT, `cond` goes through
  `silu`, then a Dense layer named `modulation` (params `modulation/kernel` of shape
  `(cond_features, n * D)` and `modulation/bias` of `(n * D,)`, n = 3 with the gate, else 2),
  whose output is split, in DiT's `chunk` order, into `shift`, `scale` and `gate`, each
  `[B, D]` and reshaped to `[B, 1, ..., 1, D]` (x's rank, broadcast over the middle axes).
  Then `y = layer_norm(x) * (1 + scale) + shift` over the last axis, with no affine
  parameters of its own. The Dense is initialised to zeros (kernel and bias), so at
  initialisation `y` is the plain layer norm of `x` and `gate` is 0: a residual branch
  `x + gate * f(y)` starts as the identity.

  Attributes:
    epsilon: added to the variance (DiT's 1e-6).
    use_gate: also compute a `gate` and return `(y, gate)`; False returns `y` (adaLN).
    dtype: computation dtype of the Dense and output dtype of `y` (default: promoted from `x`
      and the modulation).
    param_dtype: dtype of the Dense's parameters.

  Example:
    >>> import jax, jax.numpy as jnp, normjax as nj, normjax.linen as njnn
    >>> x, cond = jnp.arange(24.0).reshape(2, 3, 4), jnp.ones((2, 5))   # [B, T, D], [B, C]
    >>> ada = njnn.AdaptiveLayerNorm()
    >>> variables = ada.init(jax.random.key(0), x, cond)
    >>> jax.tree.map(jnp.shape, variables["params"])
    {'modulation': {'bias': (12,), 'kernel': (5, 12)}}
    >>> y, gate = ada.apply(variables, x, cond)                 # at init: layer_norm(x), 0
    >>> bool(jnp.allclose(y, nj.layer_norm(x, eps=1e-6))), gate.shape, float(abs(gate).max())
    (True, (2, 1, 4), 0.0)
  """
  epsilon: float = 1e-6
  use_gate: bool = True
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, cond: jax.Array, *,
               mask: jax.Array | None = None) -> Any:
    """`(y, gate)` with `use_gate`, else `y`; `mask` (bool, broadcastable to `x`) selects
    what enters the statistics."""
    return _flax.adaptive_layer_norm(x, cond, self._modulation, use_gate=self.use_gate,
                                     dtype=self.dtype, eps=self.epsilon, mask=mask)

  def _modulation(self, h: jax.Array, features: int) -> jax.Array:
    return _zero_dense(self, features)(h)


class AdaptiveGroupNorm(nn.Module):
  """Adaptive group norm (AdaGN, the diffusion U-Nets' scale-shift norm):
  `normjax.adaptive_group_norm` with per-example `shift` and `scale` from a conditioning
  vector, channels-last (`[B, ..., C]`, batch axis 0).

  As `AdaptiveLayerNorm` without the gate: `silu(cond)` through a zero-initialised Dense
  named `modulation` (`(cond_features, 2 * C)`), split into `shift`, `scale` (that order)
  reshaped to `[B, 1, ..., 1, C]`; `y = group_norm(x) * (1 + scale) + shift`, which at
  initialisation is the group norm of `x` without affine parameters.

  Attributes:
    num_groups: the number of channel groups (default 32, as `GroupNorm`).
    group_size: the number of channels per group (give exactly one of the two).
    epsilon: added to the variance (default 1e-5).
    dtype, param_dtype: as in `AdaptiveLayerNorm`.

  Example:
    >>> import jax, jax.numpy as jnp, normjax.linen as njnn
    >>> x, cond = jnp.ones((2, 4, 4, 8)), jnp.ones((2, 16))   # NHWC, [B, cond_features]
    >>> agn = njnn.AdaptiveGroupNorm(num_groups=4)
    >>> variables = agn.init(jax.random.key(0), x, cond)
    >>> variables["params"]["modulation"]["kernel"].shape, agn.apply(variables, x, cond).shape
    ((16, 16), (2, 4, 4, 8))
  """
  num_groups: int | None = 32
  group_size: int | None = None
  epsilon: float = 1e-5
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, cond: jax.Array, *,
               mask: jax.Array | None = None) -> jax.Array:
    """The modulated group norm of `x`; `mask` (bool, broadcastable to `x`) selects what
    enters the statistics."""
    return _flax.adaptive_group_norm(x, cond, self._modulation, dtype=self.dtype,
                                     num_groups=self.num_groups, group_size=self.group_size,
                                     eps=self.epsilon, mask=mask)

  def _modulation(self, h: jax.Array, features: int) -> jax.Array:
    return _zero_dense(self, features)(h)


def _zero_dense(module: Any, features: int) -> nn.Dense:
  """The adaptive modules' `modulation` Dense, zero-initialised (adaLN-Zero)."""
  return nn.Dense(features, dtype=module.dtype, param_dtype=module.param_dtype,
                  kernel_init=initializers.zeros, bias_init=initializers.zeros,
                  promote_dtype=_flax.linen_promote_dtype, name="modulation")


class DynamicTanh(nn.Module):
  """Dynamic tanh (`normjax.dynamic_tanh`; Zhu et al., 2025, "Transformers without
  Normalization"): `tanh(alpha * x) * scale + bias`, a drop-in for a `LayerNorm` over the last
  axis, without statistics.

  Params: `alpha` (a scalar, initialised to `alpha_init`), `scale` (ones) and `bias` (zeros)
  of shape `(D,)`, `D` the size of `x`'s last axis, as in the paper.

  Attributes:
    alpha_init: the initial `alpha` (the paper's 0.5; it suggests smaller values for wider
      or deeper models).
    dtype: output dtype (default: promoted from the input and the parameters).
    param_dtype: dtype of `alpha`, `scale` and `bias`.

  Example:
    >>> import jax, jax.numpy as jnp, normjax.linen as njnn
    >>> x = jnp.array([[0.0, 100.0, -100.0]])
    >>> dyt = njnn.DynamicTanh()
    >>> variables = dyt.init(jax.random.key(0), x)
    >>> jax.tree.map(jnp.shape, variables["params"])
    {'alpha': (), 'bias': (3,), 'scale': (3,)}
    >>> dyt.apply(variables, x)                             # tanh(0.5 * x)
    Array([[ 0.,  1., -1.]], dtype=float32)
  """
  alpha_init: float = 0.5
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """`tanh(alpha * x) * scale + bias` over the last axis."""
    shape = tuple(jnp.shape(x)[a] for a in _flax.feature_axes(-1, jnp.ndim(x), "axis"))
    alpha = self.param("alpha", initializers.constant(self.alpha_init), (), self.param_dtype)
    scale = self.param("scale", initializers.ones, shape, self.param_dtype)
    bias = self.param("bias", initializers.zeros, shape, self.param_dtype)
    return _flax.dynamic_tanh(x, alpha, scale, bias, dtype=self.dtype)


class WSConv(nn.Conv):
  """`flax.linen.Conv` whose kernel is weight-standardized (`normjax.weight_standardize`;
  Qiao et al., 2019) over its fan-in (every axis but the last) on every call.

  The attributes and variables are `flax.linen.Conv`'s (the stored `kernel` is the raw one),
  plus `ws_epsilon`. The paper pairs it with group normalization of the activations.

  Attributes:
    ws_epsilon: added to the kernel's variance (default 1e-5).

  Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, normjax.linen as njnn
    >>> block = nn.Sequential([njnn.WSConv(8, (3, 3)), njnn.GroupNorm(num_groups=4), nn.relu])
    >>> x = jnp.ones((2, 5, 5, 3))
    >>> variables = block.init(jax.random.key(0), x)
    >>> block.apply(variables, x).shape
    (2, 5, 5, 8)
  """
  ws_epsilon: float = 1e-5

  def param(self, name: str, init_fn: Any, *init_args: Any, **init_kwargs: Any) -> Any:
    """`flax.linen.Module.param`; the `kernel` comes back standardized."""
    value = super().param(name, init_fn, *init_args, **init_kwargs)
    if name != "kernel":
      return value
    return _weights.weight_standardize(value, eps=self.ws_epsilon)


class WeightNorm(nn.WeightNorm):
  """`flax.linen.WeightNorm` (same attributes, variables and call) computed by
  `normjax.weight_norm`: each selected variable `v` of the wrapped layer is used as
  `scale * v / sqrt(sum(v**2) + epsilon)`, the sum over every axis but `feature_axes`.

  Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, normjax.linen as njnn
    >>> layer = njnn.WeightNorm(nn.Dense(3))
    >>> variables = layer.init(jax.random.key(0), jnp.ones((1, 2)))
    >>> jax.tree.map(jnp.shape, variables["params"])
    {'layer_instance': {'bias': (3,), 'kernel': (2, 3)}, 'layer_instance/kernel/scale': (3,)}
  """

  def _l2_normalize(self, path: Any, vs: Any) -> jax.Array:
    value = jnp.asarray(vs)
    assert self.layer_instance.name is not None  # bound: flax has named the wrapped layer
    str_path = (self.layer_instance.name + "/"
                + jax.tree_util.keystr(path[1:], simple=True, separator="/"))
    if self.variable_filter and not any(f in str_path for f in self.variable_filter):
      return value
    feature_axes: tuple[int, ...] = ()
    if self.feature_axes is not None:
      feature_axes = _flax.feature_axes(self.feature_axes, value.ndim, "feature_axes")
    reduction = tuple(a for a in range(value.ndim) if a not in feature_axes)
    scale = None
    if self.use_scale:
      scale = self.param(str_path + "/scale", self.scale_init,
                         [value.shape[a] for a in feature_axes], self.param_dtype)
    dtype = _flax.result_dtype(vs, scale, dtype=self.dtype)
    compute = _flax.result_dtype(value, scale)
    g = None if scale is None else scale.astype(compute)
    return _weights.weight_norm(value.astype(compute), g, axis=reduction,
                                eps=self.epsilon).astype(dtype)


class SpectralNorm(nn.SpectralNorm):
  """`flax.linen.SpectralNorm` (same attributes, variables, collection and call) computed by
  `normjax.spectral_normalize`.

  As in flax, every call runs `n_steps` power iterations from the stored `u` and divides by
  the resulting `sigma`; `update_stats=True` stores the new `u` (`[1, C_out]`, flax's shape)
  and `sigma`. Variables of rank <= 1 are used unchanged.

  Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, normjax.linen as njnn
    >>> layer = njnn.SpectralNorm(nn.Dense(3), n_steps=2)
    >>> variables = layer.init(jax.random.key(0), jnp.ones((1, 2)), update_stats=False)
    >>> jax.tree.map(jnp.shape, variables["batch_stats"])
    {'layer_instance/kernel/sigma': (), 'layer_instance/kernel/u': (1, 3)}
    >>> y, updates = layer.apply(variables, jnp.ones((1, 2)), update_stats=True,
    ...                          mutable=["batch_stats"])
  """

  def _spectral_normalize(self, path: Any, vs: Any, update_stats: bool) -> jax.Array:
    value = jnp.asarray(vs)
    if value.ndim <= 1 or self.n_steps < 1:
      return value
    if value.ndim > 2 and self.error_on_non_matrix:
      # "Input is {n}D but error_on_non_matrix is True" is flax's wording (its tests match it).
      raise ValueError(f"SpectralNorm: Input is {value.ndim}D but error_on_non_matrix is True: "
                       f"the parameter {jax.tree_util.keystr(path)} has shape "
                       f"{tuple(value.shape)}; expected a matrix (rank 2).")
    assert self.layer_instance.name is not None  # bound: flax has named the wrapped layer
    name = self.layer_instance.name + "/" + "/".join(k.key for k in path[1:])
    out = value.shape[-1]
    u = self.variable(self.collection_name, name + "/u", jax.random.normal,
                      self.make_rng("params") if not self.has_variable(self.collection_name,
                                                                       name + "/u") else None,
                      (1, out), self.param_dtype)
    sigma = self.variable(self.collection_name, name + "/sigma", jnp.ones, (), self.param_dtype)
    state = _state.SpectralState(u=u.value.reshape(out), sigma=sigma.value)
    value_bar, new = _weights.spectral_normalize(value, state, train=True, n_steps=self.n_steps,
                                                 eps=self.epsilon)
    if update_stats:
      u.value, sigma.value = new.u.reshape(1, out), new.sigma
    return value_bar.astype(_flax.result_dtype(vs, new.u, new.sigma, dtype=self.dtype))
