"""Tests of `normjax._src.group`: `group_norm`, `instance_norm` and `normalize_groups`, against
the float64 NumPy references of `tests/reference.py`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from normjax._src import group
from tests import reference as ref
from tests.helpers import rand
from tests.helpers import tolerance

SHAPE = (3, 4, 5, 8)   # NHWC: 3 examples, 4 x 5 positions, 8 channels
EPS = 1e-5


def _inputs(shape=SHAPE, seed=0):
  """`x` with per-channel offsets, and `[C]` scale and bias."""
  c = shape[-1]
  x = rand(shape, seed=seed) * np.float32(2.0) + np.linspace(-4, 4, c, dtype=np.float32)
  return x, rand((c,), seed=seed + 1, loc=1.0), rand((c,), seed=seed + 2)


def _close(got, expected, dtype=jnp.float32):
  rtol, atol = tolerance(dtype)
  np.testing.assert_allclose(np.asarray(got, np.float64), expected, rtol=rtol, atol=atol)


@pytest.mark.parametrize("num_groups", [4])
def test_num_groups_or_group_size(implementation, num_groups):
  """`num_groups=g` and `group_size=C // g` are the same normalization: float64 NumPy's
  statistics per example and group of consecutive channels."""
  del implementation
  x, scale, bias = _inputs()
  expected = ref.group_norm(x, scale, bias, num_groups=num_groups, eps=EPS)
  for kwargs in ({"num_groups": num_groups}, {"group_size": SHAPE[-1] // num_groups}):
    fn = jax.jit(lambda x, s, b, kwargs=kwargs: group.group_norm(x, s, b, eps=EPS, **kwargs))
    _close(fn(x, scale, bias), expected)


def test_one_group_is_a_layer_norm():
  """`num_groups=1`: a layer norm over every non-batch axis (float64 NumPy's), then the
  per-channel scale and bias."""
  x, scale, bias = _inputs(seed=3)
  expected = ref.layer_norm(x, axis=(1, 2, 3), eps=EPS) * np.float64(scale) + np.float64(bias)
  _close(jax.jit(lambda x: group.group_norm(x, scale, bias, num_groups=1, eps=EPS))(x), expected)


def test_group_size_one_is_instance_norm(implementation):
  """`group_size=1` and `instance_norm`: per example and channel over the spatial axes (a float64
  layer norm over axes 1 and 2), then scale and bias."""
  del implementation
  x, scale, bias = _inputs(seed=4)
  expected = ref.layer_norm(x, axis=(1, 2), eps=EPS) * np.float64(scale) + np.float64(bias)
  _close(jax.jit(lambda x: group.group_norm(x, scale, bias, group_size=1, eps=EPS))(x), expected)
  _close(jax.jit(lambda x: group.instance_norm(x, scale, bias, eps=EPS))(x), expected)


@pytest.mark.parametrize("num_groups", [2, 4])
def test_channels_first(num_groups):
  """NCHW with `channel_axis=1` is the NHWC result (float64 NumPy's) transposed."""
  x, scale, bias = _inputs(seed=5)
  expected = ref.group_norm(x, scale, bias, num_groups=num_groups, eps=EPS)
  nchw = np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2)))
  y = jax.jit(lambda x: group.group_norm(x, scale, bias, num_groups=num_groups, channel_axis=1,
                                          eps=EPS))(nchw)
  assert y.shape == nchw.shape
  _close(np.transpose(np.asarray(y), (0, 2, 3, 1)), expected)


@pytest.mark.parametrize("num_groups", [1, 4])
def test_single_example_under_vmap(num_groups):
  """`batch_axis=None` on one example, `jax.vmap`ped over the examples, is the batched
  normalization (float64 NumPy's)."""
  x, scale, bias = _inputs(seed=6)
  expected = ref.group_norm(x, scale, bias, num_groups=num_groups, eps=EPS)
  one = lambda xi: group.group_norm(xi, scale, bias, num_groups=num_groups, batch_axis=None,
                                    eps=EPS)
  _close(jax.jit(jax.vmap(one))(x), expected)


def test_mask():
  """Masked elements take no part in the statistics (float64 NumPy's over the True ones)."""
  x, scale, bias = _inputs(seed=7)
  mask = np.random.default_rng(0).random(SHAPE[:-1] + (1,)) < 0.6
  expected = ref.group_norm(x, scale, bias, num_groups=2, eps=EPS, mask=mask)
  y = jax.jit(lambda x, m: group.group_norm(x, scale, bias, num_groups=2, eps=EPS, mask=m))(
      x, mask)
  _close(y, expected)


@pytest.mark.parametrize("kwargs", [{"num_groups": 1}, {"group_size": 1}, {"num_groups": 3}])
def test_no_channels(kwargs):
  """A 0-channel input comes back unchanged (any group count divides 0)."""
  x = jnp.zeros((2, 3, 0))
  y = group.group_norm(x, **kwargs)
  assert y.shape == x.shape and y.dtype == x.dtype


def test_single_element_per_group():
  """`[N, C]` with `group_size=1` has one element per example and group: `group_norm` and
  `instance_norm` raise; `normalize_groups(single_element=True)` (flax's semantics) returns the
  bias (variance 0), with finite gradients."""
  x, scale, bias = (jnp.asarray(a) for a in _inputs(shape=(4, 6), seed=8))
  with pytest.raises(ValueError, match="more than one element"):
    group.group_norm(x, scale, bias, group_size=1)
  with pytest.raises(ValueError, match="more than one element"):
    group.instance_norm(x, scale, bias)

  def single(x, scale, bias):
    return group.normalize_groups(x, scale, bias, num_groups=None, group_size=1, channel_axis=-1,
                                  batch_axis=0, eps=EPS, mask=None, axis_name=None,
                                  fast_variance=False, single_element=True)

  np.testing.assert_array_equal(np.asarray(single(x, scale, bias)),
                                np.broadcast_to(np.asarray(bias), x.shape))
  grads = jax.jit(jax.grad(lambda *a: jnp.sum(single(*a) ** 2), argnums=(0, 1, 2)))(x, scale,
                                                                                    bias)
  assert all(np.all(np.isfinite(np.asarray(g))) for g in grads)
