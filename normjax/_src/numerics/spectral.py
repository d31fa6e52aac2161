"""The power iteration of spectral normalization, and PyTorch's `l2_normalize`."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax


def l2_normalize(v: jax.Array, eps: Any) -> jax.Array:
  """`v / max(||v||, eps)` over the last axis (PyTorch's `F.normalize`); a zero `v` stays 0.

  The floor is on the norm, not on the squared norm (flax's `v * rsqrt(sum(v**2) + eps)`),
  so a vector of norm >= `eps` comes out of unit norm however small it is (1e-7 as well as 1).
  """
  norm = jnp.sqrt(jnp.sum(v * v, axis=-1, keepdims=True))
  floor = jnp.maximum(norm, jnp.asarray(eps, v.dtype))
  return v / jnp.where(floor > 0, floor, jnp.ones((), v.dtype))


def power_iteration(w: jax.Array, u: jax.Array, n_steps: int,
                    eps: Any) -> tuple[jax.Array, jax.Array, jax.Array]:
  """`n_steps` power iterations for the largest singular value of the matrix `w` `[M, K]`.

  - Each step is `v = l2(w u)`, `u = l2(w^T v)` (Miyato et al., 2018; flax's order), with
    PyTorch's `l2(x) = x / max(||x||, eps)`: a small kernel (spectral norm 1e-7) is
    normalized exactly as a large one.
  - A step whose `w^T v` has a norm below `eps` (or 0: a zero kernel, or `u` orthogonal to
    its rows) keeps the previous `u`, so `u` stays a unit vector and the state recovers as
    soon as the kernel is not zero (PyTorch's `u` becomes 0, its output NaN, for good).
  - Returns `(u [K], v [M], sigma)` with `sigma = v^T w u`; `u` and `v` are held constant
    (`stop_gradient`), so `sigma` is differentiable in `w` only, as in the paper.
  """
  v = None
  eps = jnp.asarray(eps, w.dtype)
  for _ in range(n_steps):
    v = l2_normalize(w @ u, eps)
    t = v @ w
    norm = jnp.sqrt(jnp.sum(t * t))
    unit = (norm > 0) & (norm >= eps)
    u = jnp.where(unit, t / jnp.where(unit, norm, jnp.ones((), norm.dtype)), u)
  assert v is not None, "n_steps >= 1 (checked by spectral_normalize)"
  u, v = lax.stop_gradient(u), lax.stop_gradient(v)
  return u, v, v @ (w @ u)

