"""Batch renormalization's correction of the standardized batch (Ioffe, 2017)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from normjax._src.numerics.moments import Moments
from normjax._src.numerics.moments import stats_dtype


def renormalize(xhat: jax.Array, batch: Moments, mean: jax.Array, var: jax.Array,
                scale: jax.Array | None, bias: jax.Array | None, eps: Any, r_max: Any,
                d_max: Any, active: jax.Array) -> jax.Array:
  """Batch renormalization's output (Ioffe, 2017) from the standardized `xhat`.

  `y = (xhat * r + d) * scale + bias` with `xhat = (x - mu_B) / sigma_B` (the batch's biased
  statistics, `sigma_B = sqrt(var_B + eps)`), `sigma = sqrt(var + eps)` of the running
  statistics, `r = clip(sigma_B / sigma, 1 / r_max, r_max)` and
  `d = clip((mu_B - mean) / sigma, -d_max, d_max)`, both held constant (`stop_gradient`), so
  gradients flow through `xhat` as in batch norm. Where `active` is False, `r = 1` and `d = 0`.

  Args:
    xhat: `standardize(x, axes, None, None, eps)`'s output.
    batch: its `Moments`.
    mean, var: the running statistics, broadcastable against `xhat`.
    scale, bias: optional, broadcastable against `xhat`.
    eps: added to both variances.
    r_max, d_max: the clipping bounds (Python floats or traced scalars).
    active: bool scalar, False during warmup (plain batch norm).

  Returns:
    `y` of `xhat.shape` and `xhat.dtype`, computed in `stats_dtype`.
  """
  dtype = stats_dtype(xhat.dtype)
  eps_ = jnp.asarray(eps, dtype)
  sigma = jnp.sqrt(var.astype(dtype) + eps_)
  batch_mean = lax.stop_gradient(batch.mean).astype(dtype)
  sigma_b = jnp.sqrt(lax.stop_gradient(batch.var).astype(dtype) + eps_)
  r_max, d_max = jnp.asarray(r_max, dtype), jnp.asarray(d_max, dtype)
  r = jnp.clip(sigma_b / sigma, jnp.ones((), dtype) / r_max, r_max)
  d = jnp.clip((batch_mean - mean.astype(dtype)) / sigma, -d_max, d_max)
  r = lax.stop_gradient(jnp.where(active, r, jnp.ones((), dtype)))
  d = lax.stop_gradient(jnp.where(active, d, jnp.zeros((), dtype)))
  if scale is not None:
    r, d = r * scale.astype(dtype), d * scale.astype(dtype)
  if bias is not None:
    d = d + bias.astype(dtype)
  return (xhat.astype(dtype) * r + d).astype(xhat.dtype)
