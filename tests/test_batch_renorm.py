"""Batch renormalization against a float64 NumPy implementation of Ioffe (2017)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import normjax as nj
from tests import reference as ref
from tests.helpers import as_dtype, rand, slow_except, tolerance


def renorm_ref(x, scale, bias, mean, var, *, channel_axis, momentum, eps, r_max, d_max,
               active, mask=None):
  """Returns (y, new_mean, new_var, r, d, xhat, sigma_b), float64, from the paper's formulas."""
  x = np.asarray(x, np.float64)
  c = channel_axis % x.ndim
  axes = tuple(a for a in range(x.ndim) if a != c)
  shape = [1] * x.ndim
  shape[c] = x.shape[c]
  mu_b, var_b, _ = ref.moments(x, axes, mask)
  sigma_b = np.sqrt(var_b + eps)
  sigma = np.sqrt(np.asarray(var, np.float64).reshape(shape) + eps)
  r = np.clip(sigma_b / sigma, 1 / r_max, r_max) if active else np.ones_like(sigma)
  d = (np.clip((mu_b - np.asarray(mean, np.float64).reshape(shape)) / sigma, -d_max, d_max)
       if active else np.zeros_like(sigma))
  xhat = (x - mu_b) / sigma_b
  s = np.asarray(scale, np.float64).reshape(shape)
  b = np.asarray(bias, np.float64).reshape(shape)
  y = (xhat * r + d) * s + b
  new_mean = momentum * np.asarray(mean, np.float64) + (1 - momentum) * mu_b.reshape(-1)
  new_var = momentum * np.asarray(var, np.float64) + (1 - momentum) * var_b.reshape(-1)
  return y, new_mean, new_var, r, d, xhat, sigma_b


@pytest.mark.parametrize("use_jit", slow_except([False, True], True))
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("shape,channel_axis", [((16, 5), -1), ((4, 3, 3, 6), -1),
                                                ((4, 6, 3, 3), 1)])
def test_steps_through_warmup(use_jit, dtype, shape, channel_axis):
  c = shape[channel_axis]
  scale, bias = rand((c,), 1) + 1.0, rand((c,), 2)
  fn = functools.partial(nj.batch_renorm, train=True, r_max=1.5, d_max=0.5, warmup_steps=2,
                         channel_axis=channel_axis, momentum=0.7, eps=1e-3)
  fn = jax.jit(fn) if use_jit else fn
  stats = nj.init_batch_stats(c)
  mean, var = np.zeros(c), np.ones(c)
  clipped = False
  for step in range(5):
    # Shifting, widening batches: the running statistics lag, so r and d clip after warmup.
    x, x64 = as_dtype(rand(shape, 10 + step, loc=1.0 + step, spread=2.0 + step), dtype)
    y, stats = fn(x, jnp.asarray(scale), jnp.asarray(bias), stats)
    y_ref, mean, var, r, d, _, _ = renorm_ref(
        x64, scale, bias, mean, var, channel_axis=channel_axis, momentum=0.7, eps=1e-3,
        r_max=1.5, d_max=0.5, active=step >= 2)
    clipped |= bool(np.any(r == 1.5) and np.any(np.abs(d) == 0.5))
    rtol, atol = tolerance(dtype)
    np.testing.assert_allclose(np.asarray(y, np.float64), y_ref, rtol, 4 * atol)
    np.testing.assert_allclose(stats.mean, mean, 1e-5, 1e-5)
    np.testing.assert_allclose(stats.var, var, 1e-5, 1e-5)
    assert int(stats.count) == step + 1 and y.dtype == dtype
  assert clipped   # the clipping was exercised


def test_gradients_do_not_flow_through_r_and_d():
  shape, c = (6, 2, 4), 4
  x = rand(shape, 3, loc=2.0, spread=3.0)
  scale, bias, g = rand((c,), 4) + 1.0, rand((c,), 5), rand(shape, 6)
  mean, var = rand((c,), 7), np.abs(rand((c,), 8)) + 0.5
  stats = nj.BatchStats(jnp.asarray(mean), jnp.asarray(var), jnp.asarray(3, jnp.int32))

  def loss(x, scale, bias):
    y, _ = nj.batch_renorm(x, scale, bias, stats, train=True, r_max=3.0, d_max=5.0, eps=1e-2)
    return jnp.sum(y * g)
  dx, dscale, dbias = jax.grad(loss, argnums=(0, 1, 2))(*map(jnp.asarray, (x, scale, bias)))

  _, _, _, r, d, xhat, sigma_b = renorm_ref(x, scale, bias, mean, var, channel_axis=-1,
                                            momentum=0.99, eps=1e-2, r_max=3.0, d_max=5.0,
                                            active=True)
  axes = (0, 1)
  # Batch norm's backward with the constant effective scale r * scale.
  g64 = g.astype(np.float64)
  dx_ref = (r * scale / sigma_b) * (g64 - g64.mean(axes, keepdims=True)
                                    - xhat * (g64 * xhat).mean(axes, keepdims=True))
  np.testing.assert_allclose(dx, dx_ref, 1e-4, 1e-4)
  np.testing.assert_allclose(dscale, (g64 * (xhat * r + d)).sum(axes), 1e-4, 1e-4)
  np.testing.assert_allclose(dbias, g64.sum(axes), 1e-4, 1e-4)
  assert np.any(np.abs(r - 1) > 1e-3) and np.any(np.abs(d) > 1e-3)   # r, d are not trivial


def test_traced_bounds_and_batch_norm_identity():
  x = jnp.asarray(rand((8, 3), 11, loc=2.0, spread=3.0))
  stats = nj.BatchStats(jnp.asarray(rand((3,), 12)), jnp.ones(3), jnp.asarray(5, jnp.int32))

  @jax.jit
  def step(r_max, d_max):
    return nj.batch_renorm(x, None, None, stats, train=True, r_max=r_max, d_max=d_max)
  y_bn, s_bn = nj.batch_norm(x, None, None, stats, train=True)
  y, s = step(1.0, 0.0)    # r_max = 1, d_max = 0 is batch norm
  np.testing.assert_allclose(y, y_bn, 1e-6, 1e-6)
  np.testing.assert_allclose(s.var, s_bn.var, 1e-7)
  y2, _ = step(3.0, 5.0)   # the same compiled step with another schedule value
  assert not np.allclose(y2, y_bn, atol=1e-3)


def test_mask_and_eval():
  x = rand((6, 4), 13, loc=1.0)
  mask = np.array([True, True, False, True, True, False])[:, None]
  mean, var = rand((4,), 14), np.ones(4) * 2.0
  stats = nj.BatchStats(jnp.asarray(mean), jnp.asarray(var), jnp.asarray(0, jnp.int32))
  ones, zeros = np.ones(4, np.float32), np.zeros(4, np.float32)
  y, new = nj.batch_renorm(jnp.asarray(x), ones, zeros, stats, train=True, momentum=0.5,
                           mask=jnp.asarray(mask))
  y_ref, m, v, *_ = renorm_ref(x, ones, zeros, mean, var, channel_axis=-1, momentum=0.5,
                               eps=1e-5, r_max=3.0, d_max=5.0, active=True, mask=mask)
  np.testing.assert_allclose(y, y_ref, 1e-5, 1e-5)
  np.testing.assert_allclose(new.mean, m, 1e-5, 1e-6)
  y_eval, same = nj.batch_renorm(jnp.asarray(x), ones, zeros, stats, train=False)
  y_bn, _ = nj.batch_norm(jnp.asarray(x), ones, zeros, stats, train=False)
  np.testing.assert_array_equal(y_eval, y_bn)
  assert same is stats


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(r_max=0.5), ValueError, "r_max must be >= 1"),
    (dict(d_max=-1.0), ValueError, "d_max must be >= 0"),
    (dict(warmup_steps=-1), ValueError, "warmup_steps must be >= 0"),
    (dict(warmup_steps=1.5), TypeError, "warmup_steps must be an int"),
    (dict(r_max="3"), TypeError, "r_max must be"),
])
def test_bad_arguments(kwargs, error, match):
  with pytest.raises(error, match=match):
    nj.batch_renorm(jnp.ones((4, 2)), None, None, nj.init_batch_stats(2), train=True, **kwargs)
