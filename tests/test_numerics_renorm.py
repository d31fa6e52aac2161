"""Tests of `normjax._src.numerics.renorm`: `renormalize`, batch renormalization's correction
(Ioffe, 2017)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from normjax._src.numerics.moments import Moments
from normjax._src.numerics.renorm import renormalize
from tests import reference as ref
from tests.helpers import as_dtype
from tests.helpers import rand
from tests.helpers import tolerance

N, C = 16, 6   # every per-channel array is [1, C], as the callers broadcast them
EPS = 1e-3
R_MAX, D_MAX = 1.5, 0.5


def _case(seed=0):
  """`x [N, C]` with per-channel means and spreads, and running statistics some channels'
  `r` and `d` clip against (`sigma_B / sigma` from 0.25 to 4, `|mu_B - mean| / sigma` to 3)."""
  spread = np.array([0.25, 0.8, 1.0, 1.2, 4.0, 1.0], np.float32)
  x = rand((N, C), seed=seed) * spread + np.linspace(-3, 3, C, dtype=np.float32)
  batch_mean, batch_var, _ = ref.moments(x, (0,))
  mean = (batch_mean + np.array([0.0, 0.3, -2.0, 0.1, 3.0, -0.2])).astype(np.float32)
  var = np.ones((1, C), np.float32)
  xhat = (x - batch_mean) / np.sqrt(batch_var + EPS)
  return xhat, batch_mean, batch_var, mean, var


def _expected(xhat, batch_mean, batch_var, mean, var, scale, bias, active):
  """Ioffe (2017) in float64: `(xhat r + d) scale + bias`, `r`, `d` clipped (1, 0 if inactive)."""
  sigma = np.sqrt(np.float64(var) + EPS)
  r = np.clip(np.sqrt(batch_var + EPS) / sigma, 1 / R_MAX, R_MAX) if active else 1.0
  d = np.clip((batch_mean - np.float64(mean)) / sigma, -D_MAX, D_MAX) if active else 0.0
  y = np.float64(xhat) * r + d
  y = y if scale is None else y * np.float64(scale)
  return y if bias is None else y + np.float64(bias)


def _moments(batch_mean, batch_var, split):
  """The batch's `Moments`; `split` stores the mean as a shift plus an offset."""
  mean = jnp.asarray(batch_mean, jnp.float32)
  if not split:
    return Moments(None, mean, jnp.asarray(batch_var, jnp.float32), jnp.full_like(mean, N))
  shift = jnp.round(mean)
  return Moments(shift, mean - shift, jnp.asarray(batch_var, jnp.float32), jnp.full_like(mean, N))


@pytest.mark.parametrize("active", [True, False])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_renormalize_matches_float64(active, affine, split, dtype):
  """Float64 NumPy's Ioffe (2017) `r`, `d`, both clipping (channels 0, 2, 4 clip) and not; with
  `active=False`, `xhat * scale + bias`. The output has `xhat`'s dtype."""
  xhat, batch_mean, batch_var, mean, var = _case()
  ratio = np.sqrt(batch_var + EPS) / np.sqrt(var + EPS)
  shift = (batch_mean - mean) / np.sqrt(var + EPS)
  assert np.any(ratio > R_MAX) and np.any(ratio < 1 / R_MAX)   # the case clips r both ways,
  assert np.any(shift > D_MAX) and np.any(shift < -D_MAX)      # and d
  scale = rand((1, C), seed=3, loc=1.0) if affine else None
  bias = rand((1, C), seed=4) if affine else None
  xj, x64 = as_dtype(xhat, dtype)
  fn = jax.jit(renormalize, static_argnums=(6, 7, 8))
  y = fn(xj, _moments(batch_mean, batch_var, split), jnp.asarray(mean), jnp.asarray(var),
         None if scale is None else jnp.asarray(scale), None if bias is None else jnp.asarray(bias),
         EPS, R_MAX, D_MAX, jnp.asarray(active))
  assert y.dtype == dtype and y.shape == xhat.shape
  expected = _expected(x64, batch_mean, batch_var, mean, var, scale, bias, active)
  if not active and affine:
    np.testing.assert_allclose(expected, x64 * scale + bias, rtol=1e-12)
  rtol, atol = tolerance(dtype)
  np.testing.assert_allclose(np.asarray(y.astype(jnp.float32)), expected, rtol=rtol, atol=atol)


def test_traced_bounds():
  """`r_max`, `d_max` and `eps` may be traced scalars (e.g. a schedule): same result."""
  xhat, batch_mean, batch_var, mean, var = _case(seed=1)
  y = jax.jit(renormalize)(jnp.asarray(xhat, jnp.float32), _moments(batch_mean, batch_var, False),
                           jnp.asarray(mean), jnp.asarray(var), None, None, jnp.float32(EPS),
                           jnp.float32(R_MAX), jnp.float32(D_MAX), jnp.asarray(True))
  expected = _expected(xhat, batch_mean, batch_var, mean, var, None, None, True)
  np.testing.assert_allclose(np.asarray(y), expected, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("active", [True, False])
def test_r_and_d_carry_no_gradient(active):
  """`r` and `d` are constants: the gradient of `sum(g * y)` is zero for the batch moments and the
  running `mean`/`var`, and `g * r * scale` (float64 `r`) for `xhat`."""
  xhat, batch_mean, batch_var, mean, var = _case(seed=2)
  scale, bias, g = rand((1, C), seed=5, loc=1.0), rand((1, C), seed=6), rand((N, C), seed=7)

  def loss(xhat, offset, batch_var, mean, var):
    batch = Moments(None, offset, batch_var, jnp.full_like(offset, N))
    y = renormalize(xhat, batch, mean, var, jnp.asarray(scale), jnp.asarray(bias), EPS, R_MAX,
                    D_MAX, jnp.asarray(active))
    return jnp.sum(jnp.asarray(g) * y)

  args = [jnp.asarray(a, jnp.float32) for a in (xhat, batch_mean, batch_var, mean, var)]
  grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))(*args)
  for grad in grads[1:]:
    np.testing.assert_array_equal(np.asarray(grad), 0.0)
  ones = np.ones_like(np.float64(xhat))
  r = _expected(ones, batch_mean, batch_var, mean, var, None, None, active) - _expected(
      0 * ones, batch_mean, batch_var, mean, var, None, None, active)
  np.testing.assert_allclose(np.asarray(grads[0]), g * r * scale, rtol=1e-5, atol=1e-6)
