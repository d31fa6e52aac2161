"""Every trace-time argument check, and its message.

Each check runs on static shapes and Python values at trace time, names the argument, the value
expected and the one received, and returns the value checked, typed, for the layers below to
trust (`check_eps` gives a Python float or a traced scalar; axes come back canonical).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any
from typing import NamedTuple
from typing import TypeGuard
from typing import overload

import jax
import jax.numpy as jnp
import numpy as np

from normjax._src.shapes import Axes


def canonicalize_axes(axis: int | Sequence[int], ndim: int, name: str = "axis") -> Axes:
  """Returns `axis` as a sorted tuple of non-negative ints, after type, range and repeat checks.

  `axis` is an int (any integral type but bool) or a tuple/list of them.

  Raises:
    TypeError: if `axis` is neither an int nor a tuple/list of ints (e.g. None, 1.5, "1").
    ValueError: if an entry is outside `[-ndim, ndim)` or an axis is named twice.
  """
  axes: tuple[Any, ...]
  if is_int(axis):
    axes = (axis,)
  elif isinstance(axis, (tuple, list)):
    axes = tuple(axis)
  else:
    raise TypeError(f"{name} must be an int or a tuple of ints; got {name}={axis!r} "
                    f"(of type {type(axis).__name__}).")
  out = []
  for a in axes:
    if not is_int(a):
      raise TypeError(f"{name} must be an int or a tuple of ints; got {name}={axis!r}, whose "
                      f"entry {a!r} is of type {type(a).__name__}.")
    if not -ndim <= a < ndim:
      raise ValueError(
          f"{name}={axis!r} is out of range: expected every axis in [{-ndim}, {ndim}) for an "
          f"input of rank {ndim}; got {a}.")
    out.append(int(a) % ndim)
  if len(set(out)) != len(out):
    raise ValueError(f"{name}={axis!r} names the same axis more than once (as {sorted(out)}) for "
                     f"an input of rank {ndim}; expected distinct axes.")
  return tuple(sorted(out))


def canonicalize_axis(axis: int, ndim: int, name: str) -> int:
  """Returns one axis as a non-negative int (see `canonicalize_axes`)."""
  if not is_int(axis):
    raise TypeError(f"{name} must be an int; got {name}={axis!r} (of type "
                    f"{type(axis).__name__}).")
  return canonicalize_axes(axis, ndim, name)[0]


def channel_and_batch_axes(channel_axis: int, batch_axis: int | None,
                           ndim: int) -> tuple[int, int | None]:
  """The canonical `(channel_axis, batch_axis)` of a per-example, per-channel variant (group,
  instance, filter response norm); `batch_axis` may be None (a single example).

  Raises:
    ValueError: the two name the same axis (or either is out of range).
  """
  c_axis = canonicalize_axis(channel_axis, ndim, "channel_axis")
  b_axis = None if batch_axis is None else canonicalize_axis(batch_axis, ndim, "batch_axis")
  if b_axis == c_axis:
    raise ValueError(f"batch_axis and channel_axis must differ; got batch_axis={batch_axis} and "
                     f"channel_axis={channel_axis} for x of rank {ndim}.")
  return c_axis, b_axis


def check_floating(x: Any, name: str = "x") -> jax.Array:
  """Returns `x` as an array, raising `TypeError` unless its dtype is floating."""
  if not hasattr(x, "dtype"):
    try:
      x = jnp.asarray(x)
    except (TypeError, ValueError):
      raise TypeError(f"{name} must be a floating array (float16, bfloat16, float32, float64); "
                      f"got {name} of type {type(x).__name__}.") from None
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"{name} must have a floating dtype (float16, bfloat16, float32, float64); "
                    f"got dtype {x.dtype}.")
  return x


def check_eps(eps: Any, name: str = "eps") -> Any:
  """Returns `eps` as a Python float, after checking it is a finite number >= 0.

  Accepted: a Python int or float, a NumPy integer or floating scalar, or a 0-d concrete
  (NumPy or JAX) array of such a dtype; each comes back as a Python float, so that the value
  enters the computation as a constant of the statistics' dtype whatever its original type.
  A traced eps (a `jax.core.Tracer`, e.g. an argument of a jitted function) cannot be checked
  for its value: it is returned unchanged once its shape `()` and real dtype are checked.

  Raises:
    TypeError: `eps` is a bool, complex, a string, None or any other non-real value.
    ValueError: `eps` is not a scalar, or is negative, NaN or infinite.
  """
  value = real_scalar(eps, name)
  if isinstance(value, jax.core.Tracer):
    return value
  if not 0.0 <= value < math.inf:
    raise ValueError(f"{name} must be a non-negative, finite number (finite and >= 0); got "
                     f"{name}={eps!r}.")
  return value


def check_momentum(momentum: Any) -> Any:
  """Returns `momentum` as None or a Python float in [0, 1].

  The accepted types are those of `check_eps`; a traced momentum is returned unchanged (after
  its shape and dtype are checked).

  Raises:
    TypeError: a bool, complex, string or other non-real value.
    ValueError: a non-scalar array, or a value outside [0, 1] (or NaN).
  """
  if momentum is None:
    return None
  value = real_scalar(momentum, "momentum")
  if isinstance(value, jax.core.Tracer):
    return value
  if not 0.0 <= value <= 1.0:
    raise ValueError(
        "momentum must be in [0, 1] (flax/keras convention: new = momentum * old + "
        f"(1 - momentum) * batch; PyTorch's momentum m is 1 - m here) or None; got {momentum!r}.")
  return value


def check_bool(value: Any, name: str, meaning: str = "") -> bool:
  """Returns `value` as a Python bool; `TypeError` unless it is a Python or NumPy bool.

  Anything else (a string such as "no", an int, None, a JAX array or tracer) is rejected rather
  than read by its truthiness.
  """
  if isinstance(value, (bool, np.bool_)):
    return bool(value)
  extra = f" ({meaning})" if meaning else ""
  raise TypeError(f"{name} must be a Python bool{extra}; got {name}={value!r} (of type "
                  f"{type(value).__name__}).")


def check_positive_int(value: Any, name: str) -> int:
  """Returns `value` as a Python int >= 1; any integral type (Python, NumPy) but bool."""
  if not is_int(value):
    raise TypeError(f"{name} must be a positive int; got {name}={value!r} (of type "
                    f"{type(value).__name__}).")
  if value < 1:
    raise ValueError(f"{name} must be a positive int (>= 1); got {name}={value!r}.")
  return int(value)


def check_axis_index_groups(axis_index_groups: Any, axis_name: Any) -> Any:
  """Checks `axis_index_groups`: None, or with an `axis_name`, a list of equal-size groups.

  Returns it unchanged (as jax's collectives take it).

  Raises:
    ValueError: groups without `axis_name` (they would be ignored), empty or unequal groups, or
      an index in more than one group.
    TypeError: not a sequence of sequences of ints.
  """
  if axis_index_groups is None:
    return None
  if axis_name is None:
    raise ValueError(f"axis_index_groups needs an axis_name (the mapped axis the groups "
                     f"partition); got axis_index_groups={axis_index_groups!r} with "
                     f"axis_name=None.")
  expected = "a sequence of sequences of ints (device indices along axis_name)"
  if not isinstance(axis_index_groups, (tuple, list)) or not all(
      isinstance(g, (tuple, list, np.ndarray)) and all(is_int(i) for i in g)
      for g in axis_index_groups):
    raise TypeError(f"axis_index_groups must be {expected}; got {axis_index_groups!r}.")
  sizes = {len(g) for g in axis_index_groups}
  if not axis_index_groups or 0 in sizes or len(sizes) != 1:
    raise ValueError(f"axis_index_groups must be non-empty groups of equal size; got "
                     f"{axis_index_groups!r}.")
  flat = [int(i) for g in axis_index_groups for i in g]
  if len(set(flat)) != len(flat) or min(flat) < 0:
    raise ValueError(f"axis_index_groups must name each device index (>= 0) at most once; got "
                     f"{axis_index_groups!r}.")
  return axis_index_groups


@overload
def check_param(param: None, name: str, expected: tuple[int, ...]) -> None: ...
@overload
def check_param(param: jax.Array, name: str, expected: tuple[int, ...]) -> jax.Array: ...
@overload
def check_param(param: Any, name: str, expected: tuple[int, ...]) -> jax.Array | None: ...
def check_param(param: Any, name: str, expected: tuple[int, ...]) -> jax.Array | None:
  """Checks that an optional scale/bias is floating with exactly the feature shape `expected`."""
  if param is None:
    return None
  param = check_floating(param, name)
  if tuple(param.shape) != tuple(expected):
    raise ValueError(f"{name} must have shape {tuple(expected)} (the feature shape); "
                     f"got shape {tuple(param.shape)}.")
  return param


def check_channel_param(param: Any, name: str, x_shape: tuple[int, ...],
                        c_axis: int) -> jax.Array | None:
  """`check_param` for a `[C]` parameter, `C = x_shape[c_axis]`; when the shape received is
  that of another non-batch axis of `x`, the message says which `channel_axis` would fit (NCHW
  input without `channel_axis=1`)."""
  try:
    return check_param(param, name, (x_shape[c_axis],))
  except ValueError as error:
    fits = [a for a in range(1, len(x_shape))
            if a != c_axis and tuple(param.shape) == (x_shape[a],)]
    if not fits:
      raise
    named = lambda a: ("channel_axis=1 (PyTorch's NC... layout)" if a == 1 else
                       f"channel_axis={a - len(x_shape) if a == len(x_shape) - 1 else a}")
    raise ValueError(f"{error} x has shape {tuple(x_shape)}, its channels taken along axis "
                     f"{c_axis}; if they are along axis {' or '.join(map(str, fits))}, pass "
                     f"{' or '.join(map(named, fits))}.") from None


@overload
def check_mask(mask: None, x_shape: tuple[int, ...]) -> None: ...
@overload
def check_mask(mask: jax.Array, x_shape: tuple[int, ...]) -> jax.Array: ...
@overload
def check_mask(mask: Any, x_shape: tuple[int, ...]) -> jax.Array | None: ...
def check_mask(mask: Any, x_shape: tuple[int, ...]) -> jax.Array | None:
  """Returns `mask` broadcast to `x_shape`; it must be boolean and broadcastable to `x`."""
  if mask is None:
    return None
  if not hasattr(mask, "dtype"):
    try:
      mask = jnp.asarray(mask)
    except (TypeError, ValueError):
      raise TypeError(f"mask must be a boolean array (True marks elements that count in the "
                      f"statistics); got mask of type {type(mask).__name__}.") from None
  if mask.dtype != jnp.bool_:
    raise TypeError(f"mask must be a boolean array (True marks elements that count in the "
                    f"statistics); got dtype {mask.dtype}.")
  try:  # jnp's, not NumPy's: shapes may hold symbolic dimensions (`jax.export`)
    shape = tuple(jnp.broadcast_shapes(tuple(mask.shape), tuple(x_shape)))
  except (ValueError, TypeError):
    shape = None
  if shape != tuple(x_shape):
    raise ValueError(f"mask must be broadcastable to x.shape={tuple(x_shape)}; got mask.shape="
                     f"{tuple(mask.shape)}.")
  return jnp.broadcast_to(mask, x_shape)



def is_int(value: Any) -> TypeGuard[int]:
  """An integral Python or NumPy scalar, not a bool."""
  return (isinstance(value, (numbers.Integral, np.integer))
          and not isinstance(value, (bool, np.bool_)))


def real_scalar(value: Any, name: str) -> Any:
  """A concrete real scalar as a Python float; a tracer of shape () and real dtype unchanged."""
  expected = ("a real number (a Python int or float, a NumPy integer or floating scalar, or a "
              "0-d array of such a dtype)")
  if isinstance(value, (bool, np.bool_)) or not (
      isinstance(value, (numbers.Real, np.integer, np.floating)) or hasattr(value, "dtype")):
    raise TypeError(f"{name} must be {expected}; got {name}={value!r} (of type "
                    f"{type(value).__name__}).")
  dtype = np.dtype(getattr(value, "dtype", np.float64))
  if dtype == np.bool_ or not (np.issubdtype(dtype, np.integer)
                               or jnp.issubdtype(dtype, jnp.floating)):
    raise TypeError(f"{name} must be {expected}; got {name}={value!r} of dtype {dtype}.")
  shape = tuple(np.shape(value))
  if shape != ():
    raise ValueError(f"{name} must be a scalar (shape ()); got {name} of shape {shape}.")
  if isinstance(value, jax.core.Tracer):
    return value
  return float(value)


def missing_stats_fields(stats: Any) -> list[str]:
  """The fields among `mean`, `var`, `count` that `stats` lacks: a `BatchStats`, or any
  object with those attributes (for a tuple, as named fields: a namedtuple without `count`,
  or a plain tuple, would otherwise offer `tuple.count`, a method)."""
  if isinstance(stats, tuple):
    fields = getattr(type(stats), "_fields", ())
  else:
    fields = tuple(f for f in ("mean", "var", "count") if hasattr(stats, f))
  return [f for f in ("mean", "var", "count") if f not in fields]


def check_stats(stats: Any, num_channels: int) -> None:
  """Checks `stats`: a BatchStats-like record of `[C]` floating mean and var, scalar int count.

  A `BatchStats`, or any object with array attributes `mean`, `var` and `count` (for a tuple, as
  named fields: a namedtuple without `count` would otherwise offer `tuple.count`, a method).
  """
  example = f"e.g. from nj.init_batch_stats({num_channels})"
  missing = missing_stats_fields(stats)
  if missing:
    raise TypeError(f"stats must be a BatchStats (fields mean, var, count), {example}; got "
                    f"{type(stats).__name__}, which has no field {', '.join(missing)}.")
  for field in ("mean", "var", "count"):
    value = getattr(stats, field)
    if not (hasattr(value, "shape") and hasattr(value, "dtype")):
      raise TypeError(f"stats.{field} must be an array, {example}; got {value!r} (of type "
                      f"{type(value).__name__}).")
  for field in ("mean", "var"):
    value = getattr(stats, field)
    if not jnp.issubdtype(value.dtype, jnp.floating):
      raise TypeError(f"stats.{field} must have a floating dtype (the running averages; "
                      f"float32 from init_batch_stats); got dtype {value.dtype}.")
    shape = tuple(jnp.shape(value))
    if shape != (num_channels,):
      raise ValueError(f"stats.{field} must have shape ({num_channels},) (one value per channel "
                       f"of x); got shape {shape}.")
  count = stats.count
  if count.dtype == jnp.bool_ or not jnp.issubdtype(count.dtype, jnp.integer):
    raise TypeError(f"stats.count must be a scalar integer array (the number of batches folded "
                    f"in, int32 from init_batch_stats); got dtype {count.dtype}.")
  if tuple(jnp.shape(count)) != ():
    raise ValueError(f"stats.count must be a scalar (shape ()), the number of batches folded in; "
                     f"got shape {tuple(jnp.shape(count))}.")


def check_residual(residual: Any, x: jax.Array, residual_dtype: Any = None) -> jax.Array:
  """`residual` as an array of exactly `x`'s shape, and of `x`'s dtype or `residual_dtype`
  (never broadcast or promoted)."""
  residual = check_floating(residual, "residual")
  if tuple(residual.shape) != tuple(x.shape):
    raise ValueError(f"residual must have the shape of x, {tuple(x.shape)}; got shape "
                     f"{tuple(residual.shape)}.")
  allowed = {jnp.dtype(x.dtype)} | ({jnp.dtype(residual_dtype)} if residual_dtype else set())
  if jnp.dtype(residual.dtype) not in allowed:
    which = " or residual_dtype" if residual_dtype else ""
    raise TypeError(f"residual must have the dtype of x{which}, "
                    f"{' or '.join(sorted(str(d) for d in allowed))}; got dtype "
                    f"{residual.dtype} (cast one of them first).")
  return residual


def check_same_shape(value: Any, x: jax.Array, name: str) -> jax.Array:
  """`value` as a floating array of exactly `x`'s shape (a gate `z`, say)."""
  value = check_floating(value, name)
  if tuple(value.shape) != tuple(x.shape):
    raise ValueError(f"{name} must have the shape of x, {tuple(x.shape)}; got shape "
                     f"{tuple(value.shape)}.")
  return value


def check_scale_offset(scale_offset: Any, scale: jax.Array | None) -> float:
  """`scale_offset` as a Python float; a non-zero one needs a `scale` to offset."""
  value = real_scalar(scale_offset, "scale_offset")
  if isinstance(value, jax.core.Tracer) or not math.isfinite(value):
    raise TypeError(f"scale_offset must be a finite Python number (the constant added to the "
                    f"scale, e.g. 1.0 for Gemma's zero-centered scale); got "
                    f"scale_offset={scale_offset!r}.")
  if value != 0.0 and scale is None:
    raise ValueError(f"scale_offset={value} needs a scale to offset (y = xhat * (scale_offset + "
                     f"scale)); got scale=None. Pass the scale parameter, or no scale_offset.")
  return float(value)


def check_dtype(dtype: Any, name: str, *, optional: bool = True, why: str = "") -> Any:
  """A floating dtype (`residual_dtype`, `init_batch_stats`' `dtype`), or None if `optional`."""
  if dtype is None and optional:
    return None
  expected = (f"{name} must be {'None or ' if optional else ''}a floating dtype (float32, "
              f"float64, bfloat16, float16){why}")
  try:
    checked = jnp.dtype(dtype)
  except TypeError:
    raise TypeError(f"{expected}; got {name}={dtype!r}.") from None
  if not jnp.issubdtype(checked, jnp.floating):
    raise TypeError(f"{expected}; got {name}={checked}.")
  return checked


def check_modulation(value: Any, name: str, x: jax.Array) -> jax.Array | None:
  """A per-example `shift`/`scale`: None, or floating, of `x`'s rank and broadcastable to it.

  The same rank is required, so that a `[B, D]` modulation of `[B, T, D]` input is an error
  (it would broadcast along the wrong axes when `B == T`) rather than reinterpreted.
  """
  if value is None:
    return None
  value = check_floating(value, name)
  shape, x_shape = tuple(value.shape), tuple(x.shape)
  fits = len(shape) == len(x_shape) and all(d in (1, n) for d, n in zip(shape, x_shape,
                                                                           strict=True))
  if not fits:
    hint = (f" (for per-example values of shape {shape}, insert size-1 axes, e.g. "
            f"{name}[:, None, :] for [B, T, D] input)" if len(shape) < len(x_shape) else "")
    raise ValueError(f"{name} must have the rank of x ({len(x_shape)}) and broadcast to its "
                     f"shape {x_shape} (each axis 1 or x's size); got shape {shape}{hint}.")
  return value


def check_group_size(num_channels: int, num_groups: Any, group_size: Any) -> int:
  """The number of channels per group, from exactly one of `num_groups` and `group_size`.

  Either may be of any integral type (Python or NumPy int, not bool).
  """
  if (num_groups is None) == (group_size is None):
    raise ValueError(f"give exactly one of num_groups and group_size; got num_groups={num_groups} "
                     f"and group_size={group_size}.")
  name, value = ("num_groups", num_groups) if num_groups is not None else ("group_size", group_size)
  value = check_positive_int(value, name)
  if num_channels % value:
    raise ValueError(f"{name}={value} must divide the number of channels; got {num_channels} "
                     f"channels, which {value} does not divide.")
  return value if group_size is not None else num_channels // value


class Renorm(NamedTuple):
  """Batch renormalization's settings (`batch_renorm`), checked."""
  r_max: Any           # float >= 1, or a traced scalar
  d_max: Any           # float >= 0, or a traced scalar
  warmup_steps: Any    # int >= 0, or a traced integer scalar


def check_renorm(r_max: Any, d_max: Any, warmup_steps: Any) -> Renorm:
  """The checked `Renorm` settings (see `batch_renorm` for the errors)."""
  r_max = real_scalar(r_max, "r_max")
  if not isinstance(r_max, jax.core.Tracer) and not r_max >= 1.0:
    raise ValueError(f"r_max must be >= 1 (r is clipped to [1 / r_max, r_max]; 1 gives r = 1); "
                     f"got r_max={r_max!r}.")
  d_max = real_scalar(d_max, "d_max")
  if not isinstance(d_max, jax.core.Tracer) and not d_max >= 0.0:
    raise ValueError(f"d_max must be >= 0 (d is clipped to [-d_max, d_max]; 0 gives d = 0); got "
                     f"d_max={d_max!r}.")
  return Renorm(r_max, d_max, _check_steps(warmup_steps))


def _check_steps(steps: Any) -> Any:
  """`warmup_steps` as a Python int >= 0, or a traced integer scalar unchanged."""
  if isinstance(steps, jax.core.Tracer) or (hasattr(steps, "dtype") and np.ndim(steps) == 0
                                            and np.issubdtype(steps.dtype, np.integer)):
    if isinstance(steps, jax.core.Tracer):
      if not np.issubdtype(steps.dtype, np.integer) or steps.shape != ():
        raise TypeError(f"warmup_steps must be an integer scalar; got a traced value of dtype "
                        f"{steps.dtype} and shape {steps.shape}.")
      return steps
    steps = int(steps)
  if not is_int(steps):
    raise TypeError(f"warmup_steps must be an int >= 0 (the number of first training steps that "
                    f"are plain batch norm); got warmup_steps={steps!r} (of type "
                    f"{type(steps).__name__}).")
  if steps < 0:
    raise ValueError(f"warmup_steps must be >= 0 (the number of first training steps that are "
                     f"plain batch norm); got warmup_steps={steps!r}.")
  return int(steps)


def check_warmup_fits(renorm: Renorm, count_dtype: Any) -> None:
  """`ValueError` unless a concrete `warmup_steps` fits `stats.count`'s dtype."""
  if isinstance(renorm.warmup_steps, int):
    top = int(jnp.iinfo(count_dtype).max)
    if renorm.warmup_steps > top:
      raise ValueError(f"warmup_steps must be at most {top}, the largest stats.count of dtype "
                       f"{count_dtype} (warmup lasts while count < warmup_steps); got "
                       f"warmup_steps={renorm.warmup_steps}.")
