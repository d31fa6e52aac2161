"""Every variant against the float64 NumPy reference: jit, layouts, dtypes, odd shapes."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import normjax as nj
from tests import reference as ref
from tests.helpers import as_dtype, maybe_jit, rand, slow_except, tolerance

DTYPES = [jnp.float32, jnp.bfloat16]


def _feature_shape(shape, axis):
  return tuple(shape[a] for a in sorted(a % len(shape) for a in np.atleast_1d(axis)))


@pytest.mark.parametrize("use_jit", slow_except([False, True], True))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", [
    ((4, 7, 16), -1), ((3, 5, 6), (1, 2)), ((2, 3, 4, 5), (0, 2)), ((6, 1), -1), ((5, 33), 1),
    ((3, 5, 6), (-1, -3)),
])
def test_layer_norm(use_jit, dtype, shape, axis):
  """The scale and bias have the shape of the normalized axes in increasing order."""
  x, x64 = as_dtype(rand(shape, 1, loc=3.0), dtype)
  fshape = _feature_shape(shape, axis)
  scale, bias = rand(fshape, 2), rand(fshape, 3)
  fn = maybe_jit(functools.partial(nj.layer_norm, axis=axis, eps=1e-3), use_jit)
  y = fn(x, jnp.asarray(scale), jnp.asarray(bias))
  assert y.dtype == dtype and y.shape == shape
  rtol, atol = tolerance(dtype)
  np.testing.assert_allclose(np.asarray(y, np.float64),
                             ref.layer_norm(x64, scale, bias, axis=axis, eps=1e-3), rtol, atol)


@pytest.mark.parametrize("use_jit", slow_except([False, True], True))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", [((4, 7, 16), -1), ((3, 5, 6), (1, 2)), ((2, 9), 0),
                                        ((3, 5, 6), (2, 0))])
def test_rms_norm(use_jit, dtype, shape, axis):
  x, x64 = as_dtype(rand(shape, 4, loc=0.5), dtype)
  scale = rand(_feature_shape(shape, axis), 5)
  fn = maybe_jit(functools.partial(nj.rms_norm, axis=axis), use_jit)
  y = fn(x, jnp.asarray(scale))
  assert y.dtype == dtype
  rtol, atol = tolerance(dtype)
  np.testing.assert_allclose(np.asarray(y, np.float64), ref.rms_norm(x64, scale, axis=axis),
                             rtol, atol)


def test_rms_norm_is_not_layer_norm():
  x = rand((3, 8), 6, loc=2.0)
  y = np.asarray(nj.rms_norm(jnp.asarray(x), eps=0.0))
  np.testing.assert_allclose(y, x / np.sqrt((x.astype(np.float64) ** 2).mean(-1, keepdims=True)),
                             rtol=1e-5)
  assert not np.allclose(y, ref.layer_norm(x, eps=0.0), atol=1e-2)


LAYOUTS = [  # (shape, channel_axis, batch_axis)
    ((4, 5, 6, 8), -1, 0),    # NHWC
    ((4, 8, 5, 6), 1, 0),     # NCHW
    ((3, 7, 12), -1, 0),      # NLC
    ((5, 6, 8), -1, None),    # one example, HWC (as inside vmap)
    ((8, 5, 6), 0, None),     # one example, CHW
    ((2, 8, 1, 1), 1, 0),     # 1x1 spatial (needs in-group channels)
]


@pytest.mark.parametrize("use_jit", slow_except([False, True], True))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,channel_axis,batch_axis",
                         slow_except(LAYOUTS, *LAYOUTS[1::2], unpack=True))
@pytest.mark.parametrize("groups", slow_except([1, 2, 4], 2))
def test_group_norm(use_jit, dtype, shape, channel_axis, batch_axis, groups):
  x, x64 = as_dtype(rand(shape, 7, loc=-2.0, spread=3.0), dtype)
  c = shape[channel_axis]
  scale, bias = rand((c,), 8), rand((c,), 9)
  fn = maybe_jit(functools.partial(nj.group_norm, num_groups=groups, channel_axis=channel_axis,
                                   batch_axis=batch_axis), use_jit)
  y = fn(x, jnp.asarray(scale), jnp.asarray(bias))
  assert y.dtype == dtype and y.shape == shape
  expected = ref.group_norm(x64, scale, bias, num_groups=groups, channel_axis=channel_axis,
                            batch_axis=batch_axis)
  rtol, atol = tolerance(dtype)
  np.testing.assert_allclose(np.asarray(y, np.float64), expected, rtol, atol)
  # group_size is the same grouping, stated the other way round.
  y2 = nj.group_norm(x, jnp.asarray(scale), jnp.asarray(bias), group_size=c // groups,
                     channel_axis=channel_axis, batch_axis=batch_axis)
  np.testing.assert_allclose(np.asarray(y2, np.float64), expected, rtol, atol)


@pytest.mark.parametrize("use_jit", slow_except([False, True], True))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,channel_axis,batch_axis", LAYOUTS[:5])
def test_instance_norm(use_jit, dtype, shape, channel_axis, batch_axis):
  x, x64 = as_dtype(rand(shape, 10, loc=1.0, spread=2.0), dtype)
  c = shape[channel_axis]
  scale, bias = rand((c,), 11), rand((c,), 12)
  fn = maybe_jit(functools.partial(nj.instance_norm, channel_axis=channel_axis,
                                   batch_axis=batch_axis), use_jit)
  y = fn(x, jnp.asarray(scale), jnp.asarray(bias))
  assert y.dtype == dtype
  rtol, atol = tolerance(dtype)
  np.testing.assert_allclose(
      np.asarray(y, np.float64),
      ref.instance_norm(x64, scale, bias, channel_axis=channel_axis, batch_axis=batch_axis),
      rtol, atol)


def test_group_norm_equivalences():
  """flax's documented identities: num_groups=1 is a layer norm, group_size=1 instance norm."""
  x = jnp.asarray(rand((3, 4, 5, 6), 13, loc=1.0))
  np.testing.assert_allclose(nj.group_norm(x, num_groups=1),
                             ref.layer_norm(x, axis=(1, 2, 3)), rtol=2e-5, atol=2e-5)
  np.testing.assert_allclose(nj.group_norm(x, group_size=1), nj.instance_norm(x),
                             rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("use_jit", slow_except([False, True], True))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,channel_axis", [((8, 5, 5, 6), -1), ((8, 6, 5, 5), 1),
                                                ((16, 3), -1), ((2, 9, 4), 1)])
@pytest.mark.parametrize("momentum", slow_except([0.9, None], None))
def test_batch_norm_train_and_eval(use_jit, dtype, shape, channel_axis, momentum):
  c = shape[channel_axis]
  scale, bias = rand((c,), 14), rand((c,), 15)
  stats = nj.BatchStats(jnp.asarray(rand((c,), 16)), jnp.asarray(1.0 + rand((c,), 17) ** 2),
                        jnp.asarray(3, jnp.int32))
  train = maybe_jit(functools.partial(nj.batch_norm, train=True, channel_axis=channel_axis,
                                      momentum=momentum), use_jit)
  x, x64 = as_dtype(rand(shape, 18, loc=2.0, spread=1.5), dtype)
  y, new = train(x, jnp.asarray(scale), jnp.asarray(bias), stats)
  y_ref, mean_ref, var_ref = ref.batch_norm(x64, scale, bias, stats.mean, stats.var, train=True,
                                            channel_axis=channel_axis, momentum=momentum, count=3)
  rtol, atol = tolerance(dtype)
  assert y.dtype == dtype
  np.testing.assert_allclose(np.asarray(y, np.float64), y_ref, rtol, atol)
  np.testing.assert_allclose(new.mean, mean_ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(new.var, var_ref, rtol=1e-5, atol=1e-5)
  assert new.mean.dtype == jnp.float32 and int(new.count) == 4

  evaluate = maybe_jit(functools.partial(nj.batch_norm, train=False, channel_axis=channel_axis,
                                         momentum=momentum), use_jit)
  y_eval, same = evaluate(x, jnp.asarray(scale), jnp.asarray(bias), new)
  y_eval_ref, _, _ = ref.batch_norm(x64, scale, bias, new.mean, new.var, train=False,
                                    channel_axis=channel_axis)
  np.testing.assert_allclose(np.asarray(y_eval, np.float64), y_eval_ref, rtol, atol)
  for a, b in zip(same, new):
    np.testing.assert_array_equal(a, b)   # eval never changes the state


def test_batch_norm_momentum_semantics():
  """new = m * old + (1 - m) * batch; m=1 freezes the stats, m=0 replaces them."""
  x = jnp.asarray(rand((32, 3), 19, loc=5.0))
  stats = nj.init_batch_stats(3)
  _, frozen = nj.batch_norm(x, None, None, stats, train=True, momentum=1.0)
  np.testing.assert_array_equal(frozen.mean, stats.mean)
  np.testing.assert_array_equal(frozen.var, stats.var)
  _, replaced = nj.batch_norm(x, None, None, stats, train=True, momentum=0.0)
  np.testing.assert_allclose(replaced.mean, np.asarray(x, np.float64).mean(0), rtol=1e-6)
  np.testing.assert_allclose(replaced.var, np.asarray(x, np.float64).var(0), rtol=1e-5)


def test_batch_norm_cumulative_average():
  """momentum=None: after k batches the running mean is the plain average of the k means."""
  stats = nj.init_batch_stats(4)
  batches = [rand((10, 4), 20 + i, loc=float(i)) for i in range(5)]
  for xb in batches:
    _, stats = nj.batch_norm(jnp.asarray(xb), None, None, stats, train=True, momentum=None,
                             unbiased_running_var=True)
  np.testing.assert_allclose(stats.mean, np.mean([b.astype(np.float64).mean(0) for b in batches], 0),
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(stats.var, np.mean([b.astype(np.float64).var(0, ddof=1)
                                                 for b in batches], 0), rtol=1e-5)
  assert int(stats.count) == 5


def test_batch_norm_unbiased_running_var_only_changes_the_stored_var():
  x = jnp.asarray(rand((6, 3), 26))
  stats = nj.init_batch_stats(3)
  y_b, s_b = nj.batch_norm(x, None, None, stats, train=True, momentum=0.0)
  y_u, s_u = nj.batch_norm(x, None, None, stats, train=True, momentum=0.0,
                           unbiased_running_var=True)
  np.testing.assert_array_equal(y_b, y_u)
  np.testing.assert_allclose(s_u.var, np.asarray(x, np.float64).var(0, ddof=1), rtol=1e-5)
  np.testing.assert_allclose(s_b.var, np.asarray(x, np.float64).var(0, ddof=0), rtol=1e-5)


def test_init_batch_stats():
  s = nj.init_batch_stats(5)
  assert isinstance(s, nj.BatchStats)
  np.testing.assert_array_equal(s.mean, np.zeros(5))
  np.testing.assert_array_equal(s.var, np.ones(5))
  assert s.count.dtype == jnp.int32 and s.count.shape == () and int(s.count) == 0
  assert s.mean.dtype == jnp.float32
  assert len(jax.tree.leaves(s)) == 3


def test_no_affine_and_scale_only():
  x = jnp.asarray(rand((4, 6), 27))
  scale = rand((6,), 28)
  np.testing.assert_allclose(nj.layer_norm(x, jnp.asarray(scale)),
                             ref.layer_norm(x, scale, None), rtol=2e-5, atol=2e-5)
  np.testing.assert_allclose(nj.layer_norm(x), ref.layer_norm(x), rtol=2e-5, atol=2e-5)
