"""Where a low-precision `x`'s rounding is pinned, and why.

Under `jit`, XLA may keep a bfloat16/float16 value made by a fused op (`x + residual`) in
float32 in some consumers and round it in others (excess precision). Every read of `x` by the
numerics goes through `pinned_reads` / `pin_rounding`, so that the reductions of `moments`, the
normalize step and the derivative all see `x` at its own rounding (without the pins,
`1e5 + N(0, 1)` in bfloat16 came out as garbage); `residual_sum` pins the sum it returns. A
kernel reads a materialized `x` (a custom call's operand); where XLA's normalize step reads `x`
beside a kernel, the dispatch pins `x` first. The pins overlap (a pin of a pinned value); the
compiled bfloat16 programs keep no copy of `x` for them (`tests/test_numerics_standardize.py`
checks the reference forward's scratch memory).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from normjax._src.numerics import platform


def pinned_reads(x: jax.Array, n: int) -> tuple[jax.Array, ...]:
  """`n` handles on `x`, each rounded to `x`'s own (sub-float32) dtype for every consumer.

  Under `jit`, XLA may compute a bfloat16/float16 value made by a fused op in float32 in some
  consumers and round it in others (excess precision, see `residual_sum`); each handle is
  pinned to the rounding. Float32 and wider come back as they are.

  On CPU the handles are the results of one `optimization_barrier`, so each consumer reads
  the materialized `x` (as a kernel does) through its own handle: XLA:CPU then gives each
  reduction over `x` its own bfloat16-to-float32 conversion inside its YNNPACK fusion,
  rather than writing a float32 copy of `x` that both read (a shared `convert`, or a
  `reduce_precision`, which YNNPACK does not fuse). Elsewhere a `reduce_precision`, which
  fuses into the consumers.
  """
  fi = jnp.finfo(x.dtype)
  if fi.bits >= 32:
    return (x,) * n

  def rounded(x):
    return (lax.reduce_precision(x, exponent_bits=fi.nexp, mantissa_bits=fi.nmant),) * n

  def materialized(x):
    return tuple(lax.optimization_barrier((x,) * n))
  return tuple(platform.platform_dependent(x, cpu=materialized, default=rounded))


def pin_rounding(x: jax.Array) -> jax.Array:
  """`x` rounded to its own (sub-float32) dtype for every consumer (`pinned_reads(x, 1)`)."""
  return pinned_reads(x, 1)[0]


def residual_sum(x: jax.Array, residual: jax.Array) -> jax.Array:
  """`x + residual` in `x.dtype`, rounded to it for every consumer.

  Under `jit`, XLA may keep a bfloat16/float16 sum in float32 where it fuses the add into a
  consumer (excess precision), so that the reductions and the normalize step of one call see
  differently rounded values (garbage for `1e5 + N(0, 1)` in bfloat16); `pin_rounding` pins
  the rounding, so the statistics are those of the `h` that is returned.

  The returned `h` also goes to consumers outside normjax (the next block), so it is rounded
  with `reduce_precision` on every platform as well: on CPU the `optimization_barrier` of
  `pin_rounding` does not survive to XLA:CPU's fused program, where a YNNPACK fusion read the
  sum in float32 (`tests/test_numerics_rounding.py`).
  """
  h = pin_rounding(x + residual)
  fi = jnp.finfo(h.dtype)
  if fi.bits >= 32:
    return h
  return lax.reduce_precision(h, exponent_bits=fi.nexp, mantissa_bits=fi.nmant)

