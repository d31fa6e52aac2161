"""The functional API against flax.linen's modules, whose semantics users bring with them."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import normjax as nj
from tests import reference as ref
from tests.helpers import rand


def _flax(module, x, variables):
  with jax.numpy_dtype_promotion("standard"), jax.numpy_rank_promotion("allow"):
    return module.apply(variables, x, mutable=["batch_stats"])


@pytest.mark.parametrize("groups", [2, 4])
def test_group_norm_matches_flax_nhwc(groups):
  x, s, b = rand((3, 5, 6, 8), 1, loc=1.0), rand((8,), 2), rand((8,), 3)
  y_flax, _ = _flax(nn.GroupNorm(num_groups=groups, epsilon=1e-5), jnp.asarray(x),
                    {"params": {"scale": jnp.asarray(s), "bias": jnp.asarray(b)}})
  y = nj.group_norm(jnp.asarray(x), jnp.asarray(s), jnp.asarray(b), num_groups=groups)
  np.testing.assert_allclose(y, y_flax, rtol=1e-5, atol=1e-5)


def test_batch_norm_matches_flax():
  x, s, b = rand((16, 4, 6), 4, loc=2.0), rand((6,), 5), rand((6,), 6)
  mean, var = rand((6,), 7), 1.0 + rand((6,), 8) ** 2
  variables = {"params": {"scale": jnp.asarray(s), "bias": jnp.asarray(b)},
               "batch_stats": {"mean": jnp.asarray(mean), "var": jnp.asarray(var)}}
  y_flax, updated = _flax(nn.BatchNorm(use_running_average=False, momentum=0.9), jnp.asarray(x),
                          variables)
  stats = nj.BatchStats(jnp.asarray(mean), jnp.asarray(var), jnp.asarray(0, jnp.int32))
  y, new = nj.batch_norm(jnp.asarray(x), jnp.asarray(s), jnp.asarray(b), stats, train=True,
                         momentum=0.9)
  np.testing.assert_allclose(y, y_flax, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(new.mean, updated["batch_stats"]["mean"], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(new.var, updated["batch_stats"]["var"], rtol=1e-5, atol=1e-6)


def test_layer_norm_matches_flax_and_flax_default_breaks_on_large_mean():
  x, s, b = rand((4, 64), 9, loc=1.0), rand((64,), 10), rand((64,), 11)
  variables = {"params": {"scale": jnp.asarray(s), "bias": jnp.asarray(b)}}
  y_flax, _ = _flax(nn.LayerNorm(epsilon=1e-5), jnp.asarray(x), variables)
  y = nj.layer_norm(jnp.asarray(x), jnp.asarray(s), jnp.asarray(b))
  np.testing.assert_allclose(y, y_flax, rtol=1e-5, atol=1e-5)
  big = rand((4, 256), 12, loc=1e4)
  expected = ref.layer_norm(big)
  y_flax_big, _ = _flax(nn.LayerNorm(epsilon=1e-5, use_bias=False, use_scale=False),
                        jnp.asarray(big), {})
  assert np.abs(np.asarray(y_flax_big, np.float64) - expected).max() > 1e-1   # flax's default
  assert np.abs(np.asarray(nj.layer_norm(jnp.asarray(big)), np.float64) - expected).max() < 1e-4


def test_rms_norm_matches_flax():
  x, s = rand((4, 32), 13, loc=1.0), rand((32,), 14)
  y_flax, _ = _flax(nn.RMSNorm(), jnp.asarray(x), {"params": {"scale": jnp.asarray(s)}})
  np.testing.assert_allclose(nj.rms_norm(jnp.asarray(x), jnp.asarray(s)), y_flax, rtol=1e-5,
                             atol=1e-5)
