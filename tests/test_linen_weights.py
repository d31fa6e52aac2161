"""normjax.linen's FilterResponseNorm, WSConv, WeightNorm and SpectralNorm: against the functions,
the float64 reference, and flax's own WeightNorm/SpectralNorm on the same variables."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import normjax as nj
import normjax.linen as njnn
from tests import reference as ref
from tests.helpers import rand, slow_except


@pytest.mark.parametrize("feature_axis", [-1, 1])
@pytest.mark.parametrize("learned_epsilon", [False, True])
def test_frn_module_matches_reference(feature_axis, learned_epsilon):
  x = jnp.asarray(rand((2, 3, 4, 5), 0))
  c = x.shape[feature_axis]
  m = njnn.FilterResponseNorm(learned_epsilon=learned_epsilon, feature_axis=feature_axis)
  v = m.init(jax.random.key(0), x)
  assert set(v["params"]) == {"scale", "bias", "tau"} | ({"eps"} if learned_epsilon else set())
  params = {"scale": jnp.asarray(rand((c,), 1)), "bias": jnp.asarray(rand((c,), 2)),
            "tau": jnp.asarray(rand((c,), 3))}
  eps = 1e-6
  if learned_epsilon:
    params["eps"] = jnp.float32(-0.3)
    eps = 1e-6 + 0.3
  y = m.apply({"params": params}, x)
  want = ref.filter_response_norm(x, params["scale"], params["bias"], params["tau"],
                                  channel_axis=feature_axis, eps=eps)
  np.testing.assert_allclose(y, want, rtol=2e-5, atol=2e-5)
  if learned_epsilon:
    g = jax.grad(lambda p: jnp.sum(m.apply({"params": p}, x)))(params)
    assert float(g["eps"]) != 0.0


def test_wsconv_standardizes_the_kernel():
  x = jnp.asarray(rand((2, 6, 6, 3), 4))
  conv = njnn.WSConv(4, (3, 3), padding="VALID")
  v = conv.init(jax.random.key(0), x)
  ref_v = nn.Conv(4, (3, 3), padding="VALID").init(jax.random.key(0), x)
  assert jax.tree.map(jnp.shape, v) == jax.tree.map(jnp.shape, ref_v)
  kernel = v["params"]["kernel"]
  std = ref.weight_standardize(kernel, eps=1e-5).astype(np.float32)
  want = nn.Conv(4, (3, 3), padding="VALID").apply(
      {"params": {"kernel": std, "bias": v["params"]["bias"]}}, x)
  np.testing.assert_allclose(conv.apply(v, x), want, rtol=1e-4, atol=1e-4)


def _dense_in(x_dim=3):
  return jnp.asarray(rand((4, x_dim), 5))


@pytest.mark.parametrize("kwargs", slow_except(
    [{}, {"variable_filter": None}, {"feature_axes": None}, {"use_scale": False}],
    {"use_scale": False}))
def test_weight_norm_matches_flax(kwargs):
  x = _dense_in()
  ours = njnn.WeightNorm(nn.Dense(5), **kwargs)
  theirs = nn.WeightNorm(nn.Dense(5), **kwargs)
  v = theirs.init(jax.random.key(0), x)
  v = jax.tree.map(lambda a: a + 0.1 * jnp.asarray(rand(a.shape, 6)), v)   # non-trivial scales
  assert jax.tree.map(jnp.shape, ours.init(jax.random.key(0), x)) == jax.tree.map(jnp.shape, v)
  np.testing.assert_allclose(ours.apply(v, x), theirs.apply(v, x), rtol=1e-5, atol=1e-6)
  gours = jax.grad(lambda v: jnp.sum(ours.apply(v, x) ** 2))(v)
  gtheirs = jax.grad(lambda v: jnp.sum(theirs.apply(v, x) ** 2))(v)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-4), gours, gtheirs)


def test_weight_norm_conv_matches_flax():
  x = jnp.asarray(rand((2, 5, 5, 3), 7))
  ours, theirs = njnn.WeightNorm(nn.Conv(4, (3, 3))), nn.WeightNorm(nn.Conv(4, (3, 3)))
  v = theirs.init(jax.random.key(1), x)
  np.testing.assert_allclose(ours.apply(v, x), theirs.apply(v, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n_steps", slow_except([1, 3], 3))
@pytest.mark.parametrize("update_stats", slow_except([False, True], True))
def test_spectral_norm_matches_flax(n_steps, update_stats):
  x = _dense_in(6)
  ours = njnn.SpectralNorm(nn.Dense(5), n_steps=n_steps)
  theirs = nn.SpectralNorm(nn.Dense(5), n_steps=n_steps)
  v = theirs.init(jax.random.key(0), x, update_stats=False)
  assert (jax.tree.map(jnp.shape, ours.init(jax.random.key(0), x, update_stats=False))
          == jax.tree.map(jnp.shape, v))
  y1, s1 = ours.apply(v, x, update_stats=update_stats, mutable=["batch_stats"])
  y2, s2 = theirs.apply(v, x, update_stats=update_stats, mutable=["batch_stats"])
  np.testing.assert_allclose(y1, y2, rtol=1e-5, atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), s1, s2)
  gours = jax.grad(lambda p: jnp.sum(ours.apply({**v, "params": p}, x, update_stats=False)))(
      v["params"])
  gtheirs = jax.grad(lambda p: jnp.sum(theirs.apply({**v, "params": p}, x, update_stats=False)))(
      v["params"])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), gours, gtheirs)



def test_spectral_norm_training_converges_to_svd():
  x = _dense_in(6)
  layer = njnn.SpectralNorm(nn.Dense(5), n_steps=1)
  v = layer.init(jax.random.key(0), x, update_stats=False)
  for _ in range(100):
    _, upd = layer.apply(v, x, update_stats=True, mutable=["batch_stats"])
    v = {**v, **upd}
  kernel = np.asarray(v["params"]["layer_instance"]["kernel"], np.float64)
  np.testing.assert_allclose(v["batch_stats"]["layer_instance/kernel/sigma"],
                             np.linalg.svd(kernel, compute_uv=False)[0], rtol=1e-4)


def test_spectral_norm_error_on_non_matrix():
  x = jnp.asarray(rand((1, 5, 5, 3), 8))
  layer = njnn.SpectralNorm(nn.Conv(4, (3, 3)), error_on_non_matrix=True)
  with pytest.raises(ValueError, match="error_on_non_matrix"):
    layer.init(jax.random.key(0), x, update_stats=False)
  # Without it, the conv kernel is viewed as [3*3*3, 4], as in flax.
  ours = njnn.SpectralNorm(nn.Conv(4, (3, 3)))
  theirs = nn.SpectralNorm(nn.Conv(4, (3, 3)))
  v = theirs.init(jax.random.key(0), x, update_stats=False)
  np.testing.assert_allclose(ours.apply(v, x, update_stats=False),
                             theirs.apply(v, x, update_stats=False), rtol=1e-5, atol=1e-5)


def test_spectral_norm_recovers_from_a_zero_kernel():
  """A zero-initialised kernel trained for a few steps keeps `u` (flax's initial one); a 1e-7
  kernel after it is normalized: `sigma` reaches its largest singular value (before, the zero
  kernel set `u` to 0 for good and every later kernel came out undivided)."""
  x = _dense_in(6)
  layer = njnn.SpectralNorm(nn.Dense(5, kernel_init=nn.initializers.zeros), n_steps=1)
  v = layer.init(jax.random.key(0), x, update_stats=False)
  u0 = v["batch_stats"]["layer_instance/kernel/u"]
  train = lambda v: {**v, **layer.apply(v, x, update_stats=True, mutable=["batch_stats"])[1]}
  for _ in range(3):
    v = train(v)
  np.testing.assert_array_equal(v["batch_stats"]["layer_instance/kernel/u"], u0)
  tiny = 1e-7 * rand((6, 5), 9)
  v = {**v, "params": {"layer_instance": {**v["params"]["layer_instance"],
                                          "kernel": jnp.asarray(tiny)}}}
  for _ in range(40):
    v = train(v)
  np.testing.assert_allclose(np.linalg.norm(v["batch_stats"]["layer_instance/kernel/u"]), 1.0,
                             rtol=1e-5)
  np.testing.assert_allclose(v["batch_stats"]["layer_instance/kernel/sigma"],
                             np.linalg.svd(tiny.astype(np.float64), compute_uv=False)[0],
                             rtol=1e-4)
