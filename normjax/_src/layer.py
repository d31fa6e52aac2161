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
               axis_name: Any = None, fast_variance: bool = False,
               scale_offset: float = 0.0) -> jax.Array:
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
    scale_offset: a Python float added to `scale` (formed in float32 whatever the parameter
      dtype): `y = xhat * (scale_offset + scale) + bias`, the zero-centered scale of Gemma and
      Qwen3-Next (`scale_offset=1.0` with `scale` initialised to zeros).

  Returns:
    Array of `x.shape` and `x.dtype`.

  Raises:
    TypeError: non-floating `x`, `scale` or `bias`, an `axis` that is not an int or a tuple of
      ints, a non-real `eps` (bool, complex, string), a non-bool `fast_variance`, a
      non-boolean `mask`, or a `scale_offset` that is not a finite number.
    ValueError: out-of-range or repeated axes, `scale`/`bias` of the wrong shape, a negative,
      NaN or infinite `eps`, a mask not broadcastable to `x`, or a non-zero `scale_offset`
      without a `scale`.

  Example:
    >>> import jax.numpy as jnp, normjax as nj
    >>> nj.layer_norm(jnp.array([[1.0, 2.0, 3.0]]), eps=0.0).round(4)
    Array([[-1.2247,  0.    ,  1.2247]], dtype=float32)
  """
  x, axes, scale, bias, mask, eps = _prepare(x, axis, eps, mask, axis_name, scale=scale,
                                             bias=bias, fast_variance=fast_variance,
                                             scale_offset=scale_offset)
  feature = lambda p: shapes.broadcast_to_axes(p, x.ndim, axes)
  y, _ = dispatch.standardize(x, axes, feature(scale), feature(bias), eps,
                               mask=mask, axis_name=axis_name, fast_variance=fast_variance)
  return y


def rms_norm(x: jax.Array, scale: jax.Array | None = None, *, axis: int | Sequence[int] = -1,
             eps: float = 1e-6, mask: jax.Array | None = None, axis_name: Any = None,
             scale_offset: float = 0.0) -> jax.Array:
  """RMS normalization (Zhang & Sennrich, 2019): `x * rsqrt(mean(x**2) + eps) * scale`.

  No mean is subtracted and there is no bias. `axis`, `mask`, `axis_name` and `scale_offset`
  are as in `layer_norm`; `scale` has the shape of the normalized axes in increasing order.
  Equals `torch.nn.RMSNorm(C, eps=eps)` for `axis=-1`; Gemma's RMS norm is
  `rms_norm(x, w, scale_offset=1.0)` with `w` initialised to zeros. The factor
  `rsqrt(mean(x**2) + eps) * (scale_offset + scale)` is applied in float32 and the product
  rounded to `x.dtype` once (Gemma's Hugging Face order; Llama's rounds the normalized `x` to
  `x.dtype` before the scale multiply: `rms_norm(x).astype(x.dtype) * scale` gives that).

  Returns:
    Array of `x.shape` and `x.dtype`.

  Example:
    >>> import jax.numpy as jnp, normjax as nj
    >>> nj.rms_norm(jnp.array([[3.0, 4.0]]), eps=0.0)
    Array([[0.84852815, 1.1313709 ]], dtype=float32)
  """
  x, axes, scale, _, mask, eps = _prepare(x, axis, eps, mask, axis_name, scale=scale, bias=None,
                                          scale_offset=scale_offset)
  y, _ = dispatch.standardize(x, axes, shapes.broadcast_to_axes(scale, x.ndim, axes), None,
                               eps, mask=mask, axis_name=axis_name, centered=False)
  return y


def add_layer_norm(x: jax.Array, residual: jax.Array, scale: jax.Array | None = None,
                   bias: jax.Array | None = None, *, axis: int | Sequence[int] = -1,
                   eps: float = 1e-5, scale_offset: float = 0.0,
                   residual_dtype: Any = None) -> tuple[jax.Array, jax.Array]:
  """`h = x + residual`, then `layer_norm(h, scale, bias, axis=axis, eps=eps)`; returns both.

  The residual stream of a pre-LN transformer block (`h` goes on to the next block, `y` into
  the attention or MLP). The sum is taken in `x.dtype` (rounded as `x + residual` would be)
  and normalized as `layer_norm` normalizes; the result equals `(layer_norm(h, ...), h)`,
  derivatives included, but `h` is written once: on CPU with the native kernels the add
  runs inside the normalization kernel (elsewhere XLA fuses it into the reductions).

  Args:
    x: floating input of any rank.
    residual: the residual stream, of `x.shape`, and of `x.dtype` or `residual_dtype`.
    scale, bias, axis, eps, scale_offset: as in `layer_norm`.
    residual_dtype: None (the sum in `x.dtype`), or a floating dtype in which the sum `h` is
      formed, kept and returned (flash-attention's `residual_in_fp32` is
      `residual_dtype=jnp.float32`); `y` keeps `x.dtype` either way.

  Returns:
    `(y, h)` of `x.shape`: the normalized sum in `x.dtype`, and the sum in `residual_dtype`
    (or `x.dtype`).

  Raises:
    TypeError: `residual` of another dtype than `x` (and `residual_dtype`), a
      `residual_dtype` that is not a floating dtype, and as `layer_norm`.
    ValueError: `residual` of another shape than `x`, and as `layer_norm`.

  Example:
    >>> import jax.numpy as jnp, normjax as nj
    >>> y, h = nj.add_layer_norm(jnp.array([[1.0, 2.0, 3.0]]), jnp.array([[1.0, 0.0, -1.0]]),
    ...                          eps=0.0)
    >>> h
    Array([[2., 2., 2.]], dtype=float32)
  """
  x, axes, scale, bias, _, eps = _prepare(x, axis, eps, None, None, scale=scale, bias=bias,
                                          scale_offset=scale_offset)
  return _add_norm(x, residual, axes, scale, bias, eps, residual_dtype, centered=True)


def add_rms_norm(x: jax.Array, residual: jax.Array, scale: jax.Array | None = None, *,
                 axis: int | Sequence[int] = -1, eps: float = 1e-6, scale_offset: float = 0.0,
                 residual_dtype: Any = None) -> tuple[jax.Array, jax.Array]:
  """`h = x + residual`, then `rms_norm(h, scale, axis=axis, eps=eps)`; returns both.

  As `add_layer_norm` (`scale_offset`, `residual_dtype` included), for RMS norm.

  Returns:
    `(y, h)` of `x.shape`: `y` in `x.dtype`, `h` in `residual_dtype` (or `x.dtype`).

  Raises:
    TypeError, ValueError: as `add_layer_norm`.

  Example:
    >>> import jax.numpy as jnp, normjax as nj
    >>> y, h = nj.add_rms_norm(jnp.array([[1.0, 2.0]]), jnp.array([[2.0, 2.0]]), eps=0.0)
    >>> y
    Array([[0.84852815, 1.1313709 ]], dtype=float32)
  """
  x, axes, scale, _, _, eps = _prepare(x, axis, eps, None, None, scale=scale, bias=None,
                                       scale_offset=scale_offset)
  return _add_norm(x, residual, axes, scale, None, eps, residual_dtype, centered=False)


def _add_norm(x: jax.Array, residual: Any, axes: shapes.Axes, scale: jax.Array | None,
              bias: jax.Array | None, eps: Any, residual_dtype: Any, *,
              centered: bool) -> tuple[jax.Array, jax.Array]:
  """The residual-add norm with checked parameters; `h` in `residual_dtype` if given."""
  residual_dtype = checks.check_dtype(residual_dtype, "residual_dtype")
  residual = checks.check_residual(residual, x, residual_dtype)
  feature = lambda p: shapes.broadcast_to_axes(p, x.ndim, axes)
  dtype = x.dtype if residual_dtype is None else residual_dtype
  y, h = dispatch.add_standardize(x, residual.astype(dtype), axes, feature(scale),
                                  feature(bias), eps, centered=centered)
  return y.astype(x.dtype), h


def _prepare(x, axis, eps, mask, axis_name, *, scale, bias, fast_variance=False,
             scale_offset=0.0):
  """The checked arguments: `x`, canonical axes, `scale` (plus `scale_offset`, in at least
  float32), `bias`, `mask` and `eps` as a float."""
  x = checks.check_floating(x)
  axes = checks.canonicalize_axes(axis, x.ndim, "axis")
  if not axes and axis_name is None:
    raise ValueError(f"axis must name at least one axis to normalize over; got axis={axis!r}.")
  feature_shape = tuple(x.shape[a] for a in axes)
  scale = checks.check_param(scale, "scale", feature_shape)
  bias = checks.check_param(bias, "bias", feature_shape)
  eps = checks.check_eps(eps)
  checks.check_bool(fast_variance, "fast_variance", "True for the one-pass variance")
  offset = checks.check_scale_offset(scale_offset, scale)
  if scale is not None:
    scale = dispatch.offset_scale(scale, offset)
  return x, axes, scale, bias, checks.check_mask(mask, x.shape), eps
