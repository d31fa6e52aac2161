"""The health of a normalization's input (`norm_health`): opt-in diagnostics, cheap enough to
run every step under `jit`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax

from normjax._src import checks
from normjax._src import dispatch


class NormHealth(NamedTuple):
  """Fractions (float32 scalars in [0, 1]) of the statistics rows of a normalization's input.

  The rows are the groups `layer_norm(x, axis=axis)` normalizes. A row with a NaN or Inf counts
  as `nonfinite` and in no other field.

  Attributes:
    ill_conditioned: `0 < var` and `mean**2 > 1e4 * var`, where a one-pass variance
      `E[x^2] - E[x]^2` loses four or more of float32's seven digits (PyTorch #51102: layer
      norm wrong at mean 2000).
    eps_dominated: `var < eps`, constant rows included: the norm only rescales by `1/sqrt(eps)`.
    constant: `var == 0` (fully masked rows included).
    nonfinite: a NaN or Inf in the row.

  Example:
    >>> import jax.numpy as jnp, normjax as nj
    >>> x = jnp.array([[1.0, 2.0], [5.0, 5.0], [1e4, 1e4 + 1.0], [0.0, jnp.nan]])
    >>> [round(float(v), 2) for v in nj.norm_health(x)]
    [0.25, 0.25, 0.25, 0.25]
  """
  ill_conditioned: jax.Array
  eps_dominated: jax.Array
  constant: jax.Array
  nonfinite: jax.Array


# `jax.export` serializes programs returning a `NormHealth` under this name.
jax.export.register_namedtuple_serialization(NormHealth, serialized_name="normjax.NormHealth")


def norm_health(x: jax.Array, *, axis: int | Sequence[int] = -1, eps: float = 1e-5,
                mask: jax.Array | None = None) -> NormHealth:
  """Which rows of `x` a normalization over `axis` would find ill-conditioned, dominated by
  `eps`, constant or non-finite: a signal for silent failures (a layer norm at mean 2000 in
  float32, an fp16 RMS norm overflowing) that no output shows.

  Args:
    x: floating input of the normalization.
    axis: the normalized axis or axes (as `layer_norm`'s).
    eps: the normalization's eps, for `eps_dominated`.
    mask: optional bool array broadcastable to `x`; only True elements count.

  Returns:
    A `NormHealth` of float32 scalars.

  Raises:
    TypeError, ValueError: a bad `x`, `axis`, `eps` or `mask`, as `layer_norm`.

  Example:
    >>> import jax.numpy as jnp, normjax as nj
    >>> nj.norm_health(jnp.array([[2000.0, 2000.01], [1.0, -1.0]])).ill_conditioned
    Array(0.5, dtype=float32)
  """
  x = checks.check_floating(x)
  axes = checks.canonicalize_axes(axis, x.ndim, "axis")
  if not axes:
    raise ValueError(f"axis must name at least one axis to normalize over; got axis={axis!r}.")
  eps = checks.check_eps(eps)
  mask = checks.check_mask(mask, x.shape)
  return NormHealth(*dispatch.row_health(x, axes, eps, mask))
