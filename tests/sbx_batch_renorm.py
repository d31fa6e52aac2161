"""An oracle for sbx's `BatchRenorm` linen module, for tests/test_batch_renorm_sbx.py.

The module this mirrors is `BatchRenorm` in `sbx/common/jax_layers.py` of
https://github.com/araffin/sbx (Antonin Raffin, MIT licence; adapted there from
`flax.linen.BatchNorm`), the batch renormalization layer of CrossQ that many JAX
reinforcement-learning repositories copy. This file is a re-implementation of its arithmetic
from a reading of that source (commit 13565d7), not a copy: the same attributes, variables and
defaults, and the same computation in the same order, without normjax. sbx is not a test
dependency.

What sbx computes in training (`use_running_average=False`, outside `init`), per feature, with
the batch statistics `mu`, `var` (flax's one-pass `E[x^2] - E[x]^2` by default) and the
running ones `ra_mean`, `ra_var` (`batch_stats`):

    r = clip(sqrt(var + eps) / sqrt(ra_var + eps), 1 / r_max, r_max)     held constant
    d = clip((mu - ra_mean) / sqrt(ra_var + eps), -d_max, d_max)          held constant
    if steps >= warm_up_steps:  mu, var <- mu - d * sqrt(var) / r,  var / r**2
    y = (x - mu) / sqrt(var + eps) * scale + bias

then `ra_mean`, `ra_var` move towards the batch `mu`, `var` with `momentum`, and `steps` grows
by one. `r_max` (3), `d_max` (5) and `steps` (0) are `batch_stats` variables. Evaluation
normalizes with `ra_mean`, `ra_var` and `eps`, as batch norm does.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


class SbxBatchRenorm(nn.Module):
  """sbx's `BatchRenorm` (attributes, variables and defaults as there; see the module doc)."""
  use_running_average: bool | None = None
  axis: int = -1
  momentum: float = 0.99
  epsilon: float = 0.001
  warm_up_steps: int = 100_000
  use_fast_variance: bool = True

  @nn.compact
  def __call__(self, x: jax.Array, use_running_average: bool | None = None) -> jax.Array:
    use_running_average = nn.merge_param("use_running_average", self.use_running_average,
                                         use_running_average)
    axis = self.axis % x.ndim
    reduce = tuple(a for a in range(x.ndim) if a != axis)
    c = x.shape[axis]
    ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
    ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
    r_max = self.variable("batch_stats", "r_max", lambda: 3)
    d_max = self.variable("batch_stats", "d_max", lambda: 5)
    steps = self.variable("batch_stats", "steps", lambda: 0)
    scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)

    if use_running_average:
      mean, var = ra_mean.value, ra_var.value
    else:
      mu = jnp.mean(x, axis=reduce)
      if self.use_fast_variance:
        var_b = jnp.maximum(0.0, jnp.mean(jnp.square(x), axis=reduce) - jnp.square(mu))
      else:
        var_b = jnp.mean(jnp.square(x - jnp.expand_dims(mu, reduce)), axis=reduce)
      mean, var = mu, var_b
      if not self.is_initializing():
        ra_std = jnp.sqrt(ra_var.value + self.epsilon)
        r = jnp.clip(jax.lax.stop_gradient(jnp.sqrt(var_b + self.epsilon) / ra_std),
                     1 / r_max.value, r_max.value)
        d = jnp.clip(jax.lax.stop_gradient((mu - ra_mean.value) / ra_std),
                     -d_max.value, d_max.value)
        warm = jnp.greater_equal(steps.value, self.warm_up_steps).astype(jnp.float32)
        mean = warm * (mu - d * jnp.sqrt(var_b) / r) + (1.0 - warm) * mu
        var = warm * (var_b / r**2) + (1.0 - warm) * var_b
        ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mu
        ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var_b
        steps.value += 1
    shape = [1] * x.ndim
    shape[axis] = c
    y = (x - mean.reshape(shape)) * jax.lax.rsqrt(var.reshape(shape) + self.epsilon)
    return y * scale.reshape(shape) + bias.reshape(shape)


def stats_tree(mean: Any, var: Any, steps: int, r_max: Any = 3, d_max: Any = 5) -> dict:
  """A `batch_stats` dict of the shape sbx's module makes."""
  return {"mean": jnp.asarray(mean, jnp.float32), "var": jnp.asarray(var, jnp.float32),
          "r_max": jnp.asarray(r_max), "d_max": jnp.asarray(d_max), "steps": jnp.asarray(steps)}
