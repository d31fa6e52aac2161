"""Filter response normalization and TLU (normjax/_src/response.py) against the float64 reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import normjax as nj
from tests import reference as ref
from tests.helpers import as_dtype, maybe_jit, rand, tolerance


@pytest.mark.parametrize("use_jit", [False, True])
@pytest.mark.parametrize("channel_axis", [-1, 1])
@pytest.mark.parametrize("with_tau", [False, True])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_frn_matches_reference(use_jit, channel_axis, with_tau, dtype):
  shape = (2, 5, 4, 3) if channel_axis == -1 else (2, 3, 5, 4)
  x, x64 = as_dtype(rand(shape, 0, spread=2.0), dtype)
  scale, bias, tau = rand((3,), 1), rand((3,), 2), rand((3,), 3) if with_tau else None
  fn = maybe_jit(lambda x, s, b, t: nj.filter_response_norm(x, s, b, t, channel_axis=channel_axis,
                                                            eps=1e-3), use_jit)
  y = fn(x, scale, bias, tau)
  assert y.dtype == dtype and y.shape == shape
  want = ref.filter_response_norm(x64, scale, bias, tau, channel_axis=channel_axis, eps=1e-3)
  np.testing.assert_allclose(np.asarray(y, np.float64), want, *tolerance(dtype))


def test_frn_is_not_centered():
  # A constant channel: a centered norm would give 0, FRN gives x / sqrt(x**2 + eps).
  x = jnp.full((1, 4, 1), 3.0)
  np.testing.assert_allclose(nj.filter_response_norm(x, eps=0.0), np.ones((1, 4, 1)), rtol=1e-6)


def test_frn_tau_clamps_from_below():
  x = jnp.asarray(rand((2, 6, 2), 4))
  tau = jnp.array([0.5, -0.25])
  y = nj.filter_response_norm(x, tau=tau)
  assert np.all(np.asarray(y) >= np.asarray(tau) - 1e-7)
  np.testing.assert_allclose(y, ref.filter_response_norm(x, tau=tau), rtol=2e-5, atol=2e-5)


def test_frn_dense_input_and_no_batch_axis():
  x = jnp.asarray(rand((4, 3), 5))
  # [N, C]: nothing to average over, nu2 = x**2.
  np.testing.assert_allclose(nj.filter_response_norm(x, eps=0.1),
                             ref.filter_response_norm(x, eps=0.1), rtol=2e-5, atol=2e-5)
  xs = jnp.asarray(rand((6, 3), 6))
  np.testing.assert_allclose(nj.filter_response_norm(xs, batch_axis=None),
                             ref.filter_response_norm(xs, batch_axis=None), rtol=2e-5, atol=2e-5)


def test_frn_mask():
  x = jnp.asarray(rand((2, 6, 3), 7))
  mask = jnp.asarray(np.random.default_rng(0).random((2, 6, 1)) > 0.4)
  np.testing.assert_allclose(nj.filter_response_norm(x, mask=mask),
                             ref.filter_response_norm(x, mask=np.asarray(mask)), rtol=2e-5,
                             atol=2e-5)


def test_frn_vmap_equals_batched():
  x = jnp.asarray(rand((3, 5, 2), 8))
  s, b, t = (jnp.asarray(rand((2,), i)) for i in (9, 10, 11))
  per_example = jax.vmap(lambda e: nj.filter_response_norm(e, s, b, t, batch_axis=None))(x)
  np.testing.assert_allclose(per_example, ref.filter_response_norm(x, s, b, t), rtol=2e-5,
                             atol=2e-5)


@pytest.mark.parametrize("channel_axis", [-1, 1])
def test_frn_grad_matches_finite_differences(channel_axis):
  x64 = rand((2, 3, 4), 12).astype(np.float64)
  s, b, t = rand((3,) if channel_axis == 1 else (4,), 13), None, None
  w = rand(x64.shape, 14).astype(np.float64)
  loss = lambda x: jnp.sum(nj.filter_response_norm(x.astype(jnp.float32), s, b, t,
                                                   channel_axis=channel_axis, eps=0.1) * w)
  g = np.asarray(jax.grad(loss)(jnp.asarray(x64, jnp.float32)), np.float64)
  ref_loss = lambda x: np.sum(ref.filter_response_norm(x, s, channel_axis=channel_axis,
                                                       eps=0.1) * w)
  h, fd = 1e-6, np.zeros_like(x64)
  for i in np.ndindex(x64.shape):
    d = np.zeros_like(x64)
    d[i] = h
    fd[i] = (ref_loss(x64 + d) - ref_loss(x64 - d)) / (2 * h)
  np.testing.assert_allclose(g, fd, rtol=1e-3, atol=1e-4)


def test_frn_grad_through_tau_and_traced_eps():
  x = jnp.asarray(rand((2, 4, 2), 15))
  tau = jnp.array([10.0, -10.0])   # channel 0 fully clamped, channel 1 never
  g_tau = jax.grad(lambda t: jnp.sum(nj.filter_response_norm(x, tau=t)))(tau)
  np.testing.assert_allclose(g_tau, [8.0, 0.0])
  # A learned eps (traced) is used as given.
  f = jax.jit(lambda e: nj.filter_response_norm(x, eps=e))
  np.testing.assert_allclose(f(jnp.float32(0.5)), ref.filter_response_norm(x, eps=0.5),
                             rtol=2e-5, atol=2e-5)


def test_tlu():
  x = jnp.asarray(rand((2, 3, 4), 16))
  tau = jnp.asarray(rand((3,), 17))
  np.testing.assert_array_equal(nj.tlu(x, tau, channel_axis=1),
                                np.maximum(np.asarray(x), np.asarray(tau)[None, :, None]))


@pytest.mark.parametrize("call, err, match", [
    (lambda x: nj.filter_response_norm(x, tau=jnp.ones(4)), ValueError,
     r"tau must have shape \(3,\)"),
    (lambda x: nj.filter_response_norm(x, scale=jnp.ones((3, 1))), ValueError, "scale must have"),
    (lambda x: nj.filter_response_norm(x, channel_axis=0), ValueError, "must differ"),
    (lambda x: nj.filter_response_norm(x, eps=-1.0), ValueError, "eps"),
    (lambda x: nj.filter_response_norm(x.astype(jnp.int32)), TypeError, "floating"),
    (lambda x: nj.filter_response_norm(x, tau=jnp.ones(3, jnp.int32)), TypeError, "tau"),
    (lambda x: nj.tlu(x, jnp.ones(2)), ValueError, r"tau must have shape \(3,\)"),
    (lambda x: nj.tlu(x, None), TypeError, "tau"),
    (lambda x: nj.filter_response_norm(x, channel_axis=5), ValueError, "channel_axis"),
])
def test_errors(call, err, match):
  with pytest.raises(err, match=match):
    call(jnp.ones((2, 4, 3)))


def test_frn_learned_eps_gradient():
  # d/d eps of sum(x * (nu2 + eps)**-0.5) = -0.5 * sum(x * (nu2 + eps)**-1.5), per channel.
  x = jnp.asarray(rand((1, 5, 1), 18))
  x64 = np.asarray(x, np.float64)
  nu2 = (x64 ** 2).mean()
  g = jax.grad(lambda e: jnp.sum(nj.filter_response_norm(x, eps=e)))(jnp.float32(0.2))
  np.testing.assert_allclose(g, -0.5 * x64.sum() * (nu2 + 0.2) ** -1.5, rtol=1e-5)
