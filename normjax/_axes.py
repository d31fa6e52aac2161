"""Axis and shape handling shared by every variant: canonical axes, feature shapes, checks.

Every check here runs at trace time on static shapes, and every error names the argument, what
was expected and what was received.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Axes = tuple[int, ...]


def canonicalize_axes(axis: int | Sequence[int], ndim: int, name: str = "axis") -> Axes:
  """Returns `axis` as a sorted tuple of non-negative ints, after range and repeat checks.

  Raises:
    TypeError: if an entry is not an int.
    ValueError: if an entry is outside `[-ndim, ndim)` or an axis is named twice.
  """
  axes = (axis,) if isinstance(axis, (numbers.Integral, np.integer)) else tuple(axis)
  out = []
  for a in axes:
    if isinstance(a, bool) or not isinstance(a, (numbers.Integral, np.integer)):
      raise TypeError(f"{name} must be an int or a tuple of ints; got {axis!r}.")
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
  if isinstance(axis, bool) or not isinstance(axis, (numbers.Integral, np.integer)):
    raise TypeError(f"{name} must be an int; got {axis!r}.")
  return canonicalize_axes(axis, ndim, name)[0]


def check_floating(x: Any, name: str = "x") -> jax.Array:
  """Returns `x` as an array, raising `TypeError` unless its dtype is floating."""
  if not hasattr(x, "dtype"):
    x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"{name} must have a floating dtype (float16, bfloat16, float32, float64); "
                    f"got dtype {x.dtype}.")
  return x


def check_eps(eps: Any) -> None:
  """Raises `ValueError` for a negative (concrete) `eps`."""
  if _is_concrete_number(eps) and not float(eps) >= 0:
    raise ValueError(f"eps must be a non-negative number; got eps={eps!r}.")


def check_momentum(momentum: Any) -> None:
  """Raises `ValueError` unless `momentum` is None or in [0, 1] (when concrete)."""
  if momentum is None:
    return
  if _is_concrete_number(momentum) and not 0.0 <= float(momentum) <= 1.0:
    raise ValueError(
        "momentum must be in [0, 1] (flax/keras convention: new = momentum * old + "
        f"(1 - momentum) * batch; PyTorch's momentum m is 1 - m here) or None; got {momentum!r}.")


def check_param(param: Any, name: str, expected: tuple[int, ...]) -> jax.Array | None:
  """Checks that an optional scale/bias has exactly the feature shape `expected`."""
  if param is None:
    return None
  param = jnp.asarray(param)
  if tuple(param.shape) != tuple(expected):
    raise ValueError(f"{name} must have shape {tuple(expected)} (the feature shape); "
                     f"got shape {tuple(param.shape)}.")
  return param


def check_mask(mask: Any, x_shape: tuple[int, ...]) -> jax.Array | None:
  """Returns `mask` broadcast to `x_shape`; it must be boolean and broadcastable to `x`."""
  if mask is None:
    return None
  mask = jnp.asarray(mask)
  if mask.dtype != jnp.bool_:
    raise TypeError(f"mask must be a boolean array (True marks elements that count in the "
                    f"statistics); got dtype {mask.dtype}.")
  try:
    shape = np.broadcast_shapes(tuple(mask.shape), tuple(x_shape))
  except ValueError:
    shape = None
  if shape != tuple(x_shape):
    raise ValueError(f"mask must be broadcastable to x.shape={tuple(x_shape)}; got mask.shape="
                     f"{tuple(mask.shape)}.")
  return jnp.broadcast_to(mask, x_shape)


def reduced_size(shape: Sequence[int], axes: Axes) -> int:
  """The number of elements each statistic is taken over on this device."""
  return math.prod(shape[a] for a in axes)


def axis_size(axis_name: Any, axis_index_groups: Any = None) -> int | None:
  """The size of a named (mapped) axis group, or None when it cannot be known at trace time."""
  if axis_name is None:
    return 1
  if axis_index_groups is not None:
    return len(axis_index_groups[0])
  try:
    return int(jax.lax.axis_size(axis_name))
  except Exception:  # pylint: disable=broad-except  # not concrete, or no such axis here
    return None


def broadcast_to_axes(param: jax.Array | None, ndim: int, axes: Axes) -> jax.Array | None:
  """Reshapes a parameter of shape `[x.shape[a] for a in axes]` so it broadcasts against `x`.

  An absent parameter (None) stays None.
  """
  if param is None:
    return None
  shape = [1] * ndim
  for a, n in zip(axes, param.shape):
    shape[a] = n
  return param.reshape(shape)


def _is_concrete_number(value: Any) -> bool:
  if isinstance(value, jax.core.Tracer):
    return False
  try:
    float(value)
  except (TypeError, ValueError):
    return False
  return True
