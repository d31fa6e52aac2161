"""The backward keeps only `x` and per-row statistics (no normalized copy of `x`)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import normjax as nj

CASES = {
    "layer": ((4, 16, 32), lambda x, s, b: nj.layer_norm(x, s, b)),
    "rms": ((4, 16, 32), lambda x, s, b: nj.rms_norm(x, s)),
    "group": ((2, 8, 8, 32), lambda x, s, b: nj.group_norm(x, s, b, num_groups=8)),
    "instance": ((2, 8, 8, 32), lambda x, s, b: nj.instance_norm(x, s, b)),
    "batch": ((2, 8, 8, 32), lambda x, s, b: nj.batch_norm(
        x, s, b, nj.init_batch_stats(32), train=True)[0]),
}


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_only_x_and_statistics_are_saved(name, dtype):
  shape, f = CASES[name]
  x = jnp.asarray(np.random.default_rng(0).standard_normal(shape), dtype)
  s = jnp.ones((shape[-1],), jnp.float32)
  b = jnp.zeros((shape[-1],), jnp.float32)
  leaves = jax.eval_shape(lambda *a: jax.tree.leaves(jax.vjp(f, *a)[1]), x, s, b)
  full = [l for l in leaves if math.prod(l.shape) == x.size]
  # x itself, as given (not an upcast or normalized copy); everything else is small.
  assert len(full) == 1 and full[0].dtype == x.dtype, leaves
  small = sum(math.prod(l.shape) for l in leaves if math.prod(l.shape) != x.size)
  assert small <= 4 * x.size // shape[-1] + 4 * shape[-1], leaves
