"""Layer and RMS normalization: statistics per example over the given feature axes.

`add_layer_norm` and `add_rms_norm` are the residual-add forms of a pre-norm block: they
return the normalized `x + residual` and the sum itself, computed in one pass on the native
CPU kernels (which read `x` and `residual` once and write `y` and `h`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax

from normjax._src import checks
from normjax._src import dispatch
from normjax._src import shapes


def layer_norm(x: jax.Array, scale: jax.Array | None = None, bias: jax.Array | None = None, *,
               axis: int | Sequence[int] = -1, eps: float = 1e-5, mask: jax.Array | None = None,
               axis_name: Any = None, fast_variance: bool = False) -> jax.Array:
  """Layer normalization (Ba et al., 2016): `(x - E[x]) / sqrt(Var[x] + eps) * scale + bias`.

  Statistics are taken over `axis` for every position of the other axes. `axis=-1` with
  `scale`/`bias` of shape `[C]` is `torch.nn.LayerNorm(C)`; `axis=(-2, -1)` is
  `torch.nn.LayerNorm((H, W))`.

  Args:
    x: floating input of any rank.
    scale: multiplier of shape `tuple(x.shape[a] for a in sorted(a % x.ndim for a in axis))`
      (the normalized axes in increasing order, whatever the order of `axis`), or None.
    bias: offset of the same shape, or None.
    axis: the axis or axes normalized over.
    eps: added to the variance: a finite number >= 0 (Python or NumPy int/float, or a 0-d
      array), used as a Python float; a traced eps is used unchanged (its value unchecked) and is
      differentiable.
    mask: optional bool array broadcastable to `x`; only True elements enter the statistics
      (padding is False). A fully masked row gives mean 0, var 0 and a finite output.
    axis_name: a mapped/sharded axis that is itself one of the normalized axes (a feature- or
      sequence-sharded layer norm); its sums and counts are psum'd.
    fast_variance: one-pass variance `E[x^2] - E[x]^2`, less accurate for large means.

  Returns:
    Array of `x.shape` and `x.dtype`.

  Raises:
    TypeError: non-floating `x`, `scale` or `bias`, an `axis` that is not an int or a tuple of
      ints, a non-real `eps` (bool, complex, string), a non-bool `fast_variance`, or a
      non-boolean `mask`.
    ValueError: out-of-range or repeated axes, `scale`/`bias` of the wrong shape, a negative,
      NaN or infinite `eps`, or a mask not broadcastable to `x`.

  Example:
    >>> import jax.numpy as jnp, normjax as nj
    >>> nj.layer_norm(jnp.array([[1.0, 2.0, 3.0]]), eps=0.0).round(4)
    Array([[-1.2247,  0.    ,  1.2247]], dtype=float32)
  """
  x, axes, scale, bias, mask, eps = _prepare(x, axis, eps, mask, axis_name, scale=scale,
                                             bias=bias, fast_variance=fast_variance)
  feature = lambda p: shapes.broadcast_to_axes(p, x.ndim, axes)
  y, _ = dispatch.standardize(x, axes, feature(scale), feature(bias), eps,
                               mask=mask, axis_name=axis_name, fast_variance=fast_variance)
  return y


def rms_norm(x: jax.Array, scale: jax.Array | None = None, *, axis: int | Sequence[int] = -1,
             eps: float = 1e-6, mask: jax.Array | None = None, axis_name: Any = None) -> jax.Array:
  """RMS normalization (Zhang & Sennrich, 2019): `x * rsqrt(mean(x**2) + eps) * scale`.

  No mean is subtracted and there is no bias. `axis`, `mask` and `axis_name` are as in
  `layer_norm`; `scale` has the shape of the normalized axes in increasing order. Equals
  `torch.nn.RMSNorm(C, eps=eps)` for `axis=-1`.

  Returns:
    Array of `x.shape` and `x.dtype`.

  Example:
    >>> import jax.numpy as jnp, normjax as nj
    >>> nj.rms_norm(jnp.array([[3.0, 4.0]]), eps=0.0)
    Array([[0.84852815, 1.1313709 ]], dtype=float32)
  """
  x, axes, scale, _, mask, eps = _prepare(x, axis, eps, mask, axis_name, scale=scale, bias=None)
  y, _ = dispatch.standardize(x, axes, shapes.broadcast_to_axes(scale, x.ndim, axes), None,
                               eps, mask=mask, axis_name=axis_name, centered=False)
  return y


def add_layer_norm(x: jax.Array, residual: jax.Array, scale: jax.Array | None = None,
                   bias: jax.Array | None = None, *, axis: int | Sequence[int] = -1,
                   eps: float = 1e-5) -> tuple[jax.Array, jax.Array]:
  """`h = x + residual`, then `layer_norm(h, scale, bias, axis=axis, eps=eps)`; returns both.

  The residual stream of a pre-LN transformer block (`h` goes on to the next block, `y` into
  the attention or MLP). The sum is taken in `x.dtype` (rounded as `x + residual` would be)
  and normalized as `layer_norm` normalizes; the result equals `(layer_norm(h, ...), h)`,
  derivatives included, but `h` is written once: on CPU with the native kernels the add
  runs inside the normalization kernel (elsewhere XLA fuses it into the reductions).

  Args:
    x: floating input of any rank.
    residual: the residual stream, of `x.shape` and `x.dtype`.
    scale, bias, axis, eps: as in `layer_norm`.

  Returns:
    `(y, h)`, both of `x.shape` and `x.dtype`: the normalized sum and the sum.

  Raises:
    TypeError: `residual` of another dtype than `x`, and as `layer_norm`.
    ValueError: `residual` of another shape than `x`, and as `layer_norm`.

  Example:
    >>> import jax.numpy as jnp, normjax as nj
    >>> y, h = nj.add_layer_norm(jnp.array([[1.0, 2.0, 3.0]]), jnp.array([[1.0, 0.0, -1.0]]),
    ...                          eps=0.0)
    >>> h
    Array([[2., 2., 2.]], dtype=float32)
  """
  x, axes, scale, bias, _, eps = _prepare(x, axis, eps, None, None, scale=scale, bias=bias)
  residual = checks.check_residual(residual, x)
  feature = lambda p: shapes.broadcast_to_axes(p, x.ndim, axes)
  return dispatch.add_standardize(x, residual, axes, feature(scale), feature(bias), eps)


def add_rms_norm(x: jax.Array, residual: jax.Array, scale: jax.Array | None = None, *,
                 axis: int | Sequence[int] = -1,
                 eps: float = 1e-6) -> tuple[jax.Array, jax.Array]:
  """`h = x + residual`, then `rms_norm(h, scale, axis=axis, eps=eps)`; returns both.

  As `add_layer_norm`, for RMS norm.

  Returns:
    `(y, h)`, both of `x.shape` and `x.dtype`.

  Raises:
    TypeError, ValueError: as `add_layer_norm`.

  Example:
    >>> import jax.numpy as jnp, normjax as nj
    >>> y, h = nj.add_rms_norm(jnp.array([[1.0, 2.0]]), jnp.array([[2.0, 2.0]]), eps=0.0)
    >>> y
    Array([[0.84852815, 1.1313709 ]], dtype=float32)
  """
  x, axes, scale, _, _, eps = _prepare(x, axis, eps, None, None, scale=scale, bias=None)
  residual = checks.check_residual(residual, x)
  return dispatch.add_standardize(x, residual, axes,
                                   shapes.broadcast_to_axes(scale, x.ndim, axes), None, eps,
                                   centered=False)


def _prepare(x, axis, eps, mask, axis_name, *, scale, bias, fast_variance=False):
  """The checked arguments: `x`, canonical axes, `scale`, `bias`, `mask` and `eps` as a float."""
  x = checks.check_floating(x)
  axes = checks.canonicalize_axes(axis, x.ndim, "axis")
  if not axes and axis_name is None:
    raise ValueError(f"axis must name at least one axis to normalize over; got axis={axis!r}.")
  feature_shape = tuple(x.shape[a] for a in axes)
  scale = checks.check_param(scale, "scale", feature_shape)
  bias = checks.check_param(bias, "bias", feature_shape)
  eps = checks.check_eps(eps)
  checks.check_bool(fast_variance, "fast_variance", "True for the one-pass variance")
  return x, axes, scale, bias, checks.check_mask(mask, x.shape), eps
