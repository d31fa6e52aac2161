"""Masks and cross-device statistics: vmap, pmap, shard_map and jit over sharded arrays.

conftest.py gives the CPU backend four devices (XLA_FLAGS=--xla_force_host_platform_device_count=4).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import normjax as nj
from tests import reference as ref
from tests.helpers import rand

NDEV = 4
needs_devices = pytest.mark.skipif(jax.device_count() < NDEV,
                                   reason=f"needs {NDEV} devices (XLA_FLAGS device count)")


def test_masked_statistics_ignore_padding():
  """Padding values (here huge) do not leak into the statistics of valid elements."""
  x = rand((3, 10, 4), 1)
  lengths = np.array([10, 6, 3])
  mask = np.arange(10)[None, :, None] < lengths[:, None, None]        # [N, L, 1]
  x_padded = np.where(mask, x, 1e6).astype(np.float32)
  y = nj.layer_norm(jnp.asarray(x_padded), mask=jnp.asarray(mask), axis=(1, 2))
  expected = ref.layer_norm(x_padded, axis=(1, 2), mask=mask)
  np.testing.assert_allclose(np.where(mask, y, 0), np.where(mask, expected, 0), rtol=2e-5, atol=2e-5)
  for i, n in enumerate(lengths):   # each sequence alone, without padding
    np.testing.assert_allclose(y[i, :n], ref.layer_norm(x[i, :n], axis=(0, 1)), rtol=2e-5,
                               atol=2e-5)


@pytest.mark.parametrize("name", ["batch_norm", "group_norm", "instance_norm", "rms_norm"])
def test_masked_variants_match_reference(name):
  x = rand((4, 6, 8), 2, loc=1.0)
  mask = rand((4, 6, 1), 3) > -0.3
  xj, mj = jnp.asarray(x), jnp.asarray(mask)
  if name == "batch_norm":
    stats = nj.init_batch_stats(8)
    y, new = nj.batch_norm(xj, None, None, stats, train=True, mask=mj, momentum=0.8,
                           unbiased_running_var=True)
    y_ref, m_ref, v_ref = ref.batch_norm(x, None, None, np.zeros(8), np.ones(8), train=True,
                                         momentum=0.8, mask=mask, unbiased_running_var=True)
    np.testing.assert_allclose(new.mean, m_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(new.var, v_ref, rtol=1e-5, atol=1e-6)
  elif name == "group_norm":
    y, y_ref = nj.group_norm(xj, num_groups=2, mask=mj), ref.group_norm(x, num_groups=2, mask=mask)
  elif name == "instance_norm":
    y, y_ref = nj.instance_norm(xj, mask=mj), ref.instance_norm(x, mask=mask)
  else:
    y, y_ref = nj.rms_norm(xj, mask=mj, axis=(1, 2)), ref.rms_norm(x, axis=(1, 2), mask=mask)
  np.testing.assert_allclose(y, y_ref, rtol=2e-5, atol=2e-5)


def test_batch_norm_in_vmap_equals_whole_batch():
  x = rand((8, 5, 3), 4, loc=2.0)
  scale, bias, stats = jnp.asarray(rand((3,), 5)), jnp.asarray(rand((3,), 6)), nj.init_batch_stats(3)
  per_example = lambda xi: nj.batch_norm(xi, scale, bias, stats, train=True, axis_name="batch")
  y, new = jax.vmap(per_example, axis_name="batch")(jnp.asarray(x))
  y_ref, m_ref, v_ref = ref.batch_norm(x, scale, bias, stats.mean, stats.var, train=True)
  np.testing.assert_allclose(y, y_ref, rtol=2e-5, atol=2e-5)
  np.testing.assert_allclose(new.mean[0], m_ref, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(new.var[3], v_ref, rtol=1e-5, atol=1e-6)
  # A single value per example per channel is fine once the batch axis is named.
  y1, _ = jax.vmap(lambda xi: nj.batch_norm(xi, None, None, stats, train=True, axis_name="b"),
                   axis_name="b")(jnp.asarray(x[:, 0]))
  np.testing.assert_allclose(y1, ref.batch_norm(x[:, 0], None, None, stats.mean, stats.var,
                                                train=True)[0], rtol=2e-5, atol=2e-5)


def test_group_norm_single_example_in_vmap():
  x = rand((3, 4, 4, 6), 7)
  y = jax.vmap(lambda xi: nj.group_norm(xi, num_groups=3, batch_axis=None))(jnp.asarray(x))
  np.testing.assert_allclose(y, ref.group_norm(x, num_groups=3), rtol=2e-5, atol=2e-5)


@needs_devices
def test_pmap_batch_norm_count_weighted_with_uneven_masks():
  """Devices with different numbers of valid elements: sums and counts are psum'd."""
  x = rand((NDEV, 6, 3), 8, loc=1.0, spread=2.0)
  mask = np.zeros((NDEV, 6, 1), bool)
  for d, n in enumerate([6, 1, 3, 5]):
    mask[d, :n] = True
  stats = nj.init_batch_stats(3)
  fn = jax.pmap(lambda x, m: nj.batch_norm(x, None, None, stats, train=True, mask=m,
                                           axis_name="d", momentum=0.0), axis_name="d")
  y, new = fn(jnp.asarray(x), jnp.asarray(mask))
  flat_x, flat_m = x.reshape(-1, 3), mask.reshape(-1, 1)
  y_ref, m_ref, v_ref = ref.batch_norm(flat_x, None, None, np.zeros(3), np.ones(3), train=True,
                                       mask=flat_m, momentum=0.0)
  np.testing.assert_allclose(np.asarray(y).reshape(-1, 3), y_ref, rtol=2e-5, atol=2e-5)
  np.testing.assert_allclose(new.mean[2], m_ref, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(new.var[1], v_ref, rtol=1e-5, atol=1e-6)
  # Not the mean of per-device means:
  per_device = np.mean([x[d, :n].mean(0) for d, n in enumerate([6, 1, 3, 5])], 0)
  assert not np.allclose(new.mean[0], per_device, atol=1e-3)


@needs_devices
def test_pmap_axis_index_groups():
  x = rand((NDEV, 5, 2), 9)
  stats = nj.init_batch_stats(2)
  groups = [[0, 1], [2, 3]]
  fn = jax.pmap(lambda x: nj.batch_norm(x, None, None, stats, train=True, axis_name="d",
                                        axis_index_groups=groups), axis_name="d")
  y, _ = fn(jnp.asarray(x))
  for g in groups:
    y_ref = ref.batch_norm(x[g].reshape(-1, 2), None, None, np.zeros(2), np.ones(2), train=True)[0]
    np.testing.assert_allclose(np.asarray(y)[g].reshape(-1, 2), y_ref, rtol=2e-5, atol=2e-5)


@needs_devices
def test_shard_map_batch_norm_data_parallel():
  mesh = Mesh(np.array(jax.devices()[:NDEV]), ("data",))
  x = rand((8, 4, 3), 10, loc=3.0)
  stats = nj.init_batch_stats(3)

  @functools.partial(jax.shard_map, mesh=mesh, in_specs=P("data"), out_specs=(P("data"), P()))
  def step(x):
    return nj.batch_norm(x, None, None, stats, train=True, axis_name="data", momentum=0.5)

  y, new = jax.jit(step)(jnp.asarray(x))
  y_ref, m_ref, v_ref = ref.batch_norm(x, None, None, np.zeros(3), np.ones(3), train=True,
                                       momentum=0.5)
  np.testing.assert_allclose(y, y_ref, rtol=2e-5, atol=2e-5)
  np.testing.assert_allclose(new.mean, m_ref, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(new.var, v_ref, rtol=1e-5, atol=1e-6)


@needs_devices
def test_shard_map_feature_sharded_layer_norm():
  """A layer norm whose normalized (feature) axis is split across devices."""
  mesh = Mesh(np.array(jax.devices()[:NDEV]), ("model",))
  x, scale, bias = rand((3, 5, 16), 11, loc=1e4), rand((16,), 12), rand((16,), 13)

  @functools.partial(jax.shard_map, mesh=mesh, in_specs=(P(None, None, "model"), P("model"),
                                                         P("model")),
                     out_specs=P(None, None, "model"))
  def sharded(x, s, b):
    return nj.layer_norm(x, s, b, axis_name="model")

  y = jax.jit(sharded)(jnp.asarray(x), jnp.asarray(scale), jnp.asarray(bias))
  np.testing.assert_allclose(y, ref.layer_norm(x, scale, bias), rtol=1e-4, atol=1e-4)


@needs_devices
def test_jit_over_sharded_arrays_needs_no_axis_name():
  mesh = Mesh(np.array(jax.devices()[:NDEV]), ("data",))
  x = jax.device_put(jnp.asarray(rand((8, 6, 4), 14, loc=-2.0)), NamedSharding(mesh, P("data")))
  stats = nj.init_batch_stats(4)
  y, new = jax.jit(lambda x: nj.batch_norm(x, None, None, stats, train=True))(x)
  y_ref, m_ref, _ = ref.batch_norm(np.asarray(x), None, None, np.zeros(4), np.ones(4), train=True)
  np.testing.assert_allclose(y, y_ref, rtol=2e-5, atol=2e-5)
  np.testing.assert_allclose(new.mean, m_ref, rtol=1e-5, atol=1e-6)
  assert y.sharding.is_equivalent_to(x.sharding, x.ndim)
  g = jax.jit(jax.grad(lambda x: jnp.sum(nj.group_norm(x, num_groups=2) ** 3)))(x)
  assert np.all(np.isfinite(np.asarray(g)))


@pytest.mark.parametrize("axis_type", ["Explicit", "Auto"])
def test_jit_over_sharded_arrays_row_normalizations(axis_type):
  """Layer, RMS and channels-first instance norm (the row kernel's cases) under jit with a
  batch-sharded input: explicit mesh axes keep the sharding (XLA's path); auto axes give the
  right values (the CPU kernel runs on the gathered rows, see normjax/_src/kernels/rows.py)."""
  mesh = jax.make_mesh((NDEV,), ("data",),
                       axis_types=(getattr(jax.sharding.AxisType, axis_type),))
  x_host = rand((8, 6, 16), 15, loc=3.0)
  x = jax.device_put(jnp.asarray(x_host), NamedSharding(mesh, P("data")))
  g, b = jnp.asarray(rand((16,), 16)), jnp.asarray(rand((16,), 17))
  gc, bc = g[:6], b[:6]
  cases = [(lambda x: nj.layer_norm(x, g, b), lambda x: ref.layer_norm(x, g, b)),
           (lambda x: nj.rms_norm(x, g), lambda x: ref.rms_norm(x, g, eps=1e-6)),
           (lambda x: nj.instance_norm(x, gc, bc, channel_axis=1),
            lambda x: ref.instance_norm(x, gc, bc, channel_axis=1))]
  for fn, want in cases:
    y = jax.jit(fn)(x)
    np.testing.assert_allclose(y, want(x_host), rtol=2e-5, atol=2e-5)
    if axis_type == "Explicit":
      assert y.sharding.is_equivalent_to(x.sharding, x.ndim)
    loss = lambda x: jnp.sum(jnp.sin(fn(x)))
    np.testing.assert_allclose(jax.jit(jax.grad(loss))(x), jax.grad(loss)(jnp.asarray(x_host)),
                               rtol=1e-4, atol=1e-5)


@needs_devices
def test_shard_map_gradient_through_per_device_kernels(implementation):
  """Per-device statistics (no axis_name) inside shard_map, differentiated with respect to
  replicated parameters: the native kernels' outputs vary over the mesh axis like `x` (the
  gradient used to fail with a custom JVP type error). Oracle: float64 NumPy per shard."""
  mesh = Mesh(np.array(jax.devices()[:NDEV]), ("data",))
  x = rand((8, 3, 3, 5), 18, loc=1.0)
  scale, bias = rand((5,), 19), rand((5,), 20)
  stats = nj.init_batch_stats(5)

  def loss(scale, bias, x):
    y, _ = nj.batch_norm(x, scale, bias, stats, train=True)
    y = nj.layer_norm(y, scale, bias)
    return jax.lax.psum(jnp.sum(y * jnp.arange(5.0).reshape(1, 1, 1, 5)), "data")

  grad = jax.jit(jax.shard_map(jax.grad(loss, argnums=(0, 1)), mesh=mesh,
                               in_specs=(P(), P(), P("data")), out_specs=P()))
  xs = jax.device_put(jnp.asarray(x), NamedSharding(mesh, P("data")))
  got = grad(jnp.asarray(scale), jnp.asarray(bias), xs)

  def loss64(s, b):
    total = 0.0
    for shard in np.split(x.astype(np.float64), NDEV):
      y = ref.batch_norm(shard, s, b, np.zeros(5), np.ones(5), train=True)[0]
      total += np.sum(ref.layer_norm(y, s, b) * np.arange(5.0))
    return total

  def numeric_grad(i):
    args, g = [scale.astype(np.float64), bias.astype(np.float64)], np.zeros(5)
    for c in range(5):
      hi, lo = [a.copy() for a in args], [a.copy() for a in args]
      hi[i][c] += 1e-6
      lo[i][c] -= 1e-6
      g[c] = (loss64(*hi) - loss64(*lo)) / 2e-6
    return g

  for i in range(2):
    np.testing.assert_allclose(got[i], numeric_grad(i), rtol=1e-4, atol=1e-4)
