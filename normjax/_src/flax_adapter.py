"""Layout and dtype translation shared by the Flax wrappers (`normjax.linen`, `normjax.nnx`).

Flax describes a normalization by its reduction axes and feature axes (the axes the learned
scale and bias vary along); normjax's functions by `axis` / `channel_axis` / `batch_axis`, with
parameters of the variant's feature shape. Each function here turns the first description into
one call of a normjax function, using only reshapes, transposes, broadcasts, `vmap`s and dtype
casts (and, for the adaptive modules, DiT's `silu` of the conditioning vector before their Dense
layer). No statistic is computed here: the maths stays in `normjax._src.numerics`.

Dtypes follow flax: the output has `dtype` if given, else the promoted dtype of the input and
the parameters; statistics are computed in at least float32 from the input (cast up to the
output dtype when that is wider, so a bfloat16 input with float32 parameters is normalized in
float32 and returned in float32, as flax does).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from collections.abc import Sequence
from typing import Any
from typing import overload

import jax
import jax.numpy as jnp
import numpy as np

from normjax._src import adaptive
from normjax._src import batch
from normjax._src import checks
from normjax._src import dispatch
from normjax._src import group
from normjax._src import health
from normjax._src import layer
from normjax._src import response
from normjax._src import tanh
from normjax._src.health import NormHealth
from normjax._src.state import BatchStats


def result_dtype(*args: Any, dtype: Any = None) -> jnp.dtype:
  """flax's `canonicalize_dtype`: `dtype` if given, else the promoted dtype of `args`.

  `args` are arrays or dtypes (None is skipped). The lookup ignores the user's
  `jax_numpy_dtype_promotion` setting, which governs implicit promotion in arithmetic, not
  this explicit choice of an output dtype.
  """
  if dtype is not None:
    if not jnp.issubdtype(dtype, jnp.floating):
      # flax raises for integer and bool dtypes too ("Dtype must be inexact"); the output
      # would be truncated otherwise.
      raise ValueError(f"dtype must be a floating dtype (float16, bfloat16, float32, float64) "
                       f"or None; got dtype={jnp.dtype(dtype).name}.")
    return jnp.dtype(dtype)
  with jax.numpy_dtype_promotion("standard"):
    return jnp.result_type(*(getattr(a, "dtype", a) for a in args if a is not None))


def promote_dtype(args: tuple, /, *, dtype: Any = None, inexact: bool = True) -> tuple:
  """`flax.nnx`'s default `promote_dtype`: casts every non-None array of `args` to one dtype.

  Same signature and result as `flax.nnx.nn.dtypes.promote_dtype`, but it also works under
  `jax_numpy_dtype_promotion="strict"` (flax's raises for bfloat16 input with float32 params).
  """
  del inexact  # every normjax input is floating already
  target = result_dtype(*args, dtype=dtype)
  return tuple(None if a is None else jnp.asarray(a, target) for a in args)


def check_input(x: Any) -> jax.Array:
  """`x` as an array; `TypeError` (normjax's message) unless it is floating."""
  return checks.check_floating(x)


def _input(x: Any, params: Sequence[Any], dtype: Any) -> tuple[jax.Array, jnp.dtype]:
  """Checks `x`, and returns it in its computation dtype along with the output dtype."""
  x = checks.check_floating(x)
  out = result_dtype(x, *params, dtype=dtype)
  return x.astype(result_dtype(x, out)), out


def check_num_features(num_features: Any) -> int:
  """An nnx module's `num_features`: a positive int (flax's would fail in a shape error)."""
  return checks.check_positive_int(num_features, "num_features")


def check_use_running_average(value: Any) -> bool:
  """`use_running_average` (after flax's merge of attribute and argument): a bool, as
  `batch_norm`'s `train` (flax would read "no" by its truthiness, as True)."""
  return checks.check_bool(value, "use_running_average",
                          "True for the stored statistics, False for the batch's")


def check_residual(residual: Any, x: jax.Array) -> jax.Array:
  """An add-norm module's `residual`: exactly `x`'s shape and dtype (never broadcast)."""
  return checks.check_residual(residual, x)


def check_group_size(num_features: Any, num_groups: Any, group_size: Any) -> int:
  """An nnx `GroupNorm`'s channels per group, from exactly one of `num_groups`/`group_size`."""
  return checks.check_group_size(num_features, num_groups, group_size)


def check_channels(x: jax.Array, axis: int, num_features: int) -> None:
  """`ValueError` unless `x` has `num_features` channels along `axis` (an out-of-range
  `axis` is left to the normjax function's own error)."""
  if -x.ndim <= axis < x.ndim and x.shape[axis] != num_features:
    raise ValueError(f"x must have num_features={num_features} channels along feature_axis="
                     f"{axis}; got {x.shape[axis]} (x.shape={tuple(x.shape)}).")


def feature_axes(axes: Any, ndim: int, name: str) -> tuple[int, ...]:
  """Canonical (sorted, non-negative) axes, with normjax's range and repeat errors."""
  return checks.canonicalize_axes(axes, ndim, name)


@overload
def to_shape(param: None, shape: Sequence[int], name: str) -> None: ...
@overload
def to_shape(param: jax.Array, shape: Sequence[int], name: str) -> jax.Array: ...
@overload
def to_shape(param: Any, shape: Sequence[int], name: str) -> jax.Array | None: ...
def to_shape(param: Any, shape: Sequence[int], name: str) -> jax.Array | None:
  """Reshapes a parameter or statistic to `shape` (same values, same order), or raises."""
  if param is None:
    return None
  param = jnp.asarray(param)
  if param.size != math.prod(shape):
    raise ValueError(f"{name} must have {math.prod(shape)} values (the feature shape "
                     f"{tuple(shape)} of x); got shape {tuple(param.shape)}.")
  return param.reshape(tuple(shape))


def merge_axes(x: jax.Array, axes: Sequence[int]) -> tuple[jax.Array, Callable]:
  """Moves `axes` of `x` to the end and merges them into one axis; returns it and the inverse.

  The merged axis enumerates the feature positions in row-major order of `axes`, which is the
  order of a flax feature-shaped parameter flattened with `reshape(-1)`. No axes give a new
  trailing axis of size 1.
  """
  rest = [a for a in range(x.ndim) if a not in axes]
  perm = rest + list(axes)
  moved_shape = tuple(x.shape[a] for a in perm)
  merged = jnp.transpose(x, perm).reshape(moved_shape[:len(rest)] + (-1,))
  inverse = tuple(int(a) for a in np.argsort(perm))
  undo = lambda y: jnp.transpose(y.reshape(moved_shape), inverse)
  return merged, undo


def map_axes(fn: Callable, axes: Sequence[int], *args: Any) -> Any:
  """`fn(*args)` applied to every slice of the `args` (arrays of one rank) along `axes`.

  Implemented with nested `jax.vmap`s; the outputs are re-assembled along the same axes. None
  arguments are passed through.
  """
  for a in sorted(axes):  # the largest axis ends up outermost, so inner indices stay valid
    fn = jax.vmap(fn, in_axes=tuple(None if v is None else a for v in args), out_axes=a)
  return fn(*args)


def no_index_groups(axis_index_groups: Any, module: str) -> None:
  """Raises for `axis_index_groups`, which only `batch_norm` supports."""
  if axis_index_groups is not None:
    raise ValueError(f"{module}: axis_index_groups is not supported (normjax supports it only for "
                     f"BatchNorm); got axis_index_groups={axis_index_groups!r}. Use None.")


def batch_norm(x: Any, scale: Any, bias: Any, stats: BatchStats, *, axis: Any, dtype: Any,
               mask: Any = None, **kwargs: Any) -> tuple[jax.Array, BatchStats]:
  """`nj.batch_norm` with flax's feature `axis` (an int, or a tuple of axes merged into one).

  `scale`, `bias`, `stats.mean` and `stats.var` may have the feature shape or be flat; the
  new stats come back in the shape of `stats`. `kwargs` go to `nj.batch_norm`. As in flax, a
  single value per channel in training gives variance 0 and the output `bias` (no error).
  """
  kwargs = dict(kwargs, fast_variance=False, single_value=True)
  x, out = _input(x, (scale, bias), dtype)
  axes = checks.canonicalize_axes(axis, x.ndim, "axis")
  if len(axes) == 1:
    y, new = batch.normalize_batch(x, scale, bias, stats, channel_axis=axes[0], mask=mask,
                                   **kwargs)
    return y.astype(out), new
  xm, undo = merge_axes(x, axes)
  mask = None if mask is None else merge_axes(checks.check_mask(mask, x.shape), axes)[0]
  flat = lambda p, name: to_shape(p, xm.shape[-1:], name)
  flat_stats = BatchStats(to_shape(stats.mean, xm.shape[-1:], "mean"),
                          to_shape(stats.var, xm.shape[-1:], "var"), stats.count)
  y, new = batch.normalize_batch(xm, flat(scale, "scale"), flat(bias, "bias"), flat_stats,
                                 channel_axis=-1, mask=mask, **kwargs)
  new = new._replace(mean=new.mean.reshape(jnp.shape(stats.mean)),
                     var=new.var.reshape(jnp.shape(stats.var)))
  return undo(y).astype(out), new


def batch_renorm(x: Any, scale: Any, bias: Any, stats: BatchStats, *, axis: Any, dtype: Any,
                 r_max: Any, d_max: Any, warmup_steps: Any, **kwargs: Any
                 ) -> tuple[jax.Array, BatchStats]:
  """`nj.batch_renorm` with flax's feature `axis` (as `batch_norm` here); in evaluation, or
  with `r_max=None` (flax's `init`, which normalizes with plain batch statistics), batch norm."""
  renorm = None if r_max is None else checks.check_renorm(r_max, d_max, warmup_steps)
  return batch_norm(x, scale, bias, stats, axis=axis, dtype=dtype, renorm=renorm,
                    unbiased_running_var=False, **kwargs)


def layer_norm(x: Any, scale: Any, bias: Any, *, reduction_axes: Any, feature_axes: Any,
               dtype: Any, mask: Any = None, centered: bool = True, **kwargs: Any) -> jax.Array:
  """`nj.layer_norm` (or `nj.rms_norm` when not `centered`) with flax's two axis attributes.

  Feature axes among the reduction axes: the parameter is broadcast to the reduced shape.
  Feature axes outside them (flax's `LayerNorm(reduction_axes=(1, 2), feature_axes=-1)`): the
  call is vmapped over those axes, each slice with its own parameter values.
  """
  x, out = _input(x, (scale, bias), dtype)
  red = checks.canonicalize_axes(reduction_axes, x.ndim, "reduction_axes")
  if not red:
    raise ValueError(f"reduction_axes must name at least one axis of x (rank {x.ndim}); got "
                     f"reduction_axes={reduction_axes!r}.")
  feat = checks.canonicalize_axes(feature_axes, x.ndim, "feature_axes")
  mapped = tuple(a for a in feat if a not in red)
  inner_red = tuple(r - sum(m < r for m in mapped) for r in red)
  in_x_rank = [x.shape[a] if a in feat else 1 for a in range(x.ndim)]

  def as_feature(p: jax.Array | None, name: str) -> jax.Array | None:
    if p is None:
      return None
    return to_shape(p, [x.shape[a] for a in feat], name).reshape(in_x_rank)
  scale, bias = as_feature(scale, "scale"), as_feature(bias, "bias")

  def norm(x, mask, scale, bias):
    reduced = lambda p: None if p is None else jnp.broadcast_to(
        p.reshape([p.shape[a] for a in inner_red]), [x.shape[a] for a in inner_red])
    if centered:
      return layer.layer_norm(x, reduced(scale), reduced(bias), axis=inner_red, mask=mask,
                              **kwargs)
    return layer.rms_norm(x, reduced(scale), axis=inner_red, mask=mask, **kwargs)

  mask = checks.check_mask(mask, x.shape) if mapped else mask
  return map_axes(norm, mapped, x, mask, scale, bias).astype(out)


def add_layer_norm(x: Any, residual: Any, scale: Any, bias: Any, *, reduction_axes: Any,
                   feature_axes: Any, dtype: Any, centered: bool = True, eps: Any,
                   axis_name: Any = None, scale_offset: Any = 0.0
                   ) -> tuple[jax.Array, jax.Array]:
  """`(layer_norm(h, ...), h)` with `h = x + residual` (`rms_norm` when not `centered`).

  `residual` must have `x`'s shape and dtype; both are cast to the computation dtype (as `x`
  is in `layer_norm`), `h` is their sum in it and `y` comes back in the output dtype. When the
  feature axes are the reduction axes (the usual `[..., C]` layer norm) and there is no
  `axis_name`, this is one `nj.add_layer_norm` / `nj.add_rms_norm` call (the fused kernel);
  otherwise the sum, then `layer_norm`.
  """
  x = checks.check_floating(x)
  residual = checks.check_residual(residual, x)
  x, out = _input(x, (scale, bias), dtype)
  residual = residual.astype(x.dtype)
  red = checks.canonicalize_axes(reduction_axes, x.ndim, "reduction_axes")
  feat = checks.canonicalize_axes(feature_axes, x.ndim, "feature_axes")
  if red != feat or axis_name is not None:
    h = dispatch.residual_sum(x, residual)
    return layer_norm(h, scale, bias, reduction_axes=reduction_axes, feature_axes=feature_axes,
                      dtype=dtype, centered=centered, eps=eps, axis_name=axis_name,
                      scale_offset=scale_offset), h
  shape = [x.shape[a] for a in red]
  scale, bias = to_shape(scale, shape, "scale"), to_shape(bias, shape, "bias")
  if centered:
    y, h = layer.add_layer_norm(x, residual, scale, bias, axis=red, eps=eps,
                                scale_offset=scale_offset)
  else:
    y, h = layer.add_rms_norm(x, residual, scale, axis=red, eps=eps, scale_offset=scale_offset)
  return y.astype(out), h


def instance_norm(x: Any, scale: Any, bias: Any, *, feature_axes: Any, dtype: Any,
                  mask: Any = None, **kwargs: Any) -> jax.Array:
  """`nj.instance_norm` with batch axis 0 and flax's `feature_axes` (several are merged).

  As in flax, nothing left to reduce (`[N, C]` input, or feature axes covering every non-batch
  axis) gives variance 0 and the output `bias` (no error).
  """
  kwargs = dict(kwargs, num_groups=None, group_size=1, batch_axis=0)
  x, out = _input(x, (scale, bias), dtype)
  axes = checks.canonicalize_axes(feature_axes, x.ndim, "feature_axes")
  if 0 in axes:
    raise ValueError(f"feature_axes={feature_axes!r} must not include axis 0, the batch axis; got "
                     f"x of rank {x.ndim}.")
  if len(axes) == 1:
    return _group(x, scale, bias, channel_axis=axes[0], mask=mask, **kwargs).astype(out)
  xm, undo = merge_axes(x, axes)
  mask = None if mask is None else merge_axes(checks.check_mask(mask, x.shape), axes)[0]
  flat = lambda p, name: to_shape(p, xm.shape[-1:], name)
  y = _group(xm, flat(scale, "scale"), flat(bias, "bias"), channel_axis=-1, mask=mask, **kwargs)
  return undo(y).astype(out)


def group_norm(x: Any, scale: Any, bias: Any, *, reduction_axes: Any, feature_axis: int,
               dtype: Any, mask: Any = None, **kwargs: Any) -> jax.Array:
  """`nj.group_norm` with flax's `reduction_axes` (None: every axis but 0) and a channel axis.

  The axes outside `reduction_axes` are the per-example axes: the first is `batch_axis`, any
  further ones are vmapped over.
  """
  x, out = _input(x, (scale, bias), dtype)
  c_axis = checks.canonicalize_axis(feature_axis, x.ndim, "feature_axis")
  kept: tuple[int, ...]
  if reduction_axes is None:
    kept = (0,)
  else:
    red = checks.canonicalize_axes(reduction_axes, x.ndim, "reduction_axes")
    if c_axis not in red:
      raise ValueError(f"reduction_axes={reduction_axes!r} must include the channel axis "
                       f"(feature_axis={feature_axis}), whose groups are normalized over; got "
                       f"{red} for x of rank {x.ndim}.")
    kept = tuple(a for a in range(x.ndim) if a not in red)
  inner_c = c_axis - sum(k < c_axis for k in kept[1:])

  def norm(x, mask):
    return _group(x, scale, bias, channel_axis=inner_c, batch_axis=kept[0] if kept else None,
                  mask=mask, **kwargs)

  mask = checks.check_mask(mask, x.shape) if len(kept) > 1 else mask
  return map_axes(norm, kept[1:], x, mask).astype(out)


def _group(x: jax.Array, scale: Any, bias: Any, *, num_groups: int | None = None,
           group_size: int | None = None, **kwargs: Any) -> jax.Array:
  """`nj.group_norm` that, like flax, accepts a single element per example and group."""
  return group.normalize_groups(x, scale, bias, num_groups=num_groups, group_size=group_size,
                     fast_variance=False, single_element=True, **kwargs)


def filter_response_norm(x: Any, scale: Any, bias: Any, tau: Any, *, channel_axis: int,
                         dtype: Any, **kwargs: Any) -> jax.Array:
  """`nj.filter_response_norm` in flax's dtypes (output `dtype`, else promoted)."""
  x, out = _input(x, (scale, bias, tau), dtype)
  y = response.filter_response_norm(x, scale, bias, tau, channel_axis=channel_axis, **kwargs)
  return y.astype(out)


def linen_promote_dtype(*args: Any, dtype: Any = None, inexact: bool = True) -> list:
  """`promote_dtype` in `flax.linen`'s calling convention (the arrays as positional arguments),
  for the `Dense` layers the linen modules make; works under strict promotion."""
  return list(promote_dtype(args, dtype=dtype, inexact=inexact))


def norm_health(x: Any, *, reduction_axes: Any, eps: Any, mask: Any = None) -> NormHealth:
  """`nj.norm_health` of a module's input over its reduction axes (flax's `reduction_axes`:
  the axes a layer or RMS norm normalizes over, or every axis but the features for a batch
  norm, whose rows are then its channels)."""
  x = checks.check_floating(x)
  axes = checks.canonicalize_axes(reduction_axes, x.ndim, "reduction_axes")
  return health.norm_health(x, axis=axes, eps=eps, mask=mask)


def batch_health(x: Any, *, axis: Any, eps: Any, mask: Any = None) -> NormHealth:
  """`nj.norm_health` per channel of a batch norm: over every axis but the feature `axis`."""
  x = checks.check_floating(x)
  feat = checks.canonicalize_axes(axis, x.ndim, "axis")
  return norm_health(x, reduction_axes=tuple(a for a in range(x.ndim) if a not in feat),
                     eps=eps, mask=mask)


Modulation = Callable[[jax.Array, int], jax.Array]


def _modulation(x: Any, cond: Any, modulation: Modulation, chunks: int, dtype: Any,
                num_features: int | None, cond_features: int | None
                ) -> tuple[jax.Array, list[jax.Array], jnp.dtype]:
  """Checks `x` (`[B, ..., D]`) and `cond` (`[B, cond_features]`); returns `x` in its
  computation dtype, the `chunks` outputs of `modulation(silu(cond), chunks * D)` each
  reshaped to `[B, 1, ..., 1, D]` (x's rank), in DiT's `chunk` order, and the output dtype."""
  x = checks.check_floating(x)
  cond = checks.check_floating(cond, "cond")
  if x.ndim < 2:
    raise ValueError(f"x must have a batch axis and a feature axis, [B, ..., num_features]; got "
                     f"x of shape {tuple(x.shape)}.")
  if num_features is not None:
    check_channels(x, -1, num_features)
  batch, features = x.shape[0], x.shape[-1]
  if (cond.ndim != 2 or cond.shape[0] != batch
      or (cond_features is not None and cond.shape[1] != cond_features)):
    expected = "cond_features" if cond_features is None else cond_features
    raise ValueError(f"cond must have shape (B, cond_features) = ({batch}, {expected}), one "
                     f"conditioning vector per example of x (x.shape={tuple(x.shape)}); got "
                     f"cond of shape {tuple(cond.shape)}.")
  h = modulation(jax.nn.silu(cond), chunks * features)   # DiT: Linear(SiLU(c))
  out = result_dtype(x, h, dtype=dtype)
  per_example = (batch,) + (1,) * (x.ndim - 2) + (features,)
  parts = [p.reshape(per_example) for p in jnp.split(h, chunks, axis=-1)]
  return x.astype(result_dtype(x, out)), parts, out


def adaptive_layer_norm(x: Any, cond: Any, modulation: Modulation, *, use_gate: bool,
                        dtype: Any, eps: Any, mask: Any = None, num_features: int | None = None,
                        cond_features: int | None = None) -> Any:
  """adaLN(-Zero): `nj.adaptive_layer_norm(x, shift, scale)` over the last axis with `shift,
  scale(, gate)` from `modulation(silu(cond), n * D)`; returns `(y, gate)` or `y`.

  `modulation(h, features)` is the module's Dense layer (made or called by the face) applied to
  `h`. `gate` comes back as `shift` and `scale` go in: `[B, 1, ..., 1, D]`, x's rank.
  """
  use_gate = checks.check_bool(use_gate, "use_gate", "True to return a gate too")
  x, parts, out = _modulation(x, cond, modulation, 3 if use_gate else 2, dtype, num_features,
                              cond_features)
  y = adaptive.adaptive_layer_norm(x, parts[0], parts[1], eps=eps, mask=mask).astype(out)
  return (y, parts[2]) if use_gate else y


def adaptive_group_norm(x: Any, cond: Any, modulation: Modulation, *, dtype: Any,
                        num_groups: int | None, group_size: int | None, eps: Any,
                        mask: Any = None, num_features: int | None = None,
                        cond_features: int | None = None) -> jax.Array:
  """AdaGN: `nj.adaptive_group_norm(x, shift, scale)` (channels-last, batch axis 0) with
  `shift, scale` from `modulation(silu(cond), 2 * C)`."""
  x, (shift, scale), out = _modulation(x, cond, modulation, 2, dtype, num_features,
                                       cond_features)
  return adaptive.adaptive_group_norm(x, shift, scale, num_groups=num_groups,
                                      group_size=group_size, channel_axis=-1, batch_axis=0,
                                      eps=eps, mask=mask).astype(out)


def dynamic_tanh(x: Any, alpha: Any, scale: Any, bias: Any, *, dtype: Any) -> jax.Array:
  """`nj.dynamic_tanh` over the last axis, in flax's dtypes (output `dtype`, else promoted)."""
  x, out = _input(x, (alpha, scale, bias), dtype)
  return tanh.dynamic_tanh(x, alpha, scale, bias, axis=-1).astype(out)


def modulation_features(num_features: Any, use_gate: Any) -> int:
  """The output width of an adaptive module's `modulation` Dense: `shift`, `scale` (and
  `gate`), `num_features` each."""
  chunks = 3 if checks.check_bool(use_gate, "use_gate", "True to return a gate too") else 2
  return chunks * check_num_features(num_features)


def check_cond_features(cond_features: Any) -> int:
  """An nnx adaptive module's `cond_features`: a positive int."""
  return checks.check_positive_int(cond_features, "cond_features")
