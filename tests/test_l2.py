"""`l2_normalize` (normjax/_src/l2.py; nGPT's unit-norm activations, an L2 QK-norm) against the
float64 formula `x / max(||x||, eps)` of tests/reference.py: values over one and several axes,
the eps floor, zero vectors with finite derivatives, first and second derivatives (both modes),
the dtype policy, NaN/Inf rows, empty axes, jit/vmap, and misuse."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import normjax as nj
from tests import reference as ref
from tests.helpers import rand

SHAPE = (3, 5, 16)


@pytest.mark.parametrize("axis", [-1, 1, (1, 2), (0, 2)])
@pytest.mark.parametrize("loc", [0.0, 1e5])
def test_matches_float64(axis, loc):
  x = rand(SHAPE, seed=0, loc=loc)
  y = jax.jit(lambda x: nj.l2_normalize(x, axis=axis))(x)
  assert y.shape == x.shape and y.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(y, np.float64), ref.l2_normalize(x, axis=axis),
                             rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(np.sqrt(np.sum(np.asarray(y, np.float64) ** 2, axis=axis)), 1.0,
                             rtol=1e-6)


@pytest.mark.slow   # seconds of second-order derivatives; CI runs it
def test_eps_floor_and_zero_vectors():
  """Below the floor x / eps; a tiny vector above it still of unit norm; a zero vector zero,
  its derivative I / eps (finite), its second derivative 0."""
  x = jnp.asarray([[3e-4, 4e-4], [3e-2, 4e-2], [0.0, 0.0], [3e-30, 4e-30]])
  y = nj.l2_normalize(x, eps=1e-2)
  np.testing.assert_allclose(y, ref.l2_normalize(np.asarray(x), eps=1e-2), rtol=1e-6, atol=0)
  np.testing.assert_allclose(y[:2], [[3e-2, 4e-2], [0.6, 0.8]], rtol=1e-6)
  np.testing.assert_allclose(nj.l2_normalize(x[3:] * 1e20), [[0.6, 0.8]], rtol=1e-6)
  jac = jax.jit(jax.jacfwd(lambda x: nj.l2_normalize(x, eps=1e-3)))(jnp.zeros(2))
  np.testing.assert_allclose(jac, np.eye(2) * 1e3, rtol=1e-6)
  np.testing.assert_array_equal(jax.jacrev(lambda x: nj.l2_normalize(x, eps=1e-3))(
      jnp.zeros(2)), jac)
  hess = jax.hessian(lambda x: nj.l2_normalize(x, eps=1e-3)[0])(jnp.zeros(2))
  np.testing.assert_array_equal(hess, np.zeros((2, 2)))
  grad = jax.grad(lambda x: jnp.sum(nj.l2_normalize(x) ** 2))(jnp.zeros((2, 3)))
  assert np.isfinite(np.asarray(grad)).all()


@pytest.mark.parametrize("axis", [-1, (0, 2)])
def test_derivatives_against_float64(axis):
  """First and second derivatives, reverse and forward mode (below and above the floor)."""
  x = rand(SHAPE, seed=1)
  x[0, 0] *= 1e-3
  ref.assert_derivatives_match(lambda x: nj.l2_normalize(x, axis=axis, eps=1e-2),
                               lambda x: ref.l2_normalize(x, axis=axis, eps=1e-2), (x,))


def test_dtypes_special_values_and_empty():
  """bfloat16 in, bfloat16 out within one rounding (the norm in float32); NaN or Inf in a row
  gives NaN or zeros there only; an empty axis an empty output."""
  x = jnp.asarray(rand(SHAPE, 0, loc=3.0), jnp.bfloat16)
  y = jax.jit(nj.l2_normalize)(x)
  assert y.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(y.astype(jnp.float32)),
                             ref.l2_normalize(np.asarray(x.astype(jnp.float32))), rtol=8e-3)
  x = rand((3, 8), 1)
  x[1, 2] = np.nan
  y = np.asarray(nj.l2_normalize(x))
  assert np.isnan(y[1]).all() and np.isfinite(y[[0, 2]]).all()
  x[1, 2] = np.inf
  y = np.asarray(nj.l2_normalize(x))
  assert not np.isfinite(y[1, 2]) and np.isfinite(y[[0, 2]]).all()
  assert nj.l2_normalize(jnp.ones((3, 0))).shape == (3, 0)


@pytest.mark.parametrize("scale", [1e20, 3e37, 1e-20, 1e-30])
def test_huge_and_tiny_vectors_keep_unit_norm(scale):
  """Blue's three sums: a float32 sum of squares overflowed above |x| ~ 1.8e19 (x / inf gave
  0) and flushed to 0 below ~1e-19, and `1 / norm` was subnormal (flushed to zero) for norms
  above 8.5e37; mixed magnitudes in one vector keep every digit, and the derivatives stay
  those of float64. (Subnormal inputs are flushed to zero by XLA:CPU before any of this.)"""
  x = np.asarray([[1.0, 1.0, 0.0], [3.0, -4.0, 0.0], [3.0, 4e-30, 1e-5],
                  [1.0, 2.0, 3.0]], np.float32) * np.float32(scale)
  x[3, 0] = 3e-38 if scale > 1 else 1.0   # a row that spans the whole range
  y = jax.jit(lambda x: nj.l2_normalize(x, eps=0.0))(jnp.asarray(x))
  want = ref.l2_normalize(x.astype(np.float64), eps=0.0)
  np.testing.assert_allclose(np.asarray(y, np.float64), want, rtol=1e-6, atol=1e-38)
  if scale > 1e37:   # the gradient (about 1 / norm) is subnormal: float32 cannot hold it
    return
  # The gradient in float32 against float64's (second derivatives, about 1 / norm**2, leave
  # float32's range at these scales).
  w = np.random.default_rng(0).standard_normal(x.shape)
  loss = lambda f, x: jnp.sum(jnp.sin(f(x, eps=0.0)) * jnp.asarray(w, x.dtype))
  got = jax.jit(jax.grad(lambda x: loss(nj.l2_normalize, x)))(jnp.asarray(x))
  with jax.enable_x64(True):
    want = np.asarray(jax.grad(lambda x: loss(ref.l2_normalize, x))(
        jnp.asarray(x, jnp.float64)))
  np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=1e-4,
                             atol=1e-5 * np.abs(want).max())


def test_vmap_and_qk_norm():
  """Per head over head_dim ([B, T, H, Dh]), under vmap equal to the unbatched call."""
  q = jnp.asarray(rand((2, 4, 3, 8), 2))
  np.testing.assert_allclose(jax.jit(jax.vmap(nj.l2_normalize))(q), nj.l2_normalize(q),
                             rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(nj.l2_normalize(q), ref.l2_normalize(q.__array__()), rtol=1e-6,
                             atol=1e-7)


@pytest.mark.parametrize("call, error, message", [
    (lambda: nj.l2_normalize(jnp.ones((2, 3), jnp.int32)), TypeError, "x"),
    (lambda: nj.l2_normalize(jnp.ones((2, 3)), axis=()), ValueError, "axis must name"),
    (lambda: nj.l2_normalize(jnp.ones((2, 3)), axis=2), ValueError, "axis"),
    (lambda: nj.l2_normalize(jnp.ones((2, 3)), axis=(1, 1)), ValueError, "axis"),
    (lambda: nj.l2_normalize(jnp.ones((2, 3)), axis=1.0), TypeError, "axis"),
    (lambda: nj.l2_normalize(jnp.ones((2, 3)), eps=-1.0), ValueError, "eps"),
    (lambda: nj.l2_normalize(jnp.ones((2, 3)), eps="1"), TypeError, "eps"),
])
def test_misuse_raises_a_named_error(call, error, message):
  with pytest.raises(error, match=message):
    call()


@pytest.mark.slow   # 2^24 values; CI runs it
def test_rows_of_2_24_values():
  """One vector of 2^24 values (offset 3): its norm summed without losing digits."""
  x = np.random.default_rng(6).standard_normal((1, 1 << 24), dtype=np.float32) + np.float32(3.0)
  y = np.asarray(jax.jit(nj.l2_normalize)(x), np.float64)
  x64 = x.astype(np.float64)
  np.testing.assert_allclose(y, x64 / np.sqrt(np.sum(x64 * x64)), rtol=2e-6, atol=1e-12)
