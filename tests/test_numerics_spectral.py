"""Tests of `normjax._src.numerics.spectral`: `l2_normalize` and `power_iteration`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from normjax._src.numerics import spectral
from tests import reference as ref
from tests.helpers import rand

EPS = 1e-12


def _l2(v, eps):
  """PyTorch's `F.normalize` in float64: `v / max(||v||, eps)` over the last axis (0 stays 0)."""
  v = np.float64(v)
  norm = np.sqrt(np.sum(v * v, axis=-1, keepdims=True))
  floor = np.maximum(norm, eps)
  return v / np.where(floor > 0, floor, 1.0)


def _with_norm(norm, seed):
  v = rand((6,), seed=seed, dtype=np.float64)
  return (v * (norm / np.linalg.norm(v))).astype(np.float32)


@pytest.mark.parametrize("name, v, eps", [
    ("random", rand((5,), seed=1), EPS),
    ("batch of rows", rand((3, 4, 6), seed=2, spread=10.0), EPS),
    ("zero", np.zeros((4,), np.float32), EPS),
    ("norm 1e-7", _with_norm(1e-7, seed=3), EPS),
    ("norm below eps", _with_norm(1e-4, seed=4), 1e-3),
])
def test_l2_normalize(name, v, eps):
  """Float64 NumPy's `v / max(||v||, eps)`: a zero vector stays 0, a 1e-7-norm one comes out of
  unit norm (the floor is on the norm, not its square), one below `eps` is divided by `eps`."""
  out = jax.jit(spectral.l2_normalize, static_argnums=1)(jnp.asarray(v), eps)
  expected = _l2(v, eps)
  assert out.dtype == jnp.float32 and out.shape == v.shape
  np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-6, atol=1e-7)
  norms = np.linalg.norm(np.float64(np.asarray(out)), axis=-1)
  if name in ("random", "batch of rows", "norm 1e-7"):
    np.testing.assert_allclose(norms, 1.0, rtol=1e-6)
  if name == "zero":
    assert not np.any(np.asarray(out))


def _gapped(m, k, singular_values, seed):
  """An `[m, k]` matrix with the given singular values (a gap after the first)."""
  rng = np.random.default_rng(seed)
  left, _ = np.linalg.qr(rng.standard_normal((m, m)))
  right, _ = np.linalg.qr(rng.standard_normal((k, k)))
  s = np.zeros((m, k))
  s[np.arange(len(singular_values)), np.arange(len(singular_values))] = singular_values
  return (left @ s @ right.T).astype(np.float32)


@pytest.mark.parametrize("m, k", [(12, 5), (4, 9)])
def test_power_iteration_converges_to_the_top_singular_value(m, k):
  """With a gap (3 against 1.5), sigma is `np.linalg.svd`'s largest singular value, `u` and `v`
  its right and left singular vectors (up to a common sign)."""
  n = min(m, k)
  w = _gapped(m, k, [3.0] + list(np.linspace(1.5, 0.1, n - 1)), seed=m)
  u0 = rand((k,), seed=7)
  u, v, sigma = spectral.power_iteration(jnp.asarray(w), jnp.asarray(u0 / np.linalg.norm(u0)),
                                         25, EPS)
  left, s, right_t = np.linalg.svd(np.float64(w))
  np.testing.assert_allclose(float(sigma), s[0], rtol=1e-5)
  sign = np.sign(np.dot(np.asarray(u), right_t[0]))
  np.testing.assert_allclose(np.asarray(u), sign * right_t[0], atol=1e-5)
  np.testing.assert_allclose(np.asarray(v), sign * left[:, 0], atol=1e-5)


@pytest.mark.parametrize("n_steps", [1, 3])
def test_power_iteration_steps_match_float64(n_steps):
  """Before convergence, each step is `tests/reference.py`'s float64 `v = l2(w u)`,
  `u = l2(w^T v)`, with `sigma = v^T w u`."""
  w, u0 = rand((6, 4), seed=11), rand((4,), seed=12)
  u, _, sigma = spectral.power_iteration(jnp.asarray(w), jnp.asarray(u0), n_steps, EPS)
  expected_u, expected_sigma = ref.power_iteration(w, u0, n_steps, EPS)
  np.testing.assert_allclose(np.asarray(u), expected_u, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(float(sigma), expected_sigma, rtol=1e-5)


def test_power_iteration_keeps_u_for_a_zero_matrix():
  """A zero kernel: `w^T v` has norm 0, so `u` is kept bit for bit (a unit vector, no NaN) and
  sigma is 0."""
  u0 = rand((5,), seed=4)
  u0 = u0 / np.linalg.norm(u0)
  u, v, sigma = spectral.power_iteration(jnp.zeros((3, 5)), jnp.asarray(u0), 3, EPS)
  np.testing.assert_array_equal(np.asarray(u), u0)
  np.testing.assert_array_equal(np.asarray(v), np.zeros(3))
  assert float(sigma) == 0.0


def test_sigma_gradient_holds_u_and_v_constant():
  """`d sigma / d w = outer(v, u)` with `u`, `v` of the iteration (held constant). After one
  step from a random `u` (far from converged) the gradient through `u` and `v` would differ."""
  w, u0 = rand((5, 4), seed=21), rand((4,), seed=22)
  grad = jax.grad(lambda w: spectral.power_iteration(w, jnp.asarray(u0), 1, EPS)[2])(
      jnp.asarray(w))
  v = _l2(np.float64(w) @ np.float64(u0), EPS)
  u = _l2(np.float64(w).T @ v, EPS)
  np.testing.assert_allclose(np.asarray(grad), np.outer(v, u), rtol=1e-5, atol=1e-6)
