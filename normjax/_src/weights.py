"""Normalizations of weights rather than activations: standardization, weight and spectral norm.

A kernel's last axis is its output axis (flax's layout: `[in, out]` for Dense,
`[*kernel_size, in, out]` for Conv); the other axes are its fan-in.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from normjax._src import checks
from normjax._src import dispatch
from normjax._src import shapes
from normjax._src.state import SpectralState


def _fan_in_axes(kernel: jax.Array, axis: int | Sequence[int] | None) -> shapes.Axes:
  """`axis` canonicalized, or every axis but the last (the output axis) when None."""
  if axis is None:
    return tuple(range(kernel.ndim - 1))
  return checks.canonicalize_axes(axis, kernel.ndim, "axis")


def weight_standardize(kernel: jax.Array, *, axis: int | Sequence[int] | None = None,
                       eps: float = 1e-5) -> jax.Array:
  """Weight standardization (Qiao et al., 2019): `(w - mean) / sqrt(var + eps)` over `axis`.

  Statistics per output unit over its fan-in; used with `group_norm` on the activations, as
  the paper recommends (see `normjax.linen.WSConv`).

  Args:
    kernel: floating `[..., C_out]` kernel (`[in, out]`, `[kh, kw, in, out]`, ...).
    axis: the axes standardized over; None for every axis but the last (the fan-in).
    eps: added to the variance: a finite number >= 0.

  Returns:
    Array of `kernel.shape` and `kernel.dtype`.

  Raises:
    TypeError: a non-floating kernel, a non-int axis or a non-real `eps`.
    ValueError: no axis to standardize over (a 0-d or 1-d kernel with `axis=None`), axes out
      of range or repeated, or a negative, NaN or infinite `eps`.

  Example:
    >>> import jax.numpy as jnp, normjax as nj
    >>> nj.weight_standardize(jnp.array([[1.0, 0.0], [3.0, 4.0]]), eps=0.0)   # [in=2, out=2]
    Array([[-1., -1.],
           [ 1.,  1.]], dtype=float32)
  """
  kernel = checks.check_floating(kernel, "kernel")
  axes = _fan_in_axes(kernel, axis)
  if not axes:
    raise ValueError(f"weight_standardize needs at least one axis to standardize over; got "
                     f"axis={axis!r} for a kernel of shape {tuple(kernel.shape)} (axis=None takes "
                     f"every axis but the last, so the kernel must have rank >= 2).")
  eps = checks.check_eps(eps)
  y, _ = dispatch.standardize(kernel, axes, None, None, eps)
  return y


def weight_norm(v: jax.Array, g: jax.Array | None = None, *,
                axis: int | Sequence[int] | None = None, eps: float = 1e-12) -> jax.Array:
  """Weight normalization (Salimans & Kingma, 2016): `g * v / ||v||`, the norm over `axis`.

  Computed as `v * rsqrt(sum(v**2) + eps) * g` (flax's `WeightNorm`), as an uncentered
  standardization: `sum(v**2) = n * mean(v**2)` for the `n` elements of each norm.

  Args:
    v: floating direction `[..., C_out]`.
    g: the norm, of the shape of the axes not in `axis` (`[C_out]` by default), or None (1).
    axis: the axes the norm is taken over; None for every axis but the last (the fan-in);
      `()` takes `|v|` elementwise.
    eps: added to `sum(v**2)`: a finite number >= 0.

  Returns:
    Array of `v.shape` and `v.dtype`.

  Raises:
    TypeError: non-floating `v` or `g`, a non-int axis or a non-real `eps`.
    ValueError: axes out of range or repeated, `g` of the wrong shape, or a bad `eps`.

  Example:
    >>> import jax.numpy as jnp, normjax as nj
    >>> v, g = jnp.array([[3.0, 1.0], [4.0, 0.0]]), jnp.array([10.0, 2.0])
    >>> nj.weight_norm(v, g, eps=0.0).round(4)
    Array([[6., 2.],
           [8., 0.]], dtype=float32)
  """
  v = checks.check_floating(v, "v")
  axes = _fan_in_axes(v, axis)
  kept = tuple(a for a in range(v.ndim) if a not in axes)
  g = checks.check_param(g, "g", tuple(v.shape[a] for a in kept))
  eps = checks.check_eps(eps)
  n = max(shapes.reduced_size(v.shape, axes), 1)
  dtype = dispatch.stats_dtype(v.dtype)
  if isinstance(n, int):
    factor, eps_per_element = jnp.asarray(1.0 / math.sqrt(n), dtype), eps / n
  else:   # a symbolic fan-in (jax.export): n is known at run time only
    n = jnp.asarray(n, dtype)
    factor, eps_per_element = jax.lax.rsqrt(n), jnp.asarray(eps, dtype) / n
  scale = factor if g is None else g.astype(dtype) * factor
  scale = jnp.broadcast_to(scale, tuple(v.shape[a] for a in kept))
  y, _ = dispatch.standardize(v, axes, shapes.broadcast_to_axes(scale, v.ndim, kept), None,
                               eps_per_element, centered=False)
  return y


def _matrix_shape(kernel: jax.Array, name: str = "kernel") -> tuple[int, int]:
  """The kernel as a matrix `[prod(shape[:-1]), shape[-1]]`; rank >= 2 required."""
  if kernel.ndim < 2:
    raise ValueError(f"{name} must have rank >= 2 (viewed as a matrix [prod(shape[:-1]), "
                     f"shape[-1]]); got {name} of shape {tuple(kernel.shape)}.")
  return math.prod(kernel.shape[:-1]), kernel.shape[-1]


def init_spectral_state(kernel: jax.Array, key: jax.Array) -> SpectralState:
  """A fresh `SpectralState` for `kernel`: `u ~ N(0, I)` normalized, `sigma = 1`.

  Args:
    kernel: floating `[..., C_out]` kernel of rank >= 2.
    key: a `jax.random` key.

  Returns:
    `SpectralState(u [C_out], sigma [])` in float32 (float64 for a float64 kernel).

  Raises:
    TypeError: a non-floating kernel.
    ValueError: a kernel of rank < 2.

  Example:
    >>> import jax, jax.numpy as jnp, normjax as nj
    >>> state = nj.init_spectral_state(jnp.ones((3, 4)), jax.random.key(0))
    >>> state.u.shape, float(jnp.linalg.norm(state.u).round(5)), state.sigma
    ((4,), 1.0, Array(1., dtype=float32))
  """
  kernel = checks.check_floating(kernel, "kernel")
  _, out = _matrix_shape(kernel)
  dtype = dispatch.stats_dtype(kernel.dtype)
  u = jax.random.normal(key, (out,), dtype)
  return SpectralState(u=dispatch.unit_vector(u, 0.0), sigma=jnp.ones((), dtype))


def spectral_normalize(kernel: jax.Array, state: SpectralState, *, train: bool, n_steps: int = 1,
                       eps: float = 1e-12) -> tuple[jax.Array, SpectralState]:
  """Spectral normalization (Miyato et al., 2018): the kernel divided by its largest singular
  value `sigma`, the kernel viewed as a matrix `W = kernel.reshape(-1, C_out)`.

  Training: `n_steps` power iterations from `state.u` (`v = l2(W u)`, `u = l2(W^T v)`) give
  `sigma = v^T W u`; the output is `kernel / sigma`, differentiable through `sigma` with `u`
  and `v` held constant (as in the paper and flax), and the new state `(u, sigma)` carries no
  gradient. Evaluation: `kernel / state.sigma`, and `state` is returned unchanged. A zero
  `sigma` divides by 1.

  `l2(x) = x / max(||x||, eps)`, PyTorch's `spectral_norm` (flax floors the squared norm,
  `x * rsqrt(||x||**2 + eps)`, which shrinks `u` at every step once the kernel's spectral
  norm is below about `sqrt(eps)`: a 1e-7 kernel came out with spectral norm 1e31, then
  undivided). A step whose `W^T v` has a norm below `eps` (a zero kernel, e.g. at a zero
  initialisation) keeps the previous `u`, so `u` stays a unit vector and later kernels are
  normalized again (PyTorch's `u` becomes 0 there, and its output NaN from then on).

  Args:
    kernel: floating `[..., C_out]` kernel of rank >= 2.
    state: its `SpectralState` (`u [C_out]`, `sigma []`), from `init_spectral_state`.
    train: True to run the power iteration and update the state (a Python bool).
    n_steps: power iterations per call, >= 1.
    eps: the floor on the norms in `l2` (PyTorch's `eps`): a finite number >= 0.

  Returns:
    `(kernel / sigma, new_state)`: an array of `kernel.shape` and `kernel.dtype`, and the
    state with the dtypes of `state`.

  Raises:
    TypeError: a non-floating kernel or state, a non-bool `train`, a non-int `n_steps`, a
      non-real `eps`, or a `state` that is not a `SpectralState`.
    ValueError: a kernel of rank < 2, `state.u` not of shape `[C_out]` or `state.sigma` not a
      scalar, `n_steps < 1`, or a bad `eps`.

  Example:
    >>> import jax, jax.numpy as jnp, normjax as nj
    >>> w = jnp.array([[3.0, 0.0], [0.0, 1.0]])               # singular values 3 and 1
    >>> state = nj.init_spectral_state(w, jax.random.key(0))
    >>> w_sn, state = nj.spectral_normalize(w, state, train=True, n_steps=20)
    >>> w_sn.round(4), state.sigma.round(4)
    (Array([[1.    , 0.    ],
           [0.    , 0.3333]], dtype=float32), Array(3., dtype=float32))
  """
  kernel = checks.check_floating(kernel, "kernel")
  rows, out = _matrix_shape(kernel)
  if not isinstance(state, SpectralState):
    raise TypeError(f"state must be a SpectralState(u, sigma) (from init_spectral_state); got "
                    f"state of type {type(state).__name__}.")
  u0 = checks.check_floating(state.u, "state.u")
  sigma0 = checks.check_floating(state.sigma, "state.sigma")
  if tuple(u0.shape) != (out,) or sigma0.shape != ():
    raise ValueError(f"state must have u of shape ({out},) (the kernel's last axis) and a scalar "
                     f"sigma; got u of shape {tuple(u0.shape)} and sigma of shape "
                     f"{tuple(sigma0.shape)} for a kernel of shape {tuple(kernel.shape)}.")
  train = checks.check_bool(train, "train", "True to run the power iteration")
  n_steps = checks.check_positive_int(n_steps, "n_steps")
  eps = checks.check_eps(eps)
  dtype = dispatch.stats_dtype(kernel.dtype)
  w = kernel.reshape(rows, out).astype(dtype)
  if train:
    u, _, sigma = dispatch.power_iteration(w, u0.astype(dtype), n_steps, eps)
    new = SpectralState(u=jax.lax.stop_gradient(u).astype(u0.dtype),
                        sigma=jax.lax.stop_gradient(sigma).astype(sigma0.dtype))
  else:
    sigma, new = sigma0.astype(dtype), state
  w = w / jnp.where(sigma != 0, sigma, jnp.ones((), dtype))
  return w.reshape(kernel.shape).astype(kernel.dtype), new

