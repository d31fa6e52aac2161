"""Weight standardization, weight norm and spectral norm (normjax/_src/weights.py) vs float64 NumPy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import normjax as nj
from tests import reference as ref
from tests.helpers import as_dtype, maybe_jit, rand, tolerance


@pytest.mark.parametrize("use_jit", [False, True])
@pytest.mark.parametrize("shape, axis", [((5, 4), None), ((3, 3, 4, 6), None),
                                         ((3, 3, 4, 6), (0, 1)), ((4, 6), 1)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_weight_standardize(use_jit, shape, axis, dtype):
  w, w64 = as_dtype(rand(shape, 0, loc=0.5), dtype)
  y = maybe_jit(lambda w: nj.weight_standardize(w, axis=axis, eps=1e-4), use_jit)(w)
  assert y.dtype == dtype and y.shape == shape
  np.testing.assert_allclose(np.asarray(y, np.float64),
                             ref.weight_standardize(w64, axis=axis, eps=1e-4), *tolerance(dtype))


@pytest.mark.parametrize("use_jit", [False, True])
@pytest.mark.parametrize("shape, axis, with_g", [((5, 4), None, True), ((5, 4), None, False),
                                                 ((3, 3, 2, 6), None, True), ((4, 6), 1, True),
                                                 ((4, 6), (0, 1), True), ((6,), None, True)])
def test_weight_norm(use_jit, shape, axis, with_g):
  v = rand(shape, 1)
  axes = tuple(range(len(shape) - 1)) if axis is None else tuple(np.atleast_1d(axis) % len(shape))
  g = rand(tuple(n for a, n in enumerate(shape) if a not in axes), 2) if with_g else None
  y = maybe_jit(lambda v, g: nj.weight_norm(v, g, axis=axis), use_jit)(v, g)
  np.testing.assert_allclose(y, ref.weight_norm(v, g, axis=axis), rtol=2e-5, atol=2e-6)


def test_weight_norm_has_norm_g_and_grad():
  v, g = jnp.asarray(rand((7, 3), 3)), jnp.array([1.0, 2.0, 3.0])
  np.testing.assert_allclose(jnp.linalg.norm(nj.weight_norm(v, g), axis=0), g, rtol=1e-5)
  # d/dv of sum(w * c) where w = v / ||v|| (column-wise): (c - w (w . c)) / ||v||.
  c = rand((7, 3), 4).astype(np.float64)
  gv = jax.grad(lambda v: jnp.sum(nj.weight_norm(v) * c.astype(np.float32)))(v)
  v64 = np.asarray(v, np.float64)
  n = np.linalg.norm(v64, axis=0)
  w = v64 / n
  np.testing.assert_allclose(gv, (c - w * (w * c).sum(0)) / n, rtol=1e-4, atol=1e-5)


def test_spectral_sigma_converges_to_svd():
  w = rand((4, 3, 5), 5)
  state = nj.init_spectral_state(w, jax.random.key(0))
  assert state.u.shape == (5,) and state.sigma.shape == ()
  np.testing.assert_allclose(np.linalg.norm(state.u), 1.0, rtol=1e-6)
  w_sn, new = nj.spectral_normalize(w, state, train=True, n_steps=200)
  top = np.linalg.svd(w.reshape(-1, 5).astype(np.float64), compute_uv=False)[0]
  np.testing.assert_allclose(new.sigma, top, rtol=1e-5)
  np.testing.assert_allclose(np.linalg.svd(np.asarray(w_sn, np.float64).reshape(-1, 5),
                                           compute_uv=False)[0], 1.0, rtol=1e-5)


@pytest.mark.parametrize("n_steps", [1, 3])
@pytest.mark.parametrize("use_jit", [False, True])
def test_spectral_matches_reference_power_iteration(n_steps, use_jit):
  w = rand((6, 4), 6)
  state = nj.init_spectral_state(w, jax.random.key(1))
  fn = maybe_jit(lambda w, s: nj.spectral_normalize(w, s, train=True, n_steps=n_steps), use_jit)
  w_sn, new = fn(w, state)
  u, sigma = ref.power_iteration(w, state.u, n_steps)
  np.testing.assert_allclose(new.u, u, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(new.sigma, sigma, rtol=1e-5)
  np.testing.assert_allclose(w_sn, w / sigma, rtol=1e-5, atol=1e-6)
  assert new.u.dtype == state.u.dtype and w_sn.dtype == w.dtype


def _kernels_with_a_gap(scales, seed):
  """[8, 4] kernels with singular values `scale * (3, 1, 0.5, 0.2)`, and a zero one for 0."""
  rng = np.random.default_rng(seed)
  left, _ = np.linalg.qr(rng.standard_normal((8, 4)))
  right, _ = np.linalg.qr(rng.standard_normal((4, 4)))
  base = left @ np.diag([3.0, 1.0, 0.5, 0.2]) @ right.T
  return [(scale * base).astype(np.float32) for scale in scales]


def test_spectral_zero_and_tiny_kernels_match_float64_reference(implementation):
  """Over 80 training steps through zero, 1e-7, ordinary, 1e6 and zero again: u and sigma
  follow the float64 power iteration with PyTorch's x / max(||x||, eps) (a zero kernel keeps
  u), and every nonzero kernel comes out with spectral norm 1. Before, a zero kernel set u to
  0 for good and a 1e-7 one shrank u at every step (spectral norms 33, 2.4e3, ... 1e31)."""
  kernels = _kernels_with_a_gap((0.0, 1e-7, 1.0, 1e6, 0.0, 1e-7), seed=20)
  state = nj.init_spectral_state(jnp.asarray(kernels[0]), jax.random.key(4))
  step = jax.jit(lambda w, s: nj.spectral_normalize(w, s, train=True))
  u_ref = np.asarray(state.u, np.float64)
  for w in kernels:
    for i in range(15):
      w_sn, state = step(jnp.asarray(w), state)
      u_ref, sigma_ref = ref.power_iteration(w, u_ref, 1)
      np.testing.assert_allclose(state.u, u_ref, rtol=1e-4, atol=1e-5)
      np.testing.assert_allclose(state.sigma, sigma_ref, rtol=1e-4)
      np.testing.assert_allclose(np.linalg.norm(state.u), 1.0, rtol=1e-5)
      top = np.linalg.svd(np.asarray(w_sn, np.float64), compute_uv=False)[0]
      if not w.any():
        assert state.sigma == 0 and not np.asarray(w_sn).any()   # divided by 1
      elif i >= 5:
        np.testing.assert_allclose(top, 1.0, rtol=1e-5)


def test_spectral_eval_uses_stored_sigma():
  w = rand((6, 4), 7)
  state = nj.SpectralState(u=jnp.asarray(rand((4,), 8)), sigma=jnp.float32(2.5))
  w_sn, new = nj.spectral_normalize(w, state, train=False)
  np.testing.assert_allclose(w_sn, w / 2.5, rtol=1e-6)
  assert new is state


def test_spectral_no_gradient_through_state():
  w = jnp.asarray(rand((6, 4), 9))
  state = nj.init_spectral_state(w, jax.random.key(2))
  # The returned state carries no gradient.
  g = jax.grad(lambda w: nj.spectral_normalize(w, state, train=True)[1].sigma)(w)
  np.testing.assert_array_equal(g, np.zeros_like(g))
  gu = jax.grad(lambda u: jnp.sum(nj.spectral_normalize(w, state._replace(u=u), train=True)[1].u))(
      state.u)
  np.testing.assert_array_equal(gu, np.zeros_like(gu))
  # The normalized kernel differentiates through sigma = v^T W u with u, v constant:
  # d sum(W/sigma * c) = c / sigma - sum(W * c) / sigma**2 * v u^T.
  c = rand((6, 4), 10).astype(np.float64)
  gw = jax.grad(lambda w: jnp.sum(nj.spectral_normalize(w, state, train=True)[0]
                                  * c.astype(np.float32)))(w)
  w64 = np.asarray(w, np.float64)
  l2 = lambda a: a / max(np.linalg.norm(a), 1e-12)
  v = l2(w64 @ np.asarray(state.u, np.float64))
  u = l2(w64.T @ v)
  sigma = v @ w64 @ u
  np.testing.assert_allclose(gw, c / sigma - np.sum(w64 * c) / sigma**2 * np.outer(v, u),
                             rtol=1e-4, atol=1e-5)


def test_spectral_vmap_over_kernels():
  ws = jnp.asarray(rand((3, 5, 4), 11))
  states = jax.vmap(nj.init_spectral_state)(ws, jax.random.split(jax.random.key(3), 3))
  w_sn, new = jax.vmap(lambda w, s: nj.spectral_normalize(w, s, train=True, n_steps=2))(ws, states)
  for i in range(3):
    u, sigma = ref.power_iteration(ws[i], states.u[i], 2)
    np.testing.assert_allclose(new.sigma[i], sigma, rtol=1e-5)
    np.testing.assert_allclose(w_sn[i], np.asarray(ws[i]) / sigma, rtol=1e-5, atol=1e-6)


_STATE = nj.SpectralState(u=jnp.ones(3), sigma=jnp.ones(()))


@pytest.mark.parametrize("call, err, match", [
    (lambda: nj.weight_standardize(jnp.ones(3)), ValueError, "at least one axis"),
    (lambda: nj.weight_standardize(jnp.ones((2, 3)), eps=-1.0), ValueError, "eps"),
    (lambda: nj.weight_standardize(jnp.ones((2, 3), jnp.int32)), TypeError, "kernel"),
    (lambda: nj.weight_norm(jnp.ones((2, 3)), jnp.ones(2)), ValueError,
     r"g must have shape \(3,\)"),
    (lambda: nj.weight_norm(jnp.ones((2, 3)), axis=2), ValueError, "axis"),
    (lambda: nj.init_spectral_state(jnp.ones(3), jax.random.key(0)), ValueError, "rank >= 2"),
    (lambda: nj.spectral_normalize(jnp.ones(3), _STATE, train=True), ValueError, "rank >= 2"),
    (lambda: nj.spectral_normalize(jnp.ones((2, 3)), _STATE, train=True, n_steps=0), ValueError,
     "n_steps"),
    (lambda: nj.spectral_normalize(jnp.ones((2, 3)), _STATE, train=True, n_steps=1.0), TypeError,
     "n_steps"),
    (lambda: nj.spectral_normalize(jnp.ones((2, 4)), _STATE, train=True), ValueError,
     r"u of shape \(4,\)"),
    (lambda: nj.spectral_normalize(jnp.ones((2, 3)), _STATE, train="yes"), TypeError, "train"),
    (lambda: nj.spectral_normalize(jnp.ones((2, 3)), (jnp.ones(3), jnp.ones(())), train=True),
     TypeError, "SpectralState"),
])
def test_errors(call, err, match):
  with pytest.raises(err, match=match):
    call()
