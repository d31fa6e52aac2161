"""`dynamic_tanh` (normjax/_src/tanh.py; Zhu et al., 2025) against the float64 formula of
tests/reference.py: values (saturating and large inputs included), first and second derivatives
in `x`, `alpha`, `scale` and `bias` (both modes), the dtype policy, jit/vmap, and misuse."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import normjax as nj
from tests import reference as ref
from tests.helpers import rand

SHAPE = (3, 5, 16)


def _args(spread=1.0):
  return (rand(SHAPE, seed=0, spread=spread), np.float32(0.7), rand((16,), 1, loc=1.0),
          rand((16,), 2))


@pytest.mark.parametrize("affine", ["both", "scale", "bias", "none"])
@pytest.mark.parametrize("spread", [1.0, 1e5])
def test_matches_float64(affine, spread):
  x, alpha, s, b = _args(spread)
  s = s if affine in ("both", "scale") else None
  b = b if affine in ("both", "bias") else None
  y = jax.jit(lambda x, a: nj.dynamic_tanh(x, a, s, b))(x, alpha)
  assert y.shape == x.shape and y.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(y, np.float64), ref.dynamic_tanh(x, alpha, s, b),
                             rtol=1e-6, atol=1e-6)


def test_axes():
  x, alpha, s, _ = _args()
  s2 = rand((5, 16), 3)
  for axis, scale in ((1, s[:5]), ((1, 2), s2), ((-1, 0), rand((3, 16), 4))):
    np.testing.assert_allclose(
        np.asarray(nj.dynamic_tanh(x, alpha, scale, scale, axis=axis), np.float64),
        ref.dynamic_tanh(x, alpha, scale, scale, axis=axis), rtol=1e-6, atol=1e-6)


def test_derivatives_against_float64(implementation):
  """In x, alpha, scale and bias, reverse and forward mode, first and second order."""
  ref.assert_derivatives_match(lambda x, a, s, b: nj.dynamic_tanh(x, a, s, b),
                               lambda x, a, s, b: ref.dynamic_tanh(x, a, s, b), _args())


def test_dtypes(implementation):
  """bfloat16 x: tanh in float32, the output bfloat16 within one rounding; bfloat16 parameters
  with float32 x: float32 output; NaN passes through, Inf saturates."""
  x, alpha, s, b = _args()
  xb = jnp.asarray(x, jnp.bfloat16)
  y = jax.jit(nj.dynamic_tanh)(xb, jnp.asarray(alpha, jnp.bfloat16), s, b)
  assert y.dtype == jnp.bfloat16
  want = ref.dynamic_tanh(np.asarray(xb.astype(jnp.float32)), np.float32(
      jnp.asarray(alpha, jnp.bfloat16).astype(jnp.float32)), s, b)
  np.testing.assert_allclose(np.asarray(y.astype(jnp.float32)), want, rtol=8e-3, atol=8e-3)
  y = nj.dynamic_tanh(x, alpha, jnp.asarray(s, jnp.bfloat16), jnp.asarray(b, jnp.bfloat16))
  assert y.dtype == jnp.float32
  special = nj.dynamic_tanh(jnp.asarray([np.nan, np.inf, -np.inf]), jnp.asarray(2.0))
  np.testing.assert_array_equal(special, [np.nan, 1.0, -1.0])


def test_vmap_over_alpha_and_grad():
  """A batch of alphas (vmap), and the gradient of alpha summed over every element."""
  x, _, s, b = _args()
  alphas = jnp.asarray([0.1, 0.5, 2.0])
  y = jax.jit(jax.vmap(lambda a: nj.dynamic_tanh(x, a, s, b)))(alphas)
  for a, ya in zip(np.asarray(alphas), y):
    np.testing.assert_allclose(ya, ref.dynamic_tanh(x, a, s, b), rtol=1e-6, atol=1e-6)
  g = jax.jit(jax.grad(lambda a: jnp.sum(nj.dynamic_tanh(x, a, s, b))))(jnp.asarray(0.5))
  want = np.sum(x / np.cosh(0.5 * x.astype(np.float64)) ** 2 * s)
  np.testing.assert_allclose(g, want, rtol=1e-5)


_X = jnp.ones((2, 8))


@pytest.mark.parametrize("call, error, message", [
    (lambda: nj.dynamic_tanh(_X, jnp.ones(1)), ValueError,
     r"alpha must be a scalar \(shape \(\)\).*got shape \(1,\)"),
    (lambda: nj.dynamic_tanh(_X, jnp.ones(8)), ValueError, "alpha must be a scalar"),
    (lambda: nj.dynamic_tanh(_X, jnp.asarray(1)), TypeError, "alpha"),
    (lambda: nj.dynamic_tanh(_X.astype(jnp.int32), jnp.asarray(1.0)), TypeError, "x"),
    (lambda: nj.dynamic_tanh(_X, jnp.asarray(1.0), jnp.ones(3)), ValueError,
     "scale must have shape"),
    (lambda: nj.dynamic_tanh(_X, jnp.asarray(1.0), None, jnp.ones((2, 8))), ValueError,
     "bias must have shape"),
    (lambda: nj.dynamic_tanh(_X, jnp.asarray(1.0), jnp.ones(8, jnp.int32)), TypeError, "scale"),
    (lambda: nj.dynamic_tanh(_X, jnp.asarray(1.0), axis=2), ValueError, "axis"),
])
def test_misuse_raises_a_named_error(call, error, message):
  with pytest.raises(error, match=message):
    call()
