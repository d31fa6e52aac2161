"""normjax.nnx's FilterResponseNorm, WSConv, WeightNorm and SpectralNorm: against the reference
and flax.nnx's own WeightNorm/SpectralNorm on the same state."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import normjax.nnx as njnnx
from tests import reference as ref
from tests.helpers import rand


@pytest.mark.parametrize("learned_epsilon", [False, True])
def test_frn_module_matches_reference(learned_epsilon):
  x = jnp.asarray(rand((2, 3, 4, 5), 0))
  m = njnnx.FilterResponseNorm(5, learned_epsilon=learned_epsilon, rngs=nnx.Rngs(0))
  m.scale[...], m.bias[...], m.tau[...] = (jnp.asarray(rand((5,), i)) for i in (1, 2, 3))
  eps = 1e-6
  if learned_epsilon:
    m.eps[...] = jnp.float32(-0.3)
    eps += 0.3
  want = ref.filter_response_norm(x, m.scale[...], m.bias[...], m.tau[...], eps=eps)
  np.testing.assert_allclose(m(x), want, rtol=2e-5, atol=2e-5)


def test_wsconv_matches_conv_on_standardized_kernel():
  x = jnp.asarray(rand((2, 6, 6, 3), 4))
  ours = njnnx.WSConv(3, 4, (3, 3), rngs=nnx.Rngs(0))
  plain = nnx.Conv(3, 4, (3, 3), rngs=nnx.Rngs(0))
  np.testing.assert_array_equal(ours.kernel[...], plain.kernel[...])
  plain.kernel[...] = jnp.asarray(ref.weight_standardize(plain.kernel[...]), jnp.float32)
  np.testing.assert_allclose(ours(x), plain(x), rtol=1e-4, atol=1e-4)


def test_weight_norm_matches_flax():
  x = jnp.asarray(rand((4, 3), 5))
  ours = njnnx.WeightNorm(nnx.Linear(3, 5, rngs=nnx.Rngs(0)), rngs=nnx.Rngs(1))
  theirs = nnx.WeightNorm(nnx.Linear(3, 5, rngs=nnx.Rngs(0)), rngs=nnx.Rngs(1))
  scales = jnp.asarray(rand((5,), 6))
  ours.scales[("kernel",)] = scales
  theirs.scales[("kernel",)] = scales
  np.testing.assert_allclose(ours(x), theirs(x), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(ours.layer_instance.kernel[...], theirs.layer_instance.kernel[...],
                             rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("update_stats", [False, True])
def test_spectral_norm_matches_flax(update_stats):
  x = jnp.asarray(rand((4, 6), 7))
  ours = njnnx.SpectralNorm(nnx.Linear(6, 5, rngs=nnx.Rngs(0)), n_steps=2, rngs=nnx.Rngs(1))
  theirs = nnx.SpectralNorm(nnx.Linear(6, 5, rngs=nnx.Rngs(0)), n_steps=2, rngs=nnx.Rngs(1))
  jax.tree.map(np.testing.assert_array_equal, nnx.state(ours), nnx.state(theirs))
  np.testing.assert_allclose(ours(x, update_stats=update_stats),
                             theirs(x, update_stats=update_stats), rtol=1e-5, atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               nnx.state(ours), nnx.state(theirs))


def test_spectral_norm_recovers_from_a_zero_kernel():
  """As in linen: a zero kernel keeps `u`, and a later 1e-7 kernel is normalized (flax's nnx
  module writes the normalized kernel back, so it converges to spectral norm 1; before, the
  zero kernel set `u` to 0 and the 1e-7 kernel stayed as it was)."""
  x = jnp.asarray(rand((4, 6), 8))
  layer = njnnx.SpectralNorm(nnx.Linear(6, 5, kernel_init=nnx.initializers.zeros,
                                        rngs=nnx.Rngs(0)), rngs=nnx.Rngs(1))
  u0 = layer.batch_stats[("kernel", "u")][...]
  for _ in range(3):
    layer(x, update_stats=True)
  np.testing.assert_array_equal(layer.batch_stats[("kernel", "u")][...], u0)
  layer.layer_instance.kernel[...] = jnp.asarray(1e-7 * rand((6, 5), 9))
  for _ in range(40):
    layer(x, update_stats=True)
  np.testing.assert_allclose(np.linalg.norm(layer.batch_stats[("kernel", "u")][...]), 1.0,
                             rtol=1e-5)
  kernel = np.asarray(layer.layer_instance.kernel[...], np.float64)
  np.testing.assert_allclose(np.linalg.svd(kernel, compute_uv=False)[0], 1.0, rtol=1e-4)
