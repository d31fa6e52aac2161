"""Per call, a kernel whose plan applies, or the reference (`normjax._core`).

The variants call `standardize` here with the reduced axes and the broadcast-shaped scale and
bias. `plan` looks at shapes, dtypes and arguments once, at trace time, and names the kernel
that applies (`Plan.kernel`); `standardize` then hands that kernel's `forward`/`tangent` to
`_core.standardize`, which owns the closed-form derivative either way. A kernel applies when:

  * the default backend has native kernels (`normjax._src.kernels.primitives.has_kernel`; today
    CPU with the native library built, and not with `NORMJAX_NATIVE=0`),
  * `x` is float32 or bfloat16, non-empty, not sharded along an `Explicit` mesh axis (those
    keep XLA's own ops, which shard like any jax.numpy code), and `eps` is a concrete number,
  * there is no mask, named axis or `fast_variance`, and
  * `"rows"`: the reduced axes are the trailing axes, without channel groups, and the scale
    and bias vary along the reduced axes only (layer/RMS norm) or the other axes only
    (instance norm with channels first, `per_row`);
    `"moments"`: centered statistics whose reduced axes and channel groups fit a moments
    kernel's view (batch/instance/group norm on NHWC, batch/group norm on NCHW); the
    backward's per-channel sums take a kernel too (`_core.tangent`'s `spread`, see
    `normjax._src.kernels.moments`).

`add_standardize` (the residual-add norms) takes the fused rows kernel
(`rows_add_forward_p`) where the plan is `"rows"`, and otherwise adds `x + residual` and
calls `standardize` (XLA fuses the add into the reference's reductions; the sum's rounding
is pinned, see `_core.residual_sum`).
"""

from __future__ import annotations

import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from normjax import _axes
from normjax import _core
from normjax._src.kernels import moments
from normjax._src.kernels import primitives
from normjax._src.kernels import rows


class Plan(NamedTuple):
  """Which implementation one call takes."""
  kernel: str | None  # "rows", "moments", or None for the reference
  per_row: bool = False  # "rows": scale and bias per row rather than per feature


REFERENCE = Plan(kernel=None)


def explicitly_sharded(x) -> bool:
  """Whether `x` is sharded along an `Explicit` mesh axis (its type carries the sharding)."""
  spec = getattr(getattr(jax.typeof(x), "sharding", None), "spec", None)
  return spec is not None and any(s is not None for s in spec)


def _concrete_eps(eps) -> bool:
  return (isinstance(eps, (numbers.Real, np.floating, np.integer))
          and not isinstance(eps, (bool, np.bool_)))


def _rows_layout(x, axes, scale, bias) -> Plan:
  """Plan("rows") if the parameters vary along the trailing reduced axes only (per feature)
  or along the other axes only (per row), else the reference."""
  lead = x.ndim - len(axes)

  def layout(p):
    if p.shape == (1,) * lead + x.shape[lead:]:
      return False
    if all(d == 1 for d in p.shape[lead:]) and all(d in (1, n) for d, n in zip(p.shape, x.shape)):
      return True
    return None
  layouts = {layout(p) for p in (scale, bias) if p is not None}
  if None in layouts or len(layouts) > 1:
    return REFERENCE
  return Plan(kernel="rows", per_row=layouts.pop() if layouts else False)


def plan(x: jax.Array, axes: _axes.Axes, scale, bias, eps, *, mask=None, axis_name=None,
         fast_variance: bool = False, centered: bool = True, groups=None) -> Plan:
  """The implementation `standardize` takes for these arguments (see the module doc)."""
  if (not primitives.has_kernel(jax.default_backend())
      or jnp.dtype(x.dtype) not in primitives.NATIVE_DTYPES or x.size == 0 or not axes
      or mask is not None or axis_name is not None or fast_variance
      or not _concrete_eps(eps) or explicitly_sharded(x)):
    return REFERENCE
  if groups is None and tuple(axes) == tuple(range(x.ndim - len(axes), x.ndim)):
    return _rows_layout(x, axes, scale, bias)
  if centered and moments.ops(x.shape, axes, groups, 0.0) is not None:
    return Plan(kernel="moments")
  return REFERENCE


def standardize(x: jax.Array, axes: _axes.Axes, scale: jax.Array | None,
                bias: jax.Array | None, eps: Any, *, mask: jax.Array | None = None,
                axis_name: Any = None, axis_index_groups: Any = None,
                fast_variance: bool = False, centered: bool = True,
                groups: tuple[int, int] | None = None) -> tuple[jax.Array, _core.Moments]:
  """`_core.standardize` (same arguments and result) through the kernel `plan` picks."""
  p = plan(x, axes, scale, bias, eps, mask=mask, axis_name=axis_name,
           fast_variance=fast_variance, centered=centered, groups=groups)
  kw = dict(mask=mask, axis_name=axis_name, axis_index_groups=axis_index_groups,
            fast_variance=fast_variance, centered=centered, groups=groups)
  if p.kernel == "rows":
    forward, tangent = rows.ops(x.shape, len(axes), float(eps), centered=centered,
                                per_row=p.per_row)
    return _core.standardize(x, axes, scale, bias, eps, forward=forward, tangent_fn=tangent,
                             **kw)
  if p.kernel == "moments":
    # The kernel reads x and XLA's normalize step reads it again: both must see the same
    # rounding of a bfloat16 x made by a fused op (see `_core.pin_rounding`).
    forward, spread = moments.ops(x.shape, axes, groups, float(eps))

    def tangent(x, stats, rstd_, scale, dx, dscale, dbias, mask):
      return _core.tangent(x, stats, rstd_, scale, dx, dscale, dbias, axes, mask=mask,
                           groups=groups, spread=spread)
    return _core.standardize(_core.pin_rounding(x), axes, scale, bias, eps, forward=forward,
                             tangent_fn=tangent, **kw)
  return _core.standardize(x, axes, scale, bias, eps, **kw)


def add_standardize(x: jax.Array, residual: jax.Array, axes: _axes.Axes,
                    scale: jax.Array | None, bias: jax.Array | None, eps: Any, *,
                    centered: bool = True) -> tuple[jax.Array, jax.Array]:
  """`(standardize(h, ...)[0], h)` with `h = x + residual`, through the fused rows kernel
  where `plan` picks `"rows"`."""
  p = plan(x, axes, scale, bias, eps, centered=centered)
  if p.kernel == "rows":
    add_forward, tangent = rows.add_ops(x.shape, len(axes), float(eps), centered=centered,
                                        per_row=p.per_row)
    return _core.add_standardize(x, residual, axes, scale, bias, eps, centered=centered,
                                 add_forward=add_forward, tangent_fn=tangent)
  h = _core.residual_sum(x, residual)
  y, _ = standardize(h, axes, scale, bias, eps, centered=centered)
  return y, h
