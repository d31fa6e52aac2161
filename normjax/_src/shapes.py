"""Shape arithmetic shared by the variants: axes tuples, reduced sizes, broadcast shapes."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any
from typing import overload

import jax

Axes = tuple[int, ...]  # canonical axes: sorted, non-negative, distinct


def varying_axes(aval: Any) -> frozenset[str]:
  """The `shard_map` mesh axes an abstract value varies over (none outside `shard_map`)."""
  return getattr(getattr(aval, "manual_axis_type", None), "varying", frozenset())


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


@overload
def broadcast_to_axes(param: None, ndim: int, axes: Axes) -> None: ...
@overload
def broadcast_to_axes(param: jax.Array, ndim: int, axes: Axes) -> jax.Array: ...
@overload
def broadcast_to_axes(param: jax.Array | None, ndim: int, axes: Axes) -> jax.Array | None: ...
def broadcast_to_axes(param: jax.Array | None, ndim: int, axes: Axes) -> jax.Array | None:
  """Reshapes a parameter of shape `[x.shape[a] for a in axes]` so it broadcasts against `x`.

  An absent parameter (None) stays None.
  """
  if param is None:
    return None
  shape = [1] * ndim
  for a, n in zip(axes, param.shape, strict=False):
    shape[a] = n
  return param.reshape(shape)

