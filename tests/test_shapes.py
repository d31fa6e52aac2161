"""Tests of `normjax._src.shapes`: reduced sizes, named-axis sizes, parameter broadcast shapes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from normjax._src import shapes
from tests.helpers import rand


@pytest.mark.parametrize("shape, axes, expected", [
    ((2, 3, 4, 5), (1, 3), 15),
    ((2, 3, 4, 5), (0, 1, 2, 3), 120),
    ((7,), (0,), 7),
    ((2, 3), (), 1),             # nothing reduced: one element per statistic
    ((2, 0, 4), (1, 2), 0),      # an empty axis
])
def test_reduced_size(shape, axes, expected):
  """The product of the sizes of `axes` (and only those)."""
  assert shapes.reduced_size(shape, axes) == expected


def test_axis_size_without_a_named_axis():
  """No axis name: every statistic is local, the group has one member."""
  assert shapes.axis_size(None) == 1


@pytest.mark.parametrize("groups, expected", [([[0, 1], [2, 3]], 2), ([[0, 1, 2, 3]], 4),
                                              ([[0], [1], [2], [3]], 1)])
def test_axis_size_with_index_groups(groups, expected):
  """With `axis_index_groups`, the size of one group (not of the whole axis)."""
  assert shapes.axis_size("i", groups) == expected


@pytest.mark.parametrize("size", [1, 3, 5])
def test_axis_size_inside_vmap(size):
  """The size of a `jax.vmap` axis, known at trace time."""
  seen = []

  def fn(v):
    seen.append(shapes.axis_size("batch"))
    return v

  jax.vmap(fn, axis_name="batch")(jnp.zeros((size,)))
  assert seen == [size]


def test_axis_size_of_an_unbound_name():
  """A name no enclosing transformation binds: unknown (None), not an error."""
  assert shapes.axis_size("no_such_axis") is None


@pytest.mark.parametrize("shape, axes", [((2, 3, 4, 5), (1, 3)), ((2, 3, 4, 5), (3,)),
                                         ((2, 3, 4, 5), (0,)), ((6,), (0,)),
                                         ((2, 3, 4), (0, 1, 2))])
def test_broadcast_to_axes(shape, axes):
  """A `[shape[a] for a in axes]` parameter gets size-1 axes elsewhere, and multiplies `x` as
  NumPy's explicit indexing says: `y[i...] = x[i...] * p[i at axes]`."""
  x = rand(shape, seed=1)
  p = rand([shape[a] for a in axes], seed=2)
  out = shapes.broadcast_to_axes(jnp.asarray(p), len(shape), axes)
  assert out.shape == tuple(shape[a] if a in axes else 1 for a in range(len(shape)))
  expected = np.empty(shape)
  for index in np.ndindex(*shape):
    expected[index] = float(x[index]) * float(p[tuple(index[a] for a in axes)])
  np.testing.assert_allclose(np.asarray(jnp.asarray(x) * out), expected, rtol=1e-6)


def test_broadcast_to_axes_keeps_none():
  """An absent parameter stays absent."""
  assert shapes.broadcast_to_axes(None, 3, (1,)) is None
