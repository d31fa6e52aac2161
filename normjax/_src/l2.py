"""Unit-norm activations (nGPT; an L2 QK-norm): `x / max(||x||, eps)`."""

from __future__ import annotations

from collections.abc import Sequence

import jax

from normjax._src import checks
from normjax._src import dispatch


def l2_normalize(x: jax.Array, *, axis: int | Sequence[int] = -1,
                 eps: float = 1e-12) -> jax.Array:
  """L2 normalization: `x / max(||x||, eps)` over `axis` (PyTorch's `F.normalize`).

  Computed in float32 (float64 for float64 input) and returned in `x.dtype`. The floor is on
  the norm, not on its square, so a vector of norm >= `eps` comes out of unit norm however
  small it is; a zero vector stays zero, with finite derivatives.

  Args:
    x: floating input.
    axis: the axis or axes of the norm.
    eps: the floor on the norm: a finite number >= 0.

  Returns:
    Array of `x.shape` and `x.dtype`.

  Raises:
    TypeError: a non-floating `x`, a bad `axis` or a non-real `eps`.
    ValueError: axes out of range or repeated, no axis, or a negative, NaN or infinite `eps`.

  Example:
    >>> import jax.numpy as jnp, normjax as nj
    >>> nj.l2_normalize(jnp.array([[3.0, 4.0], [0.0, 0.0]]))
    Array([[0.6, 0.8],
           [0. , 0. ]], dtype=float32)
  """
  x = checks.check_floating(x)
  axes = checks.canonicalize_axes(axis, x.ndim, "axis")
  if not axes:
    raise ValueError(f"axis must name at least one axis of the norm; got axis={axis!r}.")
  return dispatch.l2_normalize(x, axes, checks.check_eps(eps))
