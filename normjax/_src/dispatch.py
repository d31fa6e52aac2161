"""Per call, a kernel whose plan applies, or the reference (`normjax._src.numerics`); the one
way from the variants to the maths.

The variants call `standardize` here with the reduced axes and the broadcast-shaped scale and
bias. `plan` looks at shapes, dtypes and arguments once, at trace time, and names the kernel
that applies (`Plan.kernel`); `standardize` then hands that kernel's `forward`/`tangent` to
the numerics' `standardize`, which owns the closed-form derivative either way. A kernel
applies when:

  * `implementation(...)` is not `"reference"` (the seam the tests use: each test body runs
    on every implementation),
  * the default backend has native kernels (`normjax._src.kernels.primitives.has_kernel`; today
    CPU with the native library built, and not with `NORMJAX_NATIVE=0`), or the choice is
    `"pallas"` (which needs no native library: Pallas lowers on every platform of
    `normjax._src.kernels.pallas.PLATFORMS`, in interpret mode on CPU),
  * `x` is float32 or bfloat16, non-empty, not sharded along an `Explicit` mesh axis (those
    keep XLA's own ops, which shard like any jax.numpy code), and `eps` is a concrete number,
  * there is no mask, named axis or `fast_variance`, and
  * `"rows"`: the reduced axes are the trailing axes, without channel groups, and the scale
    and bias vary along the reduced axes only (layer/RMS norm), the other axes only
    (instance norm with channels first, `per_row`), or the reduced axes and the first `k`
    other axes (per example: adaLN's `[B, 1, D]` modulation of `[B, T, D]`, `examples`);
    `"moments"`: centered statistics whose reduced axes and channel groups fit a moments
    kernel's view (batch/instance/group norm on NHWC, batch/group norm on NCHW); the
    backward's per-channel sums take a kernel too (`tangent`'s `spread`, see
    `normjax._src.kernels.moments`).

Under `"pallas"` only the `"rows"` plan takes a kernel (the Pallas kernels, for rows of at most
`pallas.MAX_FEATURES` values, on the `implementation="pallas"` primitives); everything else takes
the reference, never the native kernels.

`add_standardize` (the residual-add norms) takes the fused rows kernel
(`rows_add_forward_p`) where the plan is `"rows"` and `x` and the residual share a dtype (or,
native, `x` is bfloat16 and the residual float32: `rows_add_forward_mixed_p`), and
otherwise adds `x + residual` (in the residual's dtype) and calls `standardize` (XLA fuses
the add into the reference's reductions; the sum's rounding is pinned, see
`rounding.residual_sum`).
"""

from __future__ import annotations

import math
import numbers
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from normjax._src.kernels import gated
from normjax._src.kernels import moments
from normjax._src.kernels import pallas
from normjax._src.kernels import primitives
from normjax._src.kernels import rows
from normjax._src.kernels import tanh
from normjax._src.numerics import health
from normjax._src.numerics import pointwise
from normjax._src.numerics import renorm as _renorm_math
from normjax._src.numerics import rounding
from normjax._src.numerics import spectral
from normjax._src.numerics import standardize as numerics
from normjax._src.numerics.moments import Moments
from normjax._src.numerics.moments import stats_dtype
from normjax._src.shapes import Axes
from normjax._src.shapes import varying_axes

# What the variants use of the numerics besides `standardize` (no kernel applies to these).
rstd = numerics.rstd
residual_sum = rounding.residual_sum
renormalize = _renorm_math.renormalize
unit_vector = spectral.l2_normalize
power_iteration = spectral.power_iteration
offset_scale = pointwise.offset_scale
silu = pointwise.silu
l2_normalize = pointwise.l2_normalize
row_health = health.row_health
__all__ = ("Moments", "stats_dtype", "rstd", "residual_sum", "renormalize", "unit_vector",
           "power_iteration", "offset_scale", "silu", "dynamic_tanh", "l2_normalize",
           "row_health", "implementation", "plan", "standardize", "add_standardize",
           "gated_rms_norm", "normalize_with_stats")

IMPLEMENTATIONS = ("auto", "reference", "native", "pallas")
# The names `implementation` accepts.
AVAILABLE = IMPLEMENTATIONS
# Jit-cache-sensitive: a function traced under one implementation is traced again under another.
_CHOICE = jax.make_user_context(default_value="auto")


def implementation(name: str) -> Any:
  """Chooses the implementation every normjax function takes inside the `with` block.

  A context manager, thread-local and nestable, read by the dispatch at trace time (a jitted
  function is traced again when the choice changes).

  Args:
    name: `"auto"` (the default: the dispatch's plan picks per call), `"reference"` (the
      `jax.numpy` code, which GPUs and TPUs run by default), `"native"` (the CPU kernels
      wherever their plan applies, the reference elsewhere), or `"pallas"` (the Pallas
      kernels for layer and RMS norm over trailing axes, their residual-add and
      zero-centered forms: Triton on GPUs, Mosaic on TPUs, and Pallas interpret mode on CPUs,
      which is slow and meant for tests; the reference elsewhere). `"pallas"` is opt-in: no
      device run has shown it faster than the reference yet. Setting `NORMJAX_NATIVE=0` before
      importing normjax makes `"auto"` and `"native"` the reference, process-wide.

  Returns:
    A context manager.

  Raises:
    ValueError: an unknown name (the message lists the known ones).

  Example:
    >>> import jax.numpy as jnp, normjax as nj
    >>> with nj.implementation("reference"):
    ...   y = nj.layer_norm(jnp.array([[1.0, 3.0]]), eps=0.0)
    >>> y
    Array([[-1.,  1.]], dtype=float32)
  """
  if not isinstance(name, str) or name not in AVAILABLE:
    raise ValueError(f"implementation must be one of {', '.join(map(repr, AVAILABLE))}; got "
                     f"{name!r}, which is not an implementation.")
  return _CHOICE(name)


class Plan(NamedTuple):
  """Which implementation one call takes."""
  kernel: str | None  # "rows", "moments", or None for the reference
  per_row: bool = False  # "rows": scale and bias per row rather than per feature
  # "rows": scale and bias per example and feature, varying along the first `examples` axes
  # (adaLN's `[B, 1, D]` for `[B, T, D]`); 0: per feature (or per row)
  examples: int = 0
  implementation: str = "native"  # the kernel's lowering: "native" or "pallas"


REFERENCE = Plan(kernel=None)


def explicitly_sharded(x) -> bool:
  """Whether `x` is sharded along an `Explicit` mesh axis (its type carries the sharding)."""
  spec = getattr(getattr(jax.typeof(x), "sharding", None), "spec", None)
  return spec is not None and any(s is not None for s in spec)


def _concrete_eps(eps) -> bool:
  return (isinstance(eps, (numbers.Real, np.floating, np.integer))
          and not isinstance(eps, (bool, np.bool_)))


def _rows_layout(x, axes, scale, bias) -> Plan:
  """Plan("rows") if the parameters vary along the trailing reduced axes only (per feature),
  along the other axes only (per row), or along the reduced axes and the first `k` other axes
  (per example and feature, with runs of more than one row per example), else the reference."""
  lead = x.ndim - len(axes)

  def layout(p):
    if p.shape == (1,) * lead + x.shape[lead:]:
      return "feature"
    if all(d == 1 for d in p.shape[lead:]) and all(
        d in (1, n) for d, n in zip(p.shape, x.shape, strict=False)):
      return "row"
    for k in range(1, lead):
      if (p.shape == x.shape[:k] + (1,) * (lead - k) + x.shape[lead:]
          and math.prod(x.shape[k:lead]) > 1):
        return k
    return None
  layouts = {layout(p) for p in (scale, bias) if p is not None}
  if None in layouts or len(layouts) > 1:
    return REFERENCE
  chosen = layouts.pop() if layouts else "feature"
  if isinstance(chosen, int):
    return Plan(kernel="rows", examples=chosen)
  return Plan(kernel="rows", per_row=chosen == "row")


def plan(x: jax.Array, axes: Axes, scale, bias, eps, *, mask=None, axis_name=None,
         fast_variance: bool = False, centered: bool = True, groups=None) -> Plan:
  """The implementation `standardize` takes for these arguments (see the module doc)."""
  choice = _CHOICE.value
  use_pallas = choice == "pallas"
  if (choice == "reference"
      or not (use_pallas or primitives.has_kernel(jax.default_backend()))
      or jnp.dtype(x.dtype) not in primitives.NATIVE_DTYPES or x.size == 0 or not axes
      or mask is not None or axis_name is not None or fast_variance
      or not _concrete_eps(eps) or explicitly_sharded(x)):
    return REFERENCE
  if groups is None and tuple(axes) == tuple(range(x.ndim - len(axes), x.ndim)):
    p = _rows_layout(x, axes, scale, bias)
    if not use_pallas or p.kernel is None:
      return p
    lead = x.shape[:x.ndim - len(axes)]
    # Interpret mode (the CPU's Pallas) does not trace under `shard_map`'s `check_vma` (a
    # kernel's operands of different varying axes meet); on devices the kernels' outputs are
    # typed as varying like `x` (`pallas._call`), which no device run has checked yet.
    if varying_axes(jax.typeof(x)) and jax.default_backend() == "cpu":
      return REFERENCE
    if (math.prod(x.shape[x.ndim - len(axes):]) > pallas.MAX_FEATURES
        or (p.examples and math.prod(lead[p.examples:]) % pallas.EXAMPLE_ROWS_MULTIPLE)):
      return REFERENCE
    return p._replace(implementation="pallas")
  if centered and not use_pallas and moments.ops(x.shape, axes, groups, 0.0) is not None:
    return Plan(kernel="moments")
  return REFERENCE


def standardize(x: jax.Array, axes: Axes, scale: jax.Array | None,
                bias: jax.Array | None, eps: Any, *, mask: jax.Array | None = None,
                axis_name: Any = None, axis_index_groups: Any = None,
                fast_variance: bool = False, centered: bool = True,
                groups: tuple[int, int] | None = None) -> tuple[jax.Array, Moments]:
  """The numerics' `standardize` (same arguments and result) through the kernel `plan` picks."""
  p = plan(x, axes, scale, bias, eps, mask=mask, axis_name=axis_name,
           fast_variance=fast_variance, centered=centered, groups=groups)
  kw = dict(mask=mask, axis_name=axis_name, axis_index_groups=axis_index_groups,
            fast_variance=fast_variance, centered=centered, groups=groups)
  if p.kernel == "rows":
    forward, tangent = rows.ops(x.shape, len(axes), float(eps), centered=centered,
                                per_row=p.per_row, examples=p.examples,
                                implementation=p.implementation)
    return numerics.standardize(x, axes, scale, bias, eps, forward=forward, tangent_fn=tangent,
                             **kw)
  if p.kernel == "moments":
    # The kernel reads x and XLA's normalize step reads it again: both must see the same
    # rounding of a bfloat16 x made by a fused op (see `rounding.pin_rounding`).
    moment_ops = moments.ops(x.shape, axes, groups, float(eps))
    assert moment_ops is not None, "plan() chose the moments kernel, whose view fits"
    forward, spread = moment_ops

    def tangent(x, stats, rstd_, scale, dx, dscale, dbias, mask):
      return numerics.tangent(x, stats, rstd_, scale, dx, dscale, dbias, axes, mask=mask,
                           groups=groups, spread=spread)
    return numerics.standardize(rounding.pin_rounding(x), axes, scale, bias, eps, forward=forward,
                             tangent_fn=tangent, **kw)
  return numerics.standardize(x, axes, scale, bias, eps, **kw)


def add_standardize(x: jax.Array, residual: jax.Array, axes: Axes,
                    scale: jax.Array | None, bias: jax.Array | None, eps: Any, *,
                    centered: bool = True) -> tuple[jax.Array, jax.Array]:
  """`(standardize(h, ...)[0], h)` with `h = x + residual` in `residual.dtype`, through the
  fused rows kernel where `plan` picks `"rows"` and `x` has that dtype too, or (native) is
  bfloat16 with a float32 residual (the kernel widens `x`, writes `h` in float32 and `y` in
  bfloat16); else XLA converts `x` inside the add's one pass and the norm reads `h` (the
  same-dtype kernel would read a converted copy of `x`, one more pass: 1.06-1.25x the forward
  and 1.17-1.36x the training step)."""
  p = plan(x, axes, scale, bias, eps, centered=centered)
  mixed = (p.implementation == "native" and x.dtype == jnp.bfloat16
           and residual.dtype == jnp.float32)
  if p.kernel == "rows" and (x.dtype == residual.dtype or mixed):
    add_forward, add_tangent = rows.add_ops(x.shape, len(axes), float(eps), centered=centered,
                                            per_row=p.per_row, examples=p.examples,
                                            implementation=p.implementation)
    return numerics.add_standardize(x, residual, axes, scale, bias, eps, centered=centered,
                                 add_forward=add_forward, add_tangent=add_tangent)
  h = rounding.residual_sum(x.astype(residual.dtype), residual)
  y, _ = standardize(h, axes, scale, bias, eps, centered=centered)
  return y, h


def _native_feature_rows(p: Plan) -> bool:
  """Whether `p` is the native `"rows"` kernel with per-feature parameters: what the gated
  and dynamic tanh kernels take (no per-row or per-example parameters, no Pallas kernel)."""
  return (p.kernel == "rows" and not p.per_row and not p.examples
          and p.implementation == "native")


def gated_rms_norm(x: jax.Array, z: jax.Array, axes: Axes, scale: jax.Array | None, eps: Any,
                   *, before: bool, group_size: int | None = None) -> jax.Array | None:
  """The gated RMS norm (`gated.gated_rms_norm`) through the gated rows kernel, where `plan`
  picks the native `"rows"` kernel with per-feature `scale` for the norm over `axes` and `z`
  has `x`'s dtype (with `group_size`, the groups of the one trailing axis are the kernel's
  rows); else None (the caller composes it from `standardize` and `silu`)."""
  if not _native_feature_rows(plan(x, axes, scale, None, eps, centered=False)) or (
      z.dtype != x.dtype) or (group_size is not None and x.shape[-1] == 0):
    return None
  return gated.gated_rms_norm(x, z, scale, len(axes), float(eps), before=before,
                              group_size=group_size)


def dynamic_tanh(x: jax.Array, alpha: jax.Array, scale: jax.Array | None,
                 bias: jax.Array | None, axes: Axes) -> jax.Array:
  """The numerics' `dynamic_tanh` (`scale` and `bias` broadcast-shaped, varying along `axes`);
  where `plan` picks the native `"rows"` kernel with per-feature parameters, its derivative
  goes through the dynamic tanh backward kernel (`kernels.tanh`; the forward is XLA's
  either way)."""
  if _native_feature_rows(plan(x, axes, scale, bias, 0.0)):
    return tanh.dynamic_tanh(x, alpha, scale, bias, len(axes))
  return pointwise.dynamic_tanh(x, alpha, scale, bias)


def normalize_with_stats(x: jax.Array, mean: jax.Array, var: jax.Array,
                         scale: jax.Array | None, bias: jax.Array | None, eps: Any) -> jax.Array:
  """`(x - mean) * rsqrt(var + eps) * scale + bias` with given statistics (batch norm in
  evaluation), all broadcast-shaped against `x`; computed in `stats_dtype(x.dtype)` and
  returned in `x.dtype`. One elementwise pass that XLA fuses with its neighbours: no kernel."""
  dtype = stats_dtype(x.dtype)
  # Given statistics have no count (normalize does not read it).
  given = Moments(shift=None, offset=mean.astype(dtype), var=var.astype(dtype),
                  count=None)  # type: ignore[arg-type]
  return numerics.normalize(x, given, scale, bias, eps)
