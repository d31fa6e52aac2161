"""Shared helpers of the Flax wrapper tests (test_linen, test_nnx, test_flax_training)."""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import helpers

SHAPE = (6, 5, 4, 8)  # [N, H, W, C]; C=8 divides into groups of 2 and 4


@pytest.fixture(autouse=True, scope="module")
def fast_compiles():
  """`helpers.fast_compiles` for the whole module (imported by a test module, it applies to
  each of its tests): these tests compile many small programs once each."""
  with helpers.fast_compiles():
    yield


@contextlib.contextmanager
def permissive():
  """flax's own modules are not written for strict promotion (ours must be): run them under
  the standard rules."""
  with jax.numpy_dtype_promotion("standard"), jax.numpy_rank_promotion("allow"):
    yield


def random_init(center):
  """An initializer drawing `center + 0.5 * N(0, 1)`."""
  return lambda key, shape, dtype=jnp.float32: (
      center + 0.5 * jax.random.normal(key, shape)).astype(dtype)


def randomize(variables, key):
  """Random (not default) values for every variable of a tree whose leaves are named `scale`,
  `bias`, `mean`, `var` (in [0.5, 2]) or `count` (kept)."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(variables)
  keys = jax.random.split(key, len(leaves))
  out = []
  for (path, leaf), k in zip(leaves, keys):
    name = path[-1].key
    if name == "var":
      out.append(jax.random.uniform(k, leaf.shape, jnp.float32, 0.5, 2.0).astype(leaf.dtype))
    elif name == "count":
      out.append(leaf)
    else:
      center = 1.0 if name == "scale" else 0.0
      out.append((center + 0.5 * jax.random.normal(k, leaf.shape)).astype(leaf.dtype))
  return jax.tree_util.tree_unflatten(treedef, out)


def data(key, shape=SHAPE, dtype=jnp.float32):
  """`x` of mean 2 and std 3, and a mask that keeps 3 of every 4 elements along any axis."""
  x = 2.0 + 3.0 * jax.random.normal(key, shape)
  mask = sum(np.indices(shape)) % 4 != 0
  return x.astype(dtype), jnp.asarray(mask)


def assert_close(actual, expected, tol=1e-5):
  """Every leaf of `actual` within `tol` (absolute and relative) of `expected`."""
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  jax.tree.map(lambda a, e: np.testing.assert_allclose(np.asarray(a, np.float64),
                                                       np.asarray(e, np.float64),
                                                       rtol=tol, atol=tol), actual, expected)
