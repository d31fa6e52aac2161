"""Pallas kernels for the row primitives (`normjax._src.kernels.rows`): Triton on GPUs, Mosaic
on TPUs, Pallas interpret mode on CPUs (for the tests).

Each kernel computes what its primitive's `jax.numpy` definition computes, on `[rows, n]`
blocks that hold whole rows (a grid over blocks of rows; the last block may be ragged):

  * `forward`: `x, scale, bias -> y, shift, offset, var`. One read of `x`, one write of `y`.
    The statistics are taken on the loaded block: `shift = sum(x) / n`, then the sums of
    `d = x - shift` and of `d**2` give `offset = sum(d) / n` and
    `var = (sum(d**2) - sum(d) * offset) / n`, clamped at zero (the numerics' shifted pass, see
    `normjax._src.numerics.moments`); uncentered (RMS): `var = sum(x**2) / n`, shift and offset
    zero. `y` is the numerics' `normalize` of the block (NaN rows where `var` is not finite).
  * `add_forward`: the same for `h = x + residual` (in `x.dtype`), which it also writes.
  * `backward`: `x, g, shift, offset, rstd, scale -> dx, dscale, dbias`, the transpose of the
    tangent (`_backward_reference` in rows.py): one read of `x` and `g`, `xhat` recomputed from
    the saved statistics, one write of `dx`; per-feature `dscale`/`dbias` as one partial sum per
    block of rows (`[blocks, n]`), summed outside the kernel (per-row ones are written per row).

Scale and bias are per feature, per row, or per example and feature (`example_rows`: adaLN's
`[B, 1, D]`, as `[examples, 1, n]`; each example's rows a multiple of `EXAMPLE_ROWS_MULTIPLE`,
so that a block lies within one example and its partial `dscale`/`dbias` sums add up per
example).

Statistics and arithmetic are float32 (bfloat16 in, float32 statistics, `x.dtype` out).
Blocks: on GPUs (and in interpret mode) the feature axis is padded to a power of two, as
Triton requires, and masked; on TPUs a block spans the whole feature axis. Block sizes are
fixed, not tuned on a device; `MAX_FEATURES` bounds the rows a block may hold (the dispatch
takes the reference beyond it).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from normjax._src.numerics.moments import Moments
from normjax._src.numerics.standardize import normalize
from normjax._src.shapes import varying_axes

try:   # a jaxlib without a platform's Pallas backend lowers the reference there
  from jax.experimental.pallas import tpu as pltpu
except ImportError:  # pragma: no cover
  pltpu = None  # type: ignore[assignment]
try:
  from jax.experimental.pallas import triton as pltriton
except ImportError:  # pragma: no cover
  pltriton = None  # type: ignore[assignment]

F32 = jnp.dtype(jnp.float32)
Ref = Any  # a kernel's reference to a block in memory (`ref[...]` reads, `ref[...] = v` writes)
# The longest row (features) a block holds; `normjax._src.dispatch` takes the reference beyond.
MAX_FEATURES = 1 << 15
# Platforms with a Pallas lowering (on "cpu" the kernels run in interpret mode).
PLATFORMS = ("cpu",) + (("cuda",) if pltriton else ()) + (("tpu",) if pltpu else ())
# A block holds about this many elements (at most `_MAX_BLOCK_ROWS` rows, at least one).
_BLOCK_ELEMENTS = 4096
_MAX_BLOCK_ROWS = 16
# Per-example parameters take the kernels when each example's rows are a multiple of this (so
# that a block of rows lies within one example on every platform).
EXAMPLE_ROWS_MULTIPLE = _MAX_BLOCK_ROWS


class _Layout(NamedTuple):
  """How a `[rows, n]` input is cut into blocks on one platform."""
  rows: int
  n: int
  block_rows: int
  block_n: int  # >= n: the feature axis as the kernel sees it (padded on GPUs)
  interpret: bool
  compiler_params: Any

  @property
  def blocks(self) -> int:
    return pl.cdiv(self.rows, self.block_rows)

  def spec(self, per_row: bool, example_rows: int = 0) -> pl.BlockSpec:
    """The block of a `[rows, 1]` (per-row), `[1, n]` (per-feature) or `[examples, 1, n]`
    (per-example, `example_rows` rows each; 3-D so that a block's last two dimensions are the
    array's, as Mosaic requires) operand."""
    if per_row:
      return pl.BlockSpec((self.block_rows, 1), lambda i: (i, 0))
    if example_rows:
      per_block = example_rows // self.block_rows
      return pl.BlockSpec((pl.squeezed, 1, self.block_n),
                          lambda i: (lax.div(i, per_block), 0, 0))
    return pl.BlockSpec((1, self.block_n), lambda i: (0, 0))

  @property
  def matrix(self) -> pl.BlockSpec:
    """The block of a `[rows, n]` operand."""
    return pl.BlockSpec((self.block_rows, self.block_n), lambda i: (i, 0))


def _pow2_floor(v: int) -> int:
  return 1 << (max(v, 1).bit_length() - 1)


def _layout(shape: tuple[int, ...], platform: str, example_rows: int = 0) -> _Layout:
  """The blocks on `platform`; with per-example parameters (`example_rows`, a multiple of
  `EXAMPLE_ROWS_MULTIPLE`) a block's rows lie within one example."""
  rows, n = shape
  if platform == "tpu":
    # Mosaic: a block's last two dimensions are multiples of (16, 128) (bfloat16's tile) or
    # the array's own.
    block_rows = rows if rows <= _MAX_BLOCK_ROWS and not example_rows else _MAX_BLOCK_ROWS
    params: Any = pltpu.CompilerParams(dimension_semantics=("parallel",))
    return _Layout(rows, n, block_rows, n, False, params)
  # Triton (and interpret mode, which runs the GPU's blocks): power-of-two block shapes, which
  # divide `_MAX_BLOCK_ROWS` and so `example_rows`.
  block_n = pl.next_power_of_2(max(n, 1))
  block_rows = min(_MAX_BLOCK_ROWS, _pow2_floor(_BLOCK_ELEMENTS // block_n))
  if platform == "cpu":
    return _Layout(rows, n, block_rows, block_n, True, None)
  warps = min(16, max(4, _pow2_floor(block_rows * block_n // 2048)))
  params = pltriton.CompilerParams(num_warps=warps)
  return _Layout(rows, n, block_rows, block_n, False, params)


def _call(kernel: Callable[..., None], layout: _Layout, name: str, in_specs: list[pl.BlockSpec],
          out_specs: list[pl.BlockSpec], out_shape: list[jax.ShapeDtypeStruct]) -> Any:
  """The `pallas_call` of `kernel` over the blocks of rows, as a function of its operands.

  In interpret mode the kernel's HLO is inlined into the program, where XLA could fuse its
  operands' producers into it (a bfloat16 `x + r` read with float32's excess precision) and
  recompute its outputs inside their consumers: an `optimization_barrier` on both sides
  materializes them, as a device's custom call does.

  Inside `jax.shard_map` (with `check_vma`), the operands are made to vary over the mesh axes
  any of them varies over, and the outputs are typed as varying over those too (a kernel's
  outputs differ between devices wherever its input does)."""
  def run(*args: jax.Array) -> Any:
    varying = frozenset().union(*(varying_axes(jax.typeof(a)) for a in args))
    if varying:
      args = tuple(_pvary(a, varying) for a in args)
    shapes = [jax.ShapeDtypeStruct(o.shape, o.dtype,
                                   manual_axis_type=jax.typeof(args[0]).manual_axis_type)
              for o in out_shape] if varying else out_shape
    call = pl.pallas_call(kernel, out_shape=shapes, grid=(layout.blocks,), in_specs=in_specs,
                          out_specs=out_specs, interpret=layout.interpret,
                          compiler_params=layout.compiler_params, name=name)
    if not layout.interpret:
      return call(*args)
    return lax.optimization_barrier(call(*lax.optimization_barrier(args)))
  return run


def _pvary(a: jax.Array, axes: frozenset[str]) -> jax.Array:
  missing = tuple(sorted(axes - varying_axes(jax.typeof(a))))
  return lax.pcast(a, missing, to="varying") if missing else a


# ----------------------------------------------------------------- inside a block

def _masks(layout: _Layout) -> tuple[jax.Array | None, jax.Array | None]:
  """`(rows [block_rows, 1], columns [1, block_n])`: where the block holds data, or None where
  all of it does (a ragged last block reads and writes past the array's end; padded features
  lie past `n`)."""
  rows = cols = None
  if layout.rows % layout.block_rows:
    first = pl.program_id(0) * layout.block_rows
    rows = first + lax.broadcasted_iota(jnp.int32, (layout.block_rows, 1), 0) < layout.rows
  if layout.block_n != layout.n:
    cols = lax.broadcasted_iota(jnp.int32, (1, layout.block_n), 1) < layout.n
  return rows, cols


def _zero_outside(v: jax.Array, *masks: jax.Array | None) -> jax.Array:
  """`v` where every mask holds, zero elsewhere (what lies outside may be NaN)."""
  for m in masks:
    if m is not None:
      v = jnp.where(m, v, jnp.zeros((), v.dtype))
  return v


def _row_sum(v: jax.Array) -> jax.Array:
  return jnp.sum(v, axis=1, keepdims=True)


def _shift(mean: jax.Array) -> jax.Array:
  """`mean` with its last mantissa bit cleared (within an ulp; any value near the mean does).

  The bit operation keeps a compiler from contracting `x - sum * (1 / n)` (a divide by a
  constant becomes a multiply by its reciprocal) into a fused multiply-add wherever the shift
  is used: the shift the kernel subtracts is then the one it writes (in interpret mode, XLA did
  so inside the normalize step, and the outputs were half an ulp of a 1e5 mean off). It plays
  the part of `reduce_precision` in `normjax._src.numerics.moments`, which Pallas does not
  lower."""
  bits = lax.bitcast_convert_type(mean, jnp.int32)
  return lax.bitcast_convert_type(bits & jnp.int32(-2), F32)


def _statistics(xf: jax.Array, cols: jax.Array | None, n: int,
                centered: bool) -> tuple[jax.Array, jax.Array, jax.Array]:
  """`(shift, offset, var)`, each `[block_rows, 1]`, of a float32 block zero past `n`."""
  if not centered:
    zero = jnp.zeros((xf.shape[0], 1), F32)
    return zero, zero, _row_sum(xf * xf) / n
  shift = _shift(_row_sum(xf) / n)
  d = _zero_outside(xf - shift, cols)
  t1, t2 = _row_sum(d), _row_sum(d * d)
  offset = t1 / n
  var = (t2 - t1 * offset) / n
  # Clamped at zero; a NaN stays NaN (`max` may not propagate it on every backend).
  return shift, offset, jnp.where(var < 0, jnp.zeros((), F32), var)


def _normalize_block(layout: _Layout, x: jax.Array, scale: jax.Array, bias: jax.Array,
                     eps: float, centered: bool) -> tuple[jax.Array, ...]:
  """`(y, shift, offset, var)` of a block `x` (in `x.dtype`) whose rows lie in whole."""
  _, cols = _masks(layout)
  shift, offset, var = _statistics(_zero_outside(x.astype(F32), cols), cols, layout.n, centered)
  stats = Moments(shift=shift if centered else None, offset=offset if centered else None,
                  var=var, count=None)  # type: ignore[arg-type]  # normalize reads no count
  return normalize(x, stats, scale, bias, eps), shift, offset, var


def _forward_kernel(layout: _Layout, eps: float, centered: bool, x_ref: Ref, scale_ref: Ref,
                    bias_ref: Ref, y_ref: Ref, shift_ref: Ref, offset_ref: Ref,
                    var_ref: Ref) -> None:
  y, shift, offset, var = _normalize_block(layout, x_ref[...], scale_ref[...], bias_ref[...],
                                           eps, centered)
  y_ref[...], shift_ref[...], offset_ref[...], var_ref[...] = y, shift, offset, var


def _add_forward_kernel(layout: _Layout, eps: float, centered: bool, x_ref: Ref,
                        residual_ref: Ref, scale_ref: Ref, bias_ref: Ref, y_ref: Ref, h_ref: Ref,
                        shift_ref: Ref, offset_ref: Ref, var_ref: Ref) -> None:
  h = x_ref[...] + residual_ref[...]
  fi = jnp.finfo(h.dtype)
  if layout.interpret and fi.bits < 32:
    # XLA (interpret mode) may keep a bfloat16 sum in float32 for the statistics (excess
    # precision); a device's kernel rounds it to the dtype it writes. (Pallas does not lower
    # `reduce_precision` for devices, which need none.)
    h = lax.reduce_precision(h, exponent_bits=fi.nexp, mantissa_bits=fi.nmant)
  y, shift, offset, var = _normalize_block(layout, h, scale_ref[...], bias_ref[...], eps,
                                           centered)
  h_ref[...], y_ref[...] = h, y
  shift_ref[...], offset_ref[...], var_ref[...] = shift, offset, var


def _backward_kernel(layout: _Layout, centered: bool, per_row: bool, x_ref: Ref, g_ref: Ref,
                     shift_ref: Ref, offset_ref: Ref, rstd_ref: Ref, scale_ref: Ref, dx_ref: Ref,
                     dscale_ref: Ref, dbias_ref: Ref) -> None:
  rows, cols = _masks(layout)
  n = layout.n
  xf = _zero_outside(x_ref[...].astype(F32), rows, cols)
  g = _zero_outside(g_ref[...].astype(F32), rows, cols)
  # Rows past the array's end read undefined statistics: zero, so that they add nothing.
  rstd = _zero_outside(rstd_ref[...], rows)
  xhat = _zero_outside((xf - _zero_outside(shift_ref[...], rows)
                        - _zero_outside(offset_ref[...], rows)) * rstd, cols)
  gs = g * _zero_outside(jnp.broadcast_to(scale_ref[...], g.shape), cols)
  # dx = rstd * (g scale - xhat E[g scale xhat] - E[g scale]), E over the row.
  dx = gs - xhat * (_row_sum(gs * xhat) / n)
  if centered:
    dx = dx - _row_sum(gs) / n
  dx_ref[...] = (rstd * dx).astype(dx_ref.dtype)
  if per_row:
    dscale_ref[...], dbias_ref[...] = _row_sum(g * xhat), _row_sum(g)
  else:   # this block's partial sums over its rows
    dscale_ref[...] = jnp.sum(g * xhat, axis=0, keepdims=True)
    dbias_ref[...] = jnp.sum(g, axis=0, keepdims=True)


# ----------------------------------------------------------------- the primitives' lowerings

def _stats_shapes(rows: int) -> list[jax.ShapeDtypeStruct]:
  return [jax.ShapeDtypeStruct((rows, 1), F32)] * 3


def _vector(p: jax.Array, per_row: bool, n: int = 0, example_rows: int = 0) -> jax.Array:
  """A `[rows]`, `[n]` or `[examples * n]` vector as the kernels' `[rows, 1]`, `[1, n]` or
  `[examples, 1, n]` operand."""
  if per_row:
    return p[:, None]
  return p.reshape(-1, 1, n) if example_rows else p[None]


def _check_examples(rows: int, example_rows: int) -> None:
  if example_rows and (example_rows % EXAMPLE_ROWS_MULTIPLE or rows % example_rows):
    raise ValueError(f"Pallas kernels take per-example parameters for runs of a multiple of "
                     f"{EXAMPLE_ROWS_MULTIPLE} rows; got example_rows={example_rows} of "
                     f"{rows} rows (the dispatch takes the reference there).")


def forward(x: jax.Array, scale: jax.Array, bias: jax.Array, *, eps: float, centered: bool,
            per_row: bool, platform: str, example_rows: int = 0) -> tuple[jax.Array, ...]:
  """`rows_forward_p` as a Pallas kernel for `platform`: `x [rows, n]`, `scale`, `bias`
  `[n]` (or `[rows]` if `per_row`) -> `y [rows, n]` (`x.dtype`), `shift, offset, var [rows]`
  (float32)."""
  _check_examples(x.shape[0], example_rows)
  layout = _layout(x.shape, platform, example_rows)
  stat = layout.spec(per_row=True)
  param = layout.spec(per_row, example_rows)
  vector = functools.partial(_vector, per_row=per_row, n=x.shape[1], example_rows=example_rows)
  y, *stats = _call(
      functools.partial(_forward_kernel, layout, eps, centered), layout, "normjax_rows_forward",
      [layout.matrix, param, param],
      [layout.matrix, stat, stat, stat],
      [jax.ShapeDtypeStruct(x.shape, x.dtype)] + _stats_shapes(x.shape[0]),
  )(x, vector(scale), vector(bias))
  return (y, *(s[:, 0] for s in stats))


def add_forward(x: jax.Array, residual: jax.Array, scale: jax.Array, bias: jax.Array, *,
                eps: float, centered: bool, per_row: bool,
                platform: str, example_rows: int = 0) -> tuple[jax.Array, ...]:
  """`rows_add_forward_p` as a Pallas kernel: as `forward` for `h = x + residual` (both
  `[rows, n]` of `x.dtype`), returning `y, h, shift, offset, var`."""
  _check_examples(x.shape[0], example_rows)
  layout = _layout(x.shape, platform, example_rows)
  stat = layout.spec(per_row=True)
  param = layout.spec(per_row, example_rows)
  vector = functools.partial(_vector, per_row=per_row, n=x.shape[1], example_rows=example_rows)
  like = jax.ShapeDtypeStruct(x.shape, x.dtype)
  y, h, *stats = _call(
      functools.partial(_add_forward_kernel, layout, eps, centered), layout,
      "normjax_rows_add_forward",
      [layout.matrix, layout.matrix, param, param],
      [layout.matrix, layout.matrix, stat, stat, stat],
      [like, like] + _stats_shapes(x.shape[0]),
  )(x, residual, vector(scale), vector(bias))
  return (y, h, *(s[:, 0] for s in stats))


def backward(x: jax.Array, g: jax.Array, shift: jax.Array, offset: jax.Array, rstd: jax.Array,
             scale: jax.Array, *, centered: bool, per_row: bool,
             platform: str, example_rows: int = 0) -> tuple[jax.Array, ...]:
  """`rows_backward_p` as a Pallas kernel: `x, g [rows, n]`, per-row `shift, offset, rstd`,
  `scale` -> `dx [rows, n]` (`x.dtype`), `dscale, dbias` of `scale.shape` (float32)."""
  _check_examples(x.shape[0], example_rows)
  layout = _layout(x.shape, platform, example_rows)
  stat = layout.spec(per_row=True)
  if per_row:
    sums_spec, sums_shape = stat, jax.ShapeDtypeStruct((x.shape[0], 1), F32)
  else:   # one partial sum per block: [blocks, 1, n], a block's slice squeezed to [1, n]
    sums_spec = pl.BlockSpec((pl.squeezed, 1, layout.block_n), lambda i: (i, 0, 0))
    sums_shape = jax.ShapeDtypeStruct((layout.blocks, 1, x.shape[1]), F32)
  dx, dscale, dbias = _call(
      functools.partial(_backward_kernel, layout, centered, per_row), layout,
      "normjax_rows_backward",
      [layout.matrix, layout.matrix, stat, stat, stat, layout.spec(per_row, example_rows)],
      [layout.matrix, sums_spec, sums_spec],
      [jax.ShapeDtypeStruct(x.shape, x.dtype), sums_shape, sums_shape],
  )(x, g, shift[:, None], offset[:, None], rstd[:, None],
    _vector(scale, per_row, x.shape[1], example_rows))
  if per_row:
    return dx, dscale[:, 0], dbias[:, 0]
  if example_rows:   # the blocks of each example (whole blocks: they lie within it)
    per_example = lambda v: jnp.sum(v.reshape(-1, example_rows // layout.block_rows,
                                              x.shape[1]), axis=1).reshape(-1)
    return dx, per_example(dscale), per_example(dbias)
  return dx, jnp.sum(dscale, axis=(0, 1)), jnp.sum(dbias, axis=(0, 1))
