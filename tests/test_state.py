"""Tests of `normjax._src.state`: `BatchStats`, `init_batch_stats`, `update_running_stats`,
`SpectralState` and their `jax.export` serialization names."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from normjax._src import state
from tests.helpers import rand

C = 5


def _stats(seed=0, dtype=jnp.float32, count=0):
  """Non-trivial running statistics (mean around 0, var around 1) with `count` batches."""
  mean = rand((C,), seed=seed)
  var = 1.0 + rand((C,), seed=seed + 1, spread=0.1) ** 2
  return state.BatchStats(jnp.asarray(mean, dtype), jnp.asarray(var, dtype),
                          jnp.asarray(count, jnp.int32))


def _f64(a):
  return np.asarray(jnp.asarray(a, jnp.float32), np.float64)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_init_batch_stats(dtype):
  """Mean 0, variance 1, count 0 (int32), in the requested dtype."""
  stats = state.init_batch_stats(3, dtype)
  assert isinstance(stats, state.BatchStats)
  assert stats.mean.dtype == dtype and stats.var.dtype == dtype
  assert stats.count.dtype == jnp.int32 and stats.count.shape == ()
  np.testing.assert_array_equal(_f64(stats.mean), np.zeros(3))
  np.testing.assert_array_equal(_f64(stats.var), np.ones(3))
  assert int(stats.count) == 0


@pytest.mark.parametrize("num_features, dtype, error", [
    (0, jnp.float32, ValueError), (-2, jnp.float32, ValueError), (2.0, jnp.float32, TypeError),
    (True, jnp.float32, TypeError), (2, jnp.int32, TypeError), (2, "no such dtype", TypeError),
])
def test_init_batch_stats_rejects(num_features, dtype, error):
  with pytest.raises(error):
    state.init_batch_stats(num_features, dtype)


@pytest.mark.parametrize("momentum", [0.0, 0.9, 0.99])
def test_update_with_momentum(momentum):
  """`new = m * old + (1 - m) * batch` per channel, in float64; count advances by one."""
  stats = _stats(count=4)
  batch_mean, batch_var = rand((C,), seed=7, loc=3.0), 2.0 + rand((C,), seed=8) ** 2
  new = state.update_running_stats(stats, jnp.asarray(batch_mean), jnp.asarray(batch_var),
                                   jnp.ones((C,), bool), momentum)
  for old, batch, got in ((stats.mean, batch_mean, new.mean), (stats.var, batch_var, new.var)):
    expected = momentum * _f64(old) + (1 - momentum) * np.float64(batch)
    np.testing.assert_allclose(_f64(got), expected, rtol=1e-6, atol=1e-6)
  assert int(new.count) == 5


def test_update_cumulative_average():
  """`momentum=None`: after k batches from fresh statistics, the plain mean of the k batch
  statistics (PyTorch's cumulative moving average), whatever the initial values."""
  stats = _stats(seed=3)
  means = [rand((C,), seed=10 + k, loc=k) for k in range(4)]
  variances = [1.0 + rand((C,), seed=20 + k) ** 2 for k in range(4)]
  update = jax.jit(state.update_running_stats, static_argnums=4)
  for k, (m, v) in enumerate(zip(means, variances, strict=True), start=1):
    stats = update(stats, jnp.asarray(m), jnp.asarray(v), jnp.ones((C,), bool), None)
    assert int(stats.count) == k
    np.testing.assert_allclose(_f64(stats.mean), np.mean(np.float64(means[:k]), axis=0),
                               rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(_f64(stats.var), np.mean(np.float64(variances[:k]), axis=0),
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("momentum", [0.9, None])
def test_channels_without_data_keep_their_values(momentum):
  """Channels whose `has_data` is False keep mean and var bit for bit; the others update; count
  advances (some channel has data)."""
  stats = _stats(count=2)
  has_data = np.array([True, False, True, False, False])
  batch_mean, batch_var = rand((C,), seed=5, loc=2.0), 3.0 + rand((C,), seed=6) ** 2
  new = state.update_running_stats(stats, jnp.asarray(batch_mean), jnp.asarray(batch_var),
                                   jnp.asarray(has_data), momentum)
  weight = 1.0 / 3.0 if momentum is None else 1.0 - momentum
  for old, batch, got in ((stats.mean, batch_mean, new.mean), (stats.var, batch_var, new.var)):
    np.testing.assert_array_equal(np.asarray(got)[~has_data], np.asarray(old)[~has_data])
    expected = _f64(old) + weight * (np.float64(batch) - _f64(old))
    np.testing.assert_allclose(_f64(got)[has_data], expected[has_data], rtol=1e-6)
  assert int(new.count) == 3


@pytest.mark.parametrize("momentum", [0.9, None])
def test_a_batch_without_data_changes_nothing(momentum):
  """All `has_data` False (an empty batch, an all-False mask): the statistics, count included,
  come back unchanged."""
  stats = _stats(count=2)
  new = state.update_running_stats(stats, jnp.full((C,), 50.0), jnp.full((C,), 9.0),
                                   jnp.zeros((C,), bool), momentum)
  for old, got in zip(stats, new, strict=True):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(old))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("momentum", [0.9, None])
def test_update_keeps_dtypes(dtype, momentum):
  """The stored dtypes are those of `stats`, whatever the batch statistics' (float32) are; the
  value is the float32 update rounded once to the stored dtype."""
  stats = _stats(dtype=dtype)
  batch_mean, batch_var = rand((C,), seed=9, loc=1.0), 2.0 + rand((C,), seed=4) ** 2
  new = state.update_running_stats(stats, jnp.asarray(batch_mean), jnp.asarray(batch_var),
                                   jnp.ones((C,), bool), momentum)
  assert new.mean.dtype == dtype and new.var.dtype == dtype and new.count.dtype == jnp.int32
  weight = 1.0 if momentum is None else 1.0 - momentum   # count 0 -> 1: the batch itself
  expected = _f64(stats.mean) + weight * (np.float64(batch_mean) - _f64(stats.mean))
  rtol = 1e-6 if dtype == jnp.float32 else 2 * float(jnp.finfo(dtype).eps)
  np.testing.assert_allclose(_f64(new.mean), expected, rtol=rtol, atol=1e-6)


def test_states_are_pytrees():
  """`BatchStats` (mean, var, count) and `SpectralState` (u, sigma): named tuples whose fields are
  the pytree's leaves, rebuilt as the same type."""
  assert state.BatchStats._fields == ("mean", "var", "count")
  assert state.SpectralState._fields == ("u", "sigma")
  for value in (state.init_batch_stats(2), state.SpectralState(jnp.ones(3), jnp.float32(2.0))):
    leaves, treedef = jax.tree.flatten(value)
    assert len(leaves) == len(value)
    rebuilt = jax.tree.unflatten(treedef, [leaf + 1 for leaf in leaves])
    assert type(rebuilt) is type(value)


def test_export_round_trip():
  """A function returning both states serializes under the names `normjax.BatchStats` and
  `normjax.SpectralState`, and deserializes to a function returning the same types and values."""
  def fn(x):
    return (state.BatchStats(x, x * 2.0, jnp.int32(3)),
            state.SpectralState(x + 1.0, jnp.sum(x)))

  x = jnp.arange(3.0, dtype=jnp.float32)
  blob = bytes(jax.export.export(jax.jit(fn))(x).serialize())
  assert b"normjax.BatchStats" in blob and b"normjax.SpectralState" in blob
  stats, spectral = jax.export.deserialize(bytearray(blob)).call(x)
  assert type(stats) is state.BatchStats and type(spectral) is state.SpectralState
  np.testing.assert_array_equal(np.asarray(stats.var), [0.0, 2.0, 4.0])
  assert int(stats.count) == 3 and stats.count.dtype == jnp.int32
  np.testing.assert_array_equal(np.asarray(spectral.u), [1.0, 2.0, 3.0])
  assert float(spectral.sigma) == 3.0
