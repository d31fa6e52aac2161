"""The row-normalization primitives (normjax/_src/kernels/rows.py) and their native CPU kernel.

Layer and RMS norm over trailing axes run through three primitives whose CPU lowering is an
XLA FFI call into normjax/_src/kernels/cpu/handlers_rows.cc. The tests here check that the kernel is built and
used, that kernel and `jax.numpy` definitions agree with each other and with float64 NumPy,
and that every transformation reaches the right rule (batch folding, the batching fallbacks,
the transpose, higher derivatives). The variant-level tests (test_variants, test_numerics_moments,
test_torch_parity, ...) run through the kernel as well.
"""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import normjax as nj
from normjax._src.kernels import moments as _columns
from normjax._src.kernels import cpu as _native
from normjax._src.kernels import rows as _rows
from tests import reference
from tests.helpers import rand, slow_except

F32 = jnp.float32


def _hlo(fn, *args):
  return jax.jit(fn).lower(*args).compile().as_text()


def test_native_kernel_is_built():
  """The install (setup.py) builds the kernel; NORMJAX_NATIVE=0 is the only way to be without."""
  if os.environ.get("NORMJAX_NATIVE") == "0":
    assert not _native.NATIVE
  else:
    assert _native.NATIVE, "normjax/_src/kernels/cpu/_normalize*.so missing: reinstall with a C++ compiler"


@pytest.mark.skipif(not _native.NATIVE, reason="native kernel not built")
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_row_normalizations_call_the_kernel(dtype):
  x = rand((4, 16, 64), dtype=dtype)
  g, b = rand((64,), seed=1), rand((64,), seed=2)
  grad = jax.grad(lambda x, g, b: jnp.sum(nj.layer_norm(x, g, b).astype(F32) ** 2),
                  argnums=(0, 1, 2))
  suffix = "F32" if dtype == jnp.float32 else "BF16"
  assert f"NormjaxRowsForward{suffix}" in _hlo(nj.layer_norm, x, g, b)
  assert f"NormjaxRowsForward{suffix}" in _hlo(nj.rms_norm, x, g)
  text = _hlo(grad, x, g, b)
  assert f"NormjaxRowsForward{suffix}" in text and f"NormjaxRowsBackward{suffix}" in text
  # Instance norm with channels first normalizes trailing axes with one scale per row.
  nchw, gc, bc = rand((2, 4, 5, 6), dtype=dtype), rand((4,), seed=3), rand((4,), seed=4)
  instance = lambda x, g, b: nj.instance_norm(x, g, b, channel_axis=1)
  assert f"NormjaxRowsForward{suffix}" in _hlo(instance, nchw, gc, bc)
  text = _hlo(jax.grad(lambda *a: jnp.sum(instance(*a).astype(F32) ** 2), argnums=(0, 1, 2)),
              nchw, gc, bc)
  assert f"NormjaxRowsBackward{suffix}" in text


def test_other_cases_do_not_call_the_kernel():
  x = rand((4, 16, 64))
  mask = jnp.arange(64) < 40
  for fn in (lambda x: nj.layer_norm(x, axis=1),                      # not trailing
             lambda x: nj.layer_norm(x, mask=jnp.broadcast_to(mask, x.shape)),
             lambda x: nj.layer_norm(x, fast_variance=True),
             lambda x: nj.layer_norm(x.astype(jnp.float16)),
             lambda x: nj.instance_norm(x, channel_axis=-1)):           # channels last
    assert "NormjaxRows" not in _hlo(fn, x)


def _expand(param, per_row):
  param = np.asarray(param, np.float64)
  return param[:, None] if per_row else param[None]


def _numpy_rows(x, scale, bias, eps, centered, per_row):
  x = np.asarray(x, np.float64)
  mean = x.mean(1, keepdims=True) if centered else np.zeros((x.shape[0], 1))
  var = ((x - mean) ** 2).mean(1, keepdims=True)
  xhat = (x - mean) / np.sqrt(var + eps)
  return xhat * _expand(scale, per_row) + _expand(bias, per_row), mean[:, 0], var[:, 0]


SHAPES = [(1, 1), (3, 7), (5, 1023), (64, 128), (300, 1024)]   # the last is cut into chunks
KERNEL_CASES = [(shape, dtype, centered, per_row) for shape in SHAPES
                for dtype in (jnp.float32, jnp.bfloat16) for centered in (True, False)
                for per_row in (False, True)]
# The default run keeps the chunked shape.
FAST_KERNEL_CASES = slow_except(KERNEL_CASES, *[c for c in KERNEL_CASES if c[0] == SHAPES[-1]],
                                unpack=True)


@pytest.mark.parametrize("shape,dtype,centered,per_row", FAST_KERNEL_CASES)
def test_forward_kernel_matches_reference_and_numpy(shape, dtype, centered, per_row):
  x = rand(shape, dtype=dtype, loc=0.5, seed=3)
  params = shape[:1] if per_row else shape[1:]
  g, b = rand(params, seed=4), rand(params, seed=5)
  kw = dict(eps=1e-5, centered=centered, per_row=per_row, example_rows=0)
  kernel = jax.jit(lambda *a: _rows.rows_forward_p.bind(*a, **kw))
  ref = jax.jit(lambda *a: _rows._forward_reference(*a, **kw))
  y, shift, offset, var = kernel(x, g, b)
  y_ref, shift_ref, offset_ref, var_ref = ref(x, g, b)
  y64, mean64, var64 = _numpy_rows(np.asarray(x.astype(F32)), g, b, 1e-5, centered, per_row)
  tol = 1e-5 if dtype == jnp.float32 else 2e-2
  assert y.dtype == x.dtype and var.dtype == F32
  np.testing.assert_allclose(np.asarray(y, np.float64), y64, atol=tol * 4, rtol=tol)
  np.testing.assert_allclose(np.asarray(y, np.float64), np.asarray(y_ref, np.float64),
                             atol=tol * 4, rtol=tol)
  for got in (shift + offset, shift_ref + offset_ref):
    np.testing.assert_allclose(np.asarray(got, np.float64), mean64, atol=1e-6, rtol=1e-5)
  for got in (var, var_ref):
    np.testing.assert_allclose(np.asarray(got, np.float64), var64, atol=1e-6, rtol=1e-5)


def _reference_statistics(x, scale, eps, kw):
  """Per-row shift, offset and rstd of `x` from the rows forward's definition."""
  _, shift, offset, var = jax.jit(lambda *a: _rows._forward_reference(*a, eps=eps, **kw))(
      x, scale, scale)
  return shift, offset, jax.lax.rsqrt(var + eps)


@pytest.mark.parametrize("shape,dtype,centered,per_row", FAST_KERNEL_CASES)
def test_backward_kernel_matches_reference_and_numpy(shape, dtype, centered, per_row):
  x = rand(shape, dtype=dtype, loc=-0.3, seed=6)
  ct = rand(shape, dtype=dtype, seed=7)
  scale = rand(shape[:1] if per_row else shape[1:], seed=8)
  eps = 1e-3
  kw = dict(centered=centered, per_row=per_row, example_rows=0)
  shift, offset, rstd = _reference_statistics(x, scale, eps, kw)
  args = (x, ct, shift, offset, rstd, scale)
  dx, dscale, dbias = jax.jit(lambda *a: _rows.rows_backward_p.bind(*a, **kw))(*args)
  ref = jax.jit(lambda *a: _rows._backward_reference(*a, **kw))(*args)
  # float64 NumPy: the VJP of y = xhat(x) * scale + bias.
  x64, g64 = (np.asarray(a.astype(F32), np.float64) for a in (x, ct))
  mean = x64.mean(1, keepdims=True) if centered else 0.0
  rs = 1 / np.sqrt(((x64 - mean) ** 2).mean(1, keepdims=True) + eps)
  xhat = (x64 - mean) * rs
  gs = g64 * _expand(scale, per_row)
  dx64 = rs * (gs - (gs.mean(1, keepdims=True) if centered else 0.0)
               - xhat * (gs * xhat).mean(1, keepdims=True))
  axis = 1 if per_row else 0
  dscale64, dbias64 = (g64 * xhat).sum(axis), g64.sum(axis)
  tol = 1e-4 if dtype == jnp.float32 else 3e-2
  assert dx.dtype == x.dtype and dscale.dtype == F32 and dbias.dtype == F32
  for got, want in ((dx, dx64), (ref[0], dx64), (dscale, dscale64), (ref[1], dscale64),
                    (dbias, dbias64), (ref[2], dbias64)):
    np.testing.assert_allclose(np.asarray(got, np.float64), want,
                               atol=tol * max(1.0, np.abs(want).max()), rtol=tol)


def test_backward_is_deterministic():
  x, ct = rand((512, 512), seed=9), rand((512, 512), seed=10)
  scale = rand((512,), seed=11)
  kw = dict(centered=True, per_row=False, example_rows=0)
  stats = jax.jit(lambda *a: _rows._forward_reference(*a, eps=1e-5, **kw))(x, scale, scale)
  rstd = jax.lax.rsqrt(stats[3] + 1e-5)
  bwd = jax.jit(lambda *a: _rows.rows_backward_p.bind(*a, **kw))
  first = bwd(x, ct, stats[1], stats[2], rstd, scale)
  for _ in range(5):
    for a, b in zip(first, bwd(x, ct, stats[1], stats[2], rstd, scale)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_large_mean_and_constant_rows():
  x = jnp.asarray(1e5 + rand((8, 1000), seed=12))
  x = x.at[3].set(7.0)                               # a constant row: variance 0, output 0
  y = nj.layer_norm(x)
  want = reference.layer_norm(np.asarray(x), eps=1e-5)
  np.testing.assert_allclose(np.asarray(y), want, atol=2e-4)
  assert np.all(np.asarray(y[3]) == 0.0)
  g = jax.grad(lambda x: jnp.sum(nj.layer_norm(x) * jnp.arange(1000.0)[None]))(x)
  assert np.all(np.isfinite(np.asarray(g)))


@pytest.mark.parametrize("per_row", [False, True])
def test_bfloat16_output_rounds_like_xla(per_row):
  # With a zero scale the kernel's output is exactly its float32 bias, so the bfloat16 output
  # shows the kernel's rounding alone: it must equal XLA's float32 -> bfloat16 cast bit for
  # bit (round to nearest even, overflow to inf) and keep NaN. Rows of 1003 (per-feature
  # bias) or 37 (one bias per row) exercise the 16-wide vector loop and the scalar tail.
  count = 1003
  rng = np.random.default_rng(3)
  mantissa = rng.integers(0, 1 << 23, size=count, dtype=np.uint32)
  exponent = rng.integers(100, 160, size=count, dtype=np.uint32) << 23
  sign = rng.integers(0, 2, size=count, dtype=np.uint32) << 31
  bits = sign | exponent | mantissa
  bits[::7] = (bits[::7] & 0xffff0000) | 0x8000                    # exact ties
  bits[1::11] = 0x7f7fffff                                         # rounds up to inf
  bits[2::13] = 0x7fc00001
  bits[3::17] = 0xff800000                                         # -inf
  bits[4::19] = 0x7f800001                                         # signalling NaN
  bias = bits.view(np.float32)
  rows, n = (count, 37) if per_row else (6, count)
  values = np.broadcast_to(bias[:, None] if per_row else bias[None], (rows, n))
  x = jnp.asarray(rand((rows, n), seed=4), jnp.bfloat16)
  bias = jnp.asarray(bias)
  zero = jnp.zeros_like(bias)
  y = _rows.rows_forward_p.bind(x, zero, bias, eps=1e-5, centered=True, per_row=per_row, example_rows=0)[0]
  want = jnp.asarray(values).astype(jnp.bfloat16)
  got_bits = np.asarray(y).view(np.uint16)
  want_bits = np.asarray(want).view(np.uint16)
  nan = np.isnan(values)
  assert nan.any() and np.isinf(np.asarray(want, np.float32)).any()
  np.testing.assert_array_equal(np.isnan(np.asarray(y, np.float32)), nan)
  np.testing.assert_array_equal(got_bits[~nan], want_bits[~nan])


def _loop(fn, *xs):
  return jnp.stack([fn(*args) for args in zip(*xs)])


def test_vmap_folds_the_batch_into_rows_and_falls_back_for_batched_params():
  x = rand((3, 5, 32), seed=13)
  g, gs = rand((32,), seed=14), rand((3, 32), seed=15)
  folded = jax.jit(jax.vmap(lambda x: nj.layer_norm(x, g)))
  np.testing.assert_allclose(folded(x), _loop(lambda x: nj.layer_norm(x, g), x), atol=1e-6)
  assert "NormjaxRowsForward" in folded.lower(x).compile().as_text()
  batched_scale = jax.vmap(lambda x, g: nj.layer_norm(x, g))
  np.testing.assert_allclose(batched_scale(x, gs), _loop(lambda x, g: nj.layer_norm(x, g), x, gs),
                             atol=1e-6)
  # Per-example gradients (the backward's batching fallback) and vmap inside grad (folded
  # tangent, transposed to the kernel).
  loss = lambda x, g: jnp.sum(nj.layer_norm(x, g) ** 3)
  per_example = jax.vmap(jax.grad(loss, argnums=(0, 1)), in_axes=(0, None))(x, g)
  for got, want in zip(per_example, zip(*[jax.grad(loss, argnums=(0, 1))(xi, g) for xi in x])):
    np.testing.assert_allclose(got, jnp.stack(want), rtol=1e-5, atol=1e-5)
  whole = jax.grad(lambda x, g: jnp.sum(jax.vmap(lambda r: nj.layer_norm(r, g))(x) ** 3),
                   argnums=(0, 1))(x, g)
  direct = jax.grad(lambda x, g: loss(x, g), argnums=(0, 1))(x, g)
  for got, want in zip(whole, direct):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_forward_mode_and_second_order_through_the_primitives():
  x = rand((2, 6), seed=16)
  g, b = rand((6,), seed=17), rand((6,), seed=18)
  fn = lambda x: nj.layer_norm(x, g, b)
  jvp = jax.jvp(fn, (x,), (jnp.ones_like(x),))[1]
  np.testing.assert_allclose(jvp, jax.jacfwd(fn)(x).sum((2, 3)), atol=1e-5)
  np.testing.assert_allclose(jax.jacfwd(fn)(x), jax.jacrev(fn)(x), atol=1e-5)
  loss = lambda x: jnp.sum(jnp.sin(nj.rms_norm(x, g)))
  np.testing.assert_allclose(jax.hessian(loss)(x), jax.jacrev(jax.jacrev(loss))(x), atol=1e-4)


def test_instance_norm_rows_under_vmap_and_grad():
  """Per-row parameters fold under vmap everywhere, the backward included."""
  x = rand((3, 2, 4, 5, 6), seed=19)                    # a vmapped batch of NCHW inputs
  g, b = rand((3, 4), seed=20), rand((4,), seed=21)
  fn = lambda x, g: nj.instance_norm(x, g, b, channel_axis=1)
  np.testing.assert_allclose(jax.vmap(fn)(x, g), _loop(fn, x, g), atol=1e-5)
  loss = lambda x, g: jnp.sum(jnp.sin(fn(x, g)))
  grads = jax.jit(jax.vmap(jax.grad(loss, argnums=(0, 1))))
  assert "NormjaxRowsBackward" in grads.lower(x, g).compile().as_text()
  for got, want in zip(grads(x, g), zip(*[jax.grad(loss, argnums=(0, 1))(*a) for a in zip(x, g)])):
    np.testing.assert_allclose(got, jnp.stack(want), rtol=1e-5, atol=1e-5)
  want = reference.instance_norm(np.asarray(x[0]), np.asarray(g[0]), np.asarray(b),
                                 channel_axis=1, eps=1e-5)
  np.testing.assert_allclose(fn(x[0], g[0]), want, atol=2e-5)


_SETUP = """
import jax, jax.numpy as jnp, numpy as np
import normjax as nj
x = jnp.asarray(np.random.default_rng(0).normal(size=(3, 4, 33)).astype(np.float32)) + 1e4
g, b = jnp.linspace(0.5, 1.5, 33), jnp.linspace(-1.0, 1.0, 33)
"""
_WITHOUT_KERNEL = _SETUP + """
from normjax._src.kernels import cpu as _native
assert not _native.NATIVE
for fn in (lambda x: nj.layer_norm(x, g, b), lambda x: nj.rms_norm(x - 1e4, g),
           lambda x: nj.instance_norm(x, g[:4], b[:4], channel_axis=1),
           lambda x: nj.group_norm(x, g, b, num_groups=3)):
  text = jax.jit(fn).lower(x).compile().as_text()
  assert "custom-call" not in text and "normjax_" not in text
  loss = lambda x: jnp.sum(jnp.sin(fn(x)))
  grad = jax.jit(jax.grad(loss))(x)
  jvp = jax.jvp(loss, (x,), (grad,))[1]
  print(repr((np.asarray(fn(x)).tolist(), np.asarray(grad).tolist(), float(jvp))))
"""


@pytest.mark.slow
def test_jax_numpy_lowering_matches_the_kernel():
  """What every non-CPU platform runs (and a CPU without the kernel): the primitives lowered
  from their jax.numpy definitions, in a process started with NORMJAX_NATIVE=0."""
  import ast
  import subprocess
  import sys
  env = dict(os.environ, NORMJAX_NATIVE="0")
  out = subprocess.run([sys.executable, "-c", _WITHOUT_KERNEL], env=env, check=True,
                       capture_output=True, text=True).stdout.splitlines()
  namespace = {}
  exec(_SETUP, namespace)
  x, g, b = namespace["x"], namespace["g"], namespace["b"]
  fns = (lambda x: nj.layer_norm(x, g, b), lambda x: nj.rms_norm(x - 1e4, g),
         lambda x: nj.instance_norm(x, g[:4], b[:4], channel_axis=1),
         lambda x: nj.group_norm(x, g, b, num_groups=3))
  assert len(out) == len(fns)
  for line, fn in zip(out, fns):
    y, grad, jvp = ast.literal_eval(line)
    loss = lambda x: jnp.sum(jnp.sin(fn(x)))
    np.testing.assert_allclose(fn(x), np.asarray(y), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(jax.grad(loss)(x), np.asarray(grad), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(float(jax.jvp(loss, (x,), (jnp.asarray(grad, F32),))[1]), jvp,
                               rtol=1e-4)


# ----------------------------------------------------------------- accuracy on adversarial data
#
# The kernels' statistics against float64 NumPy where summation order and cancellation bite:
# an outlier as the first element (the old kernels shifted by it), rows of 2^24 elements, means
# of 1e5, overflow, NaN/Inf, size-1 and empty axes, bfloat16.

native_only = pytest.mark.skipif(not _native.NATIVE, reason="native kernel not built")


def _moments64(x, axes):
  x = np.asarray(np.asarray(x, np.float32), np.float64)
  return x.mean(axes), x.var(axes)


def _check_moments(stats, mean, var, rtol, rms=None):
  """(shift, offset, var) against float64: var to `rtol`; the mean to 1e-7 of the data's root
  mean square `rms` (float32 inputs carry no more: an outlier's block sums its deviations
  from the block mean in float32); shift is that mean rounded to float32 (within an ulp)."""
  shift, offset, v = (np.asarray(a, np.float64) for a in stats)
  atol = 1e-7 * (np.sqrt(var + mean ** 2) if rms is None else rms)
  assert np.all(np.abs(shift + offset - mean) <= atol)
  np.testing.assert_allclose(v, var, rtol=rtol, atol=0)
  assert np.all(np.abs(shift - mean) <= 2.0 ** -23 * np.abs(mean) + atol)


def _outlier_input(shape, dtype=jnp.float32, value=1e4):
  x = np.random.default_rng(0).normal(size=shape).astype(np.float32)
  x.reshape(-1)[:shape[-1]] = value          # the first position of every channel / row
  return jnp.asarray(x).astype(dtype)


@native_only
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("group_size", [1, 4])
def test_column_kernel_outlier_first_matches_float64(dtype, group_size):
  """Batch/instance/group norm on NHWC: x[0, 0, :] = 1e4 among N(0, 1) (batch norm's variance
  was 2240 for 1527 with the first element as the shift)."""
  x = _outlier_input((1, 16 * 64 * 64, 8), dtype)
  stats = jax.jit(lambda x: _columns.column_moments_p.bind(x, group_size=group_size))(x)
  x64 = np.asarray(x.astype(F32), np.float64).reshape(1, -1, 8 // group_size, group_size)
  mean, var = (np.repeat(v, group_size, -1) for v in _moments64(x64, (1, 3)))
  _check_moments(stats, mean, var, rtol=1e-6)
  ref = jax.jit(lambda x: _columns._column_reference(x, group_size=group_size))(x)
  np.testing.assert_allclose(np.asarray(ref[2], np.float64), var, rtol=1e-4)


@native_only
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_row_kernels_drift_and_late_outliers_match_float64(dtype):
  """The row statistics (layer norm's forward kernel and the NCHW moments kernel) where later
  blocks of a row sit far from the mean of the blocks before them (summed about the running
  mean in one read, re-summed about their own mean where that cancels): a step of 1e3 half
  way, a ramp, a late outlier, an offset of 1e5 and a constant row, 8 blocks per row."""
  rng = np.random.default_rng(5)
  n = 8 * 1024 + 5
  x = rng.normal(size=(6, n)).astype(np.float32)
  x[0, n // 2:] += 1e3
  x[1] += np.linspace(0.0, 5e3, n, dtype=np.float32)
  x[2, 5000] = -3e4
  x[3] += 1e5
  x[4] = 7.0
  x[5, 1024:] += 50.0                        # the second block far from the first
  x = jnp.asarray(x).astype(dtype)
  x64 = np.asarray(x.astype(F32), np.float64)
  mean, var = _moments64(x64, 1)
  ones, zeros = jnp.ones(n), jnp.zeros(n)
  _, *stats = jax.jit(lambda x: _rows.rows_forward_p.bind(
      x, ones, zeros, eps=1e-5, centered=True, per_row=False, example_rows=0))(x)
  _check_moments(stats, mean, var, rtol=1e-6)
  assert float(stats[2][4]) == 0.0
  stats = jax.jit(lambda x: _columns.row_moments_p.bind(x, pool_outer=False, group_size=1))(
      x.reshape(1, 6, n))
  _check_moments([s[0] for s in stats], mean, var, rtol=1e-6)


@native_only
@pytest.mark.parametrize("n", [5, 512, 1000, 3 * 1024 + 7])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_row_kernels_first_block_in_one_read_match_float64(dtype, n):
  """The first block of a row is summed in one read about the float32 mean of its first 64
  values, and again two-pass where that cancels or is not finite: rows whose head is typical,
  holds an outlier (at position 1, 15, 63: inside the head; 64: just after it), sits far from
  the rest (the head 8 above) or has a 1e5 offset, and rows shorter than the head (n = 5);
  layer norm's forward kernel and the NCHW moments kernel against float64, 4 rows at a time
  and alone. Then a row whose one-read sums overflow float32 and whose two-pass ones (M2 about
  6.4e37) do not: finite, within the float32 lane sums' error of values from 1e32 to 1e36
  (64 additions per lane, 1e-5)."""
  rng = np.random.default_rng(9)
  rows = []
  for position in (None, 1, 15, 63, 64):
    r = rng.normal(size=n).astype(np.float32)
    if position is not None and position < n:
      r[position] = 3e4
    rows.append(r)
  head = rng.normal(size=n).astype(np.float32)
  head[:64] += 8.0
  rows.append(head)
  rows.append(rng.normal(size=n).astype(np.float32) + 1e5)
  x = jnp.asarray(np.stack(rows)).astype(dtype)
  x64 = np.asarray(x.astype(F32), np.float64)
  mean, var = _moments64(x64, 1)
  ones, zeros = jnp.ones(n), jnp.zeros(n)
  forward = jax.jit(lambda x: _rows.rows_forward_p.bind(
      x, ones, zeros, eps=1e-5, centered=True, per_row=False, example_rows=0))
  for chosen in (slice(None), slice(0, 1), slice(5, 6)):
    _, *stats = forward(x[chosen])
    _check_moments(stats, mean[chosen], var[chosen], rtol=1e-6)
  stats = jax.jit(lambda x: _columns.row_moments_p.bind(x, pool_outer=False, group_size=1))(
      x.reshape(1, len(rows), n))
  _check_moments([s[0] for s in stats], mean, var, rtol=1e-6)
  if n < 512:
    return
  wide = rng.normal(size=(1, n)).astype(np.float32)
  wide[0, :64] = 1e18
  wide = jnp.asarray(wide).astype(dtype)
  mean, var = _moments64(np.asarray(wide.astype(F32), np.float64), 1)
  _, *stats = forward(wide)
  shift, offset, v = (np.asarray(a, np.float64) for a in stats)
  assert np.isfinite(v).all()
  np.testing.assert_allclose(v, var, rtol=1e-5)
  np.testing.assert_allclose(shift + offset, mean, rtol=1e-6)


@native_only
def test_column_kernel_one_million_values_after_a_far_first_element():
  """1M values per channel after a first element of 3e4: the variance clamped to 0 before."""
  x = np.random.default_rng(1).normal(size=(1, 1 << 20, 2)).astype(np.float32)
  x[0, 0] = 3e4
  stats = jax.jit(lambda x: _columns.column_moments_p.bind(x, group_size=1))(x)
  _check_moments(stats, *_moments64(x, 1), rtol=1e-6)


@native_only
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("channels", [64, 200])
def test_column_kernel_drift_and_late_outliers_match_float64(dtype, channels):
  """Batch norm on NHWC where later blocks sit far from the mean of the blocks before them
  (the kernel sums a later block about the running mean in one read, and must notice when
  that loses digits): a step of 1e3 half way, a ramp, a late outlier, an offset of 1e5 and a
  constant channel; 64 channels (register slices only) and 200 (slices and a tail of 8)."""
  rng = np.random.default_rng(4)
  positions = 8192
  x = rng.normal(size=(1, positions, channels)).astype(np.float32)
  x[0, positions // 2:, 0::3] += 1e3                                  # a step
  x[0, :, 1::3] += np.linspace(0.0, 5e3, positions, dtype=np.float32)[:, None]  # a ramp
  x[0, 3000, 2::6] = -3e4                                             # a late outlier
  x[0, :, 5::6] += 1e5                                                # far from 0
  x[0, :, -1] = 7.0                                                   # a constant channel
  x = jnp.asarray(x).astype(dtype)
  stats = jax.jit(lambda x: _columns.column_moments_p.bind(x, group_size=1))(x)
  x64 = np.asarray(x.astype(F32), np.float64)
  mean, var = _moments64(x64, 1)
  _check_moments(stats, mean, var, rtol=1e-6)
  assert float(np.asarray(stats[2])[0, -1]) == 0.0

@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("pool_outer,group_size", [(True, 1), (False, 4), (False, 1)])
def test_row_moments_kernel_outlier_first_matches_float64(dtype, pool_outer, group_size):
  """Batch norm (pooled over the batch) and group norm on NCHW, outlier first in every row."""
  x = np.random.default_rng(2).normal(size=(16, 8, 64 * 64)).astype(np.float32)
  x[:, :, 0] = 1e4
  x[0, :, 1] = -3e4
  x = jnp.asarray(x).astype(dtype)
  kw = dict(pool_outer=pool_outer, group_size=group_size)
  stats = jax.jit(lambda x: _columns.row_moments_p.bind(x, **kw))(x)
  x64 = np.asarray(x.astype(F32), np.float64).reshape(16, 8 // group_size, group_size, -1)
  axes = (0, 2, 3) if pool_outer else (2, 3)
  mean, var = (np.broadcast_to(np.repeat(v, group_size, -1), (16, 8))
               for v in _moments64(x64, axes))
  _check_moments(stats, mean, var, rtol=1e-6)


_VARIANTS = {
    "batch": lambda x, axis: nj.batch_norm(x, None, None, nj.init_batch_stats(8), train=True,
                                           channel_axis=axis)[0],
    "group": lambda x, axis: nj.group_norm(x, num_groups=2, channel_axis=axis),
    "instance": lambda x, axis: nj.instance_norm(x, channel_axis=axis),
}
# The axes of x viewed as [N, H, W, groups, channels per group] each variant reduces over.
_REDUCED = {"batch": (0, 1, 2), "group": (1, 2, 4), "instance": (1, 2)}


@native_only
@pytest.mark.parametrize("channel_axis", [-1, 1])
@pytest.mark.parametrize("kind", sorted(_VARIANTS))
def test_variants_with_an_outlier_first_match_float64(kind, channel_axis):
  """The normalized output of batch, group and instance norm (NHWC and NCHW), with 1e4 as the
  first element in memory order of every channel (NHWC) or row (NCHW)."""
  shape = (16, 32, 32, 8) if channel_axis == -1 else (16, 8, 32, 32)
  x = np.random.default_rng(3).normal(size=shape).astype(np.float32)
  if channel_axis == -1:
    x[:, 0, 0, :] = 1e4
  else:
    x[:, :, 0, 0] = 1e4
  y = np.asarray(jax.jit(lambda x: _VARIANTS[kind](x, channel_axis))(jnp.asarray(x)), np.float64)
  xc = np.moveaxis(np.asarray(x, np.float64), channel_axis, -1)      # NHWC
  groups = 2 if kind == "group" else 1
  xg = xc.reshape(xc.shape[:3] + (groups, 8 // groups))
  axes = _REDUCED[kind]
  want = (xg - xg.mean(axes, keepdims=True)) / np.sqrt(xg.var(axes, keepdims=True) + 1e-5)
  want = np.moveaxis(want.reshape(xc.shape), -1, channel_axis)
  np.testing.assert_allclose(y, want, atol=1e-5, rtol=1e-5)


@native_only
def test_rows_of_2_24_values_match_float64():
  n = 1 << 24
  x = np.random.default_rng(4).standard_normal((1, n), dtype=np.float32)
  x64 = np.asarray(x, np.float64)
  ones, zeros = jnp.ones(n), jnp.zeros(n)
  fwd = jax.jit(lambda x: _rows.rows_forward_p.bind(x, ones, zeros, eps=0.0, centered=True,
                                                    per_row=False, example_rows=0))
  y, shift, offset, var = fwd(x)
  assert abs(float(var[0]) / x64.var() - 1) <= 1e-6
  assert abs(float(shift[0]) + float(offset[0]) - x64.mean()) <= 1e-9
  np.testing.assert_allclose(np.asarray(y[0, :4096], np.float64),
                             (x64[0, :4096] - x64.mean()) / x64.std(), atol=1e-6)
  del y
  rms = _rows.rows_forward_p.bind(x, ones, zeros, eps=0.0, centered=False, per_row=False, example_rows=0)[3]
  assert abs(float(rms[0]) / np.mean(x64 ** 2) - 1) <= 1e-6
  row = jax.jit(lambda x: _columns.row_moments_p.bind(x, pool_outer=False, group_size=1))(
      x.reshape(1, 1, n))
  _check_moments(row, np.asarray([[x64.mean()]]), np.asarray([[x64.var()]]), rtol=1e-6)


@native_only
def test_backward_sums_of_long_rows_match_float64():
  """Per-row dscale/dbias (instance norm over 2^22 positions) and the per-row sums inside dx."""
  n = 1 << 22
  rng = np.random.default_rng(5)
  x = rng.standard_normal((2, n), dtype=np.float32)
  ct = (1.0 + rng.standard_normal((2, n), dtype=np.float32)).astype(np.float32)
  scale = jnp.asarray([1.5, 0.5], F32)
  _, shift, offset, var = _rows.rows_forward_p.bind(x, scale, scale, eps=0.0, centered=True,
                                                    per_row=True, example_rows=0)
  rstd = jax.lax.rsqrt(var)
  dx, dscale, dbias = jax.jit(lambda *a: _rows.rows_backward_p.bind(
      *a, centered=True, per_row=True, example_rows=0))(x, ct, shift, offset, rstd, scale)
  x64, g64 = np.asarray(x, np.float64), np.asarray(ct, np.float64)
  xhat = (x64 - x64.mean(1, keepdims=True)) / x64.std(1, keepdims=True)
  np.testing.assert_allclose(np.asarray(dbias, np.float64), g64.sum(1), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(dscale, np.float64), (g64 * xhat).sum(1), rtol=1e-5,
                             atol=1e-6 * np.abs(g64).sum())


@native_only
def test_backward_parameter_sums_over_many_rows_match_float64():
  """dscale and dbias of layer norm summed over 2^17 rows."""
  rows, n = 1 << 17, 16
  rng = np.random.default_rng(6)
  x = rng.standard_normal((rows, n), dtype=np.float32)
  ct = (1.0 + 0.1 * rng.standard_normal((rows, n), dtype=np.float32)).astype(np.float32)
  scale = jnp.ones(n)
  kw = dict(centered=True, per_row=False, example_rows=0)
  _, shift, offset, var = _rows.rows_forward_p.bind(x, scale, scale, eps=1e-5, **kw)
  rstd = jax.lax.rsqrt(var + 1e-5)
  _, dscale, dbias = jax.jit(lambda *a: _rows.rows_backward_p.bind(*a, **kw))(
      x, ct, shift, offset, rstd, scale)
  x64, g64 = np.asarray(x, np.float64), np.asarray(ct, np.float64)
  xhat = (x64 - x64.mean(1, keepdims=True)) / np.sqrt(x64.var(1, keepdims=True) + 1e-5)
  np.testing.assert_allclose(np.asarray(dbias, np.float64), g64.sum(0), rtol=2e-7)
  np.testing.assert_allclose(np.asarray(dscale, np.float64), (g64 * xhat).sum(0),
                             atol=2e-7 * np.abs(g64 * xhat).sum(0).max())


@native_only
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_rows_at_1e5_normalize_to_float64_accuracy(dtype):
  x = (1e5 + np.random.default_rng(7).normal(size=(16, 4099))).astype(np.float32)
  x = np.asarray(jnp.asarray(x).astype(dtype).astype(F32))
  ones, zeros = jnp.ones(4099), jnp.zeros(4099)
  y = jax.jit(lambda x: _rows.rows_forward_p.bind(x, ones, zeros, eps=1e-5, centered=True,
                                                  per_row=False, example_rows=0)[0])(jnp.asarray(x))
  x64 = np.asarray(x, np.float64)
  want = (x64 - x64.mean(1, keepdims=True)) / np.sqrt(x64.var(1, keepdims=True) + 1e-5)
  if dtype == jnp.float32:
    np.testing.assert_allclose(np.asarray(y, np.float64), want, atol=1e-5)
  else:   # the output rounded to bfloat16
    np.testing.assert_allclose(np.asarray(y.astype(F32), np.float64), want, atol=1e-2, rtol=1e-2)


def _forward_both(x, centered=True):
  """rows_forward_p's kernel and its jax.numpy definition, jitted."""
  n = x.shape[1]
  kw = dict(eps=1e-5, centered=centered, per_row=False, example_rows=0)
  ones, zeros = jnp.ones(n), jnp.zeros(n)
  kernel = jax.jit(lambda x: _rows.rows_forward_p.bind(x, ones, zeros, **kw))(x)
  ref = jax.jit(lambda x: _rows._forward_reference(x, ones, zeros, **kw))(x)
  return kernel, ref


@native_only
@pytest.mark.parametrize("centered", [True, False])
def test_overflowing_variance_gives_nan_rows(centered):
  """Values whose squares overflow float32 (1e20..1e30): the row is NaN (it was all zeros), in
  the kernel and in the jax.numpy definition alike; the other rows are unaffected."""
  rng = np.random.default_rng(8)
  x = rng.normal(size=(3, 300)).astype(np.float32)
  x[1] = (rng.choice([-1, 1], 300) * 10.0 ** rng.uniform(20, 30, 300)).astype(np.float32)
  for y, _, _, var in _forward_both(jnp.asarray(x), centered):
    y, var = np.asarray(y), np.asarray(var)
    assert np.all(np.isnan(y[1])) and not np.isfinite(var[1])
    assert np.all(np.isfinite(y[[0, 2]]))
  stats = jax.jit(lambda x: _columns.column_moments_p.bind(x, group_size=1))(x.T[None])
  assert not np.isfinite(np.asarray(stats[2])[0, 1]) and np.all(np.isfinite(stats[2][0, [0, 2]]))


@native_only
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_and_inf_give_nan_rows(bad):
  x = np.random.default_rng(9).normal(size=(3, 40)).astype(np.float32)
  x[1, 17] = bad
  for y, _, _, var in _forward_both(jnp.asarray(x)):
    y = np.asarray(y)
    assert np.all(np.isnan(y[1])) and np.all(np.isfinite(y[[0, 2]]))
  for stats in (jax.jit(lambda x: _columns.column_moments_p.bind(x, group_size=1))(x.T[None]),
                jax.jit(lambda x: _columns.row_moments_p.bind(x, pool_outer=False,
                                                              group_size=1))(x[None])):
    var = np.asarray(stats[2])[0]
    assert np.isnan(var[1]) and np.all(np.isfinite(var[[0, 2]]))


@native_only
def test_size_one_and_empty_axes():
  x = jnp.asarray([[3.0], [-2.0]], F32)
  y, shift, offset, var = _rows.rows_forward_p.bind(x, jnp.ones(1), jnp.full((1,), 0.5), eps=1e-5,
                                                    centered=True, per_row=False, example_rows=0)
  np.testing.assert_array_equal(np.asarray(y), [[0.5], [0.5]])
  np.testing.assert_array_equal(np.asarray(shift), [3.0, -2.0])
  np.testing.assert_array_equal(np.asarray(var), [0.0, 0.0])
  for positions in (1, 0):
    x = jnp.asarray(np.arange(2 * positions * 3, dtype=np.float32).reshape(2, positions, 3))
    shift, offset, var = _columns.column_moments_p.bind(x, group_size=3)
    want = np.broadcast_to(np.asarray(x).mean((1, 2), keepdims=True)[:, 0], (2, 3)) \
        if positions else np.zeros((2, 3))
    np.testing.assert_array_equal(np.asarray(shift) + np.asarray(offset), want)
    assert np.all(np.asarray(var) == (2.0 / 3.0 if positions else 0.0)) or positions == 1
    shift, offset, var = _columns.row_moments_p.bind(jnp.swapaxes(x, 1, 2), pool_outer=True,
                                                     group_size=1)
    assert shift.shape == (2, 3) and np.all(np.isfinite(np.asarray(var)))
  y = _rows.rows_forward_p.bind(jnp.zeros((3, 0)), jnp.ones(0), jnp.zeros(0), eps=1e-5,
                                centered=True, per_row=False, example_rows=0)
  assert y[0].shape == (3, 0) and np.all(np.asarray(y[3]) == 0.0)


@native_only
def test_kernel_errors_become_python_exceptions():
  """A kernel's ffi::Error (here a bad group size) comes back as a Python exception. (The
  C++-exception path, std::bad_alloc included, returns through the same ffi::Error; it has
  no test that does not need huge memory.)"""
  with pytest.raises(Exception, match="group_size"):
    jax.jit(lambda x: _columns.column_moments_p.bind(x, group_size=3))(
        jnp.zeros((1, 2, 4), F32)).block_until_ready()


@pytest.mark.slow
def test_native_source_compiles_without_warnings(tmp_path):
  """The native sources (handlers_rows.cc, handlers_moments.cc, levels.cc, threads.cc and their
  headers) compile warning-free with -Wall -Wextra -Werror, the vendored XLA headers included
  as system headers."""
  import shutil
  import subprocess
  cxx = shutil.which("g++")
  if cxx is None:
    pytest.skip("g++ not installed")
  native = os.path.join(os.path.dirname(_native.__file__))
  for source in ("handlers_rows.cc", "handlers_moments.cc", "levels.cc", "threads.cc"):
    subprocess.run([cxx, "-std=c++17", "-O2", "-ffp-contract=off", "-Wall", "-Wextra", "-Werror",
                    "-fPIC", "-isystem", os.path.join(native, "third_party"), "-c",
                    os.path.join(native, source), "-o", str(tmp_path / f"{source}.o")],
                   check=True)


def test_add_reference_definition_returns_the_sum_at_its_rounding():
  """The `jax.numpy` definition of the residual-add kernel returns `h = x + residual` pinned
  to bfloat16, as the kernel writes it and the numerics' `add_standardize` returns it: a consumer of
  `h` in the same program sees the `h` whose statistics were taken. Unpinned, XLA recomputed
  the add in float32 inside a float32 consumer (off by up to 3.9 at `1e5 + N(0, 1)`)."""
  a = jnp.full((4, 1024), 1e5, jnp.bfloat16)
  r = jnp.asarray(np.random.default_rng(0).standard_normal((4, 1024)), jnp.bfloat16)
  ones, zeros = jnp.ones(1024, jnp.float32), jnp.zeros(1024, jnp.float32)
  kw = dict(eps=1e-5, centered=True, per_row=False, example_rows=0)
  def h_minus_a(a, r):
    h = _rows._add_forward_reference(a, r, ones, zeros, **kw)[1]
    return h.astype(jnp.float32) - a.astype(jnp.float32)
  want = np.asarray(h_minus_a(a, r))                  # eager: the materialized bfloat16 sum
  assert set(np.unique(want)) <= {-512.0, 0.0, 512.0}
  np.testing.assert_array_equal(np.asarray(jax.jit(h_minus_a)(a, r)), want)


def test_reference_definition_reads_a_fused_bfloat16_x_at_its_rounding():
  """The `jax.numpy` definition of `rows_forward_p` (what an export for another platform
  runs) normalizes `x` as rounded to bfloat16, as its statistics see it, when `x` is a sum
  made in the same program (XLA kept it in float32 in the normalize step: errors of ~1e3)."""
  a = jnp.full((4, 1024), 1e5, jnp.bfloat16)
  r = jnp.asarray(np.random.default_rng(0).standard_normal((4, 1024)), jnp.bfloat16)
  ones, zeros = jnp.ones(1024, jnp.float32), jnp.zeros(1024, jnp.float32)
  kw = dict(eps=1e-5, centered=True, per_row=False, example_rows=0)
  got = jax.jit(lambda a, r: _rows._forward_reference(a + r, ones, zeros, **kw)[0])(a, r)
  want = _rows._forward_reference(a + r, ones, zeros, **kw)[0]    # the materialized sum
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                             rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("examples,rows_each,n",
                         [(3, 40, 24), (64, 2, 8), (64, 32, 512), (2, 257, 1000),
                          (3, 9, 24576), (5, 64, 16384)])
@pytest.mark.parametrize("centered", [True, False])
def test_per_example_parameters_forward_and_backward_match_float64(examples, rows_each, n,
                                                                   centered):
  """Scale and bias per example and feature (`example_rows`: adaLN's `[B, 1, D]` of
  `[B, T, D]`) against float64 NumPy, forward and backward (dscale, dbias per example), at a
  1e5 offset: a few long examples (split into chunks, summed in order, all examples' chunks
  in one call on the pool), many short ones (each within one chunk; 64 of 32 rows in 32
  chunks on the pool, 64 of 2 rows on the calling thread), few short wide ones
  (9 rows in 6 chunks of 2: the last chunk of each example is empty), and few long wide ones
  whose per-chunk sums do not fit in one call's buffers (GroupSums: 2, 2, then 1 example)."""
  rows = examples * rows_each
  x = jnp.asarray(rand((rows, n), seed=11, loc=1e5 if centered else 3.0))
  ct = jnp.asarray(rand((rows, n), seed=12))
  scale = jnp.asarray(rand((examples * n,), seed=13))
  bias = jnp.asarray(rand((examples * n,), seed=14))
  kw = dict(centered=centered, per_row=False, example_rows=rows_each)
  y, shift, offset, var = jax.jit(lambda *a: _rows.rows_forward_p.bind(*a, eps=1e-5, **kw))(
      x, scale, bias)
  x64, g64 = np.asarray(x, np.float64), np.asarray(ct, np.float64)
  s64 = np.repeat(np.asarray(scale, np.float64).reshape(examples, n), rows_each, axis=0)
  b64 = np.repeat(np.asarray(bias, np.float64).reshape(examples, n), rows_each, axis=0)
  mean = x64.mean(1, keepdims=True) if centered else 0.0
  rs = 1 / np.sqrt(((x64 - mean) ** 2).mean(1, keepdims=True) + 1e-5)
  xhat = (x64 - mean) * rs
  np.testing.assert_allclose(np.asarray(y, np.float64), xhat * s64 + b64, rtol=1e-5, atol=1e-4)
  rstd = jax.lax.rsqrt(var + 1e-5)
  dx, dscale, dbias = jax.jit(lambda *a: _rows.rows_backward_p.bind(*a, **kw))(
      x, ct, shift, offset, rstd, scale)
  gs = g64 * s64
  dx64 = rs * (gs - (gs.mean(1, keepdims=True) if centered else 0.0)
               - xhat * (gs * xhat).mean(1, keepdims=True))
  per_example = lambda v: v.reshape(examples, rows_each, n).sum(1).reshape(-1)
  np.testing.assert_allclose(np.asarray(dx, np.float64), dx64, rtol=1e-4,
                             atol=1e-4 * np.abs(dx64).max())
  for got, want in ((dscale, per_example(g64 * xhat)), (dbias, per_example(g64))):
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=1e-4,
                               atol=1e-4 * np.abs(want).max())


@pytest.mark.parametrize("centered", [True, False])
def test_per_example_parameters_with_no_rows(centered):
  """An empty batch with per-example parameters (`[0, T, D]`: no rows, no examples): empty
  outputs, forward and backward, through the primitives and adaLN (the handlers return early
  on zero examples, whose chunk count is zero)."""
  x = jnp.zeros((0, 24), F32)
  params = jnp.zeros((0,), F32)
  kw = dict(centered=centered, per_row=False, example_rows=4)
  y, shift, offset, var = jax.jit(lambda *a: _rows.rows_forward_p.bind(*a, eps=1e-5, **kw))(
      x, params, params)
  assert y.shape == (0, 24) and shift.shape == offset.shape == var.shape == (0,)
  dx, dscale, dbias = jax.jit(lambda *a: _rows.rows_backward_p.bind(*a, **kw))(
      x, x, shift, offset, var, params)
  assert dx.shape == (0, 24) and dscale.shape == dbias.shape == (0,)
  f = lambda x, m: nj.adaptive_layer_norm(x, m, m)
  xs, m = jnp.zeros((0, 4, 24), F32), jnp.zeros((0, 1, 24), F32)
  assert jax.jit(f)(xs, m).shape == (0, 4, 24)
  grads = jax.jit(jax.grad(lambda x, m: jnp.sum(f(x, m)), argnums=(0, 1)))(xs, m)
  assert grads[0].shape == (0, 4, 24) and grads[1].shape == (0, 1, 24)


def test_adaptive_norms_take_the_rows_kernel_with_per_example_parameters():
  """adaLN's `[B, 1, D]` modulation of `[B, T, D]` goes to the native rows kernel, forward and
  backward (one read of `x` each, the modulation inside), and matches the reference path."""
  x = jnp.asarray(rand((4, 16, 32), seed=1, loc=3.0))
  shift = jnp.asarray(rand((4, 1, 32), seed=2) * 0.1)
  scale = jnp.asarray(rand((4, 1, 32), seed=3) * 0.1)
  f = lambda x, shift, scale: nj.adaptive_layer_norm(x, shift, scale)
  loss = lambda *a: jnp.sum(jnp.sin(f(*a)))
  grad = jax.grad(loss, argnums=(0, 1, 2))
  text = jax.jit(grad).lower(x, shift, scale).as_text()
  assert "NormjaxRowsForward" in text and "NormjaxRowsBackward" in text
  got = [jax.jit(f)(x, shift, scale), *jax.jit(grad)(x, shift, scale)]
  with nj.implementation("reference"):
    want = [jax.jit(f)(x, shift, scale), *jax.jit(grad)(x, shift, scale)]
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5 * float(jnp.abs(w).max()))


@pytest.mark.skipif(not _native.NATIVE, reason="native kernel not built")
@pytest.mark.parametrize("shape,dtype,centered,per_row", FAST_KERNEL_CASES)
def test_add_backward_kernel_adds_the_sums_cotangent(shape, dtype, centered, per_row):
  """The residual-add backward kernel: the rows backward's dx plus the cotangent of `h`, added
  in float32 and rounded once, and the same dscale and dbias, against the primitive's
  definition (the rows backward, then the add) and float64."""
  x = rand(shape, dtype=dtype, loc=-0.3, seed=6)
  ct, ct_h = rand(shape, dtype=dtype, seed=7), rand(shape, dtype=dtype, seed=9)
  scale = rand(shape[:1] if per_row else shape[1:], seed=8)
  eps = 1e-3
  kw = dict(centered=centered, per_row=per_row, example_rows=0)
  shift, offset, rstd = _reference_statistics(x, scale, eps, kw)
  got = jax.jit(lambda *a: _rows.rows_add_backward_p.bind(*a, **kw))(
      x, ct, ct_h, shift, offset, rstd, scale)
  plain = jax.jit(lambda *a: _rows.rows_backward_p.bind(*a, **kw))(
      x, ct, shift, offset, rstd, scale)
  ref = jax.jit(lambda *a: _rows._add_backward_reference(*a, **kw))(
      x, ct, ct_h, shift, offset, rstd, scale)
  want_dx = np.asarray(plain[0].astype(F32), np.float64) + np.asarray(ct_h.astype(F32))
  assert got[0].dtype == x.dtype
  tol = 1e-6 if dtype == jnp.float32 else 8e-3   # bfloat16: dx rounded once, not twice
  np.testing.assert_allclose(np.asarray(got[0].astype(F32), np.float64), want_dx, rtol=tol,
                             atol=tol * max(1.0, np.abs(want_dx).max()))
  np.testing.assert_allclose(np.asarray(ref[0].astype(F32), np.float64), want_dx, rtol=tol,
                             atol=tol * max(1.0, np.abs(want_dx).max()))
  for g, p in zip(got[1:], plain[1:], strict=True):
    np.testing.assert_array_equal(g, p)


@pytest.mark.skipif(not _native.NATIVE, reason="native kernel not built")
@pytest.mark.parametrize("shape,centered,per_row", slow_except(
    [(s, c, p) for s, d, c, p in KERNEL_CASES if d == jnp.float32],
    *[(SHAPES[-1], c, p) for c in (True, False) for p in (False, True)], unpack=True))
@pytest.mark.parametrize("with_h", [True, False])
def test_mixed_add_backward_kernel_reads_bfloat16_cotangents(shape, centered, per_row, with_h):
  """The mixed residual-add backward kernel (float32 `h` and `ct_h`, bfloat16 `ct`): `dh` is the
  float32 residual-add backward of the widened cotangent, bit for bit, `dx` its rounding to
  bfloat16, `dscale` and `dbias` the plain backward's; against float64 too, and the
  primitive's definition agrees. Without `ct_h` (`rows_backward_mixed_p`: `h` unused after the
  norm), `dh` is the plain float32 backward's, bit for bit."""
  x = rand(shape, loc=-0.3, seed=6)
  ct = rand(shape, seed=7).astype(jnp.bfloat16)
  ct_h = rand(shape, seed=9) if with_h else jnp.zeros(shape, F32)
  scale = rand(shape[:1] if per_row else shape[1:], seed=8)
  kw = dict(centered=centered, per_row=per_row, example_rows=0)
  shift, offset, rstd = _reference_statistics(x, scale, 1e-3, kw)
  args = (shift, offset, rstd, scale)
  plain = jax.jit(lambda *a: _rows.rows_backward_p.bind(*a, **kw))(x, ct.astype(F32), *args)
  if with_h:
    dx, dh, dscale, dbias = jax.jit(lambda *a: _rows.rows_add_backward_mixed_p.bind(*a, **kw))(
        x, ct, ct_h, *args)
    same = jax.jit(lambda *a: _rows.rows_add_backward_p.bind(*a, **kw))(
        x, ct.astype(F32), ct_h, *args)
    ref = jax.jit(lambda *a: _rows._add_backward_mixed_reference(*a, **kw))(x, ct, ct_h, *args)
  else:
    dx, dh, dscale, dbias = jax.jit(lambda *a: _rows.rows_backward_mixed_p.bind(*a, **kw))(
        x, ct, *args)
    same = plain
    ref = jax.jit(lambda *a: _rows._backward_mixed_reference(*a, **kw))(x, ct, *args)
  assert (dx.dtype, dh.dtype) == (jnp.bfloat16, F32)
  np.testing.assert_array_equal(dh, same[0])
  np.testing.assert_array_equal(dx, dh.astype(jnp.bfloat16))
  for g, p in zip((dscale, dbias), plain[1:], strict=True):
    np.testing.assert_array_equal(g, p)
  want = np.asarray(plain[0], np.float64) + np.asarray(ct_h, np.float64)
  np.testing.assert_allclose(np.asarray(dh, np.float64), want, rtol=1e-6,
                             atol=1e-6 * max(1.0, np.abs(want).max()))
  for g, r in zip((dx, dh, dscale, dbias), ref, strict=True):
    assert g.dtype == r.dtype
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(r, np.float32),
                               rtol=8e-3, atol=8e-3 * max(1.0, float(np.abs(r).max())))


@pytest.mark.skipif(not _native.NATIVE, reason="native kernel not built")
@pytest.mark.parametrize("name", ["add_layer_norm", "add_rms_norm"])
def test_add_norm_backward_takes_both_cotangents_in_one_kernel(name):
  """The fused add-norms' reverse mode on the native path: one backward kernel receives the
  cotangents of `y` and `h` (no separate add of h's cotangent), and the gradients match the
  reference path's, with an outlier first and a 1e5 offset; with only `y` used, the plain rows
  backward."""
  fn = getattr(nj, name)
  x = np.asarray(rand((4, 6, 67), 0), np.float32)
  x[0, 0, 0] = 3e4
  x[1] += 1e5
  x, r = jnp.asarray(x), jnp.asarray(rand((4, 6, 67), 1))
  w = jnp.asarray(rand((67,), 2, loc=1.0))
  cts = (jnp.asarray(rand((4, 6, 67), 3)), jnp.asarray(rand((4, 6, 67), 4)))
  train = lambda x, r, w: jax.vjp(lambda x, r, w: fn(x, r, w), x, r, w)[1](cts)
  hlo = jax.jit(train).lower(x, r, w).compile().as_text()
  assert "NormjaxRowsAddBackward" in hlo and "NormjaxRowsBackward" not in hlo
  y_only = lambda x, r, w: jax.grad(lambda x, r, w: jnp.sum(fn(x, r, w)[0] * cts[0]),
                                    (0, 1, 2))(x, r, w)
  assert "NormjaxRowsBackward" in jax.jit(y_only).lower(x, r, w).compile().as_text()
  for f in (train, y_only):
    got = jax.jit(f)(x, r, w)
    with nj.implementation("reference"):
      want = jax.jit(f)(x, r, w)
    for g, v in zip(got, want, strict=True):
      np.testing.assert_allclose(g, v, rtol=1e-4, atol=1e-4 * float(np.abs(v).max()))


@pytest.mark.skipif(not _native.NATIVE, reason="native kernel not built")
@pytest.mark.parametrize("name", ["add_layer_norm", "add_rms_norm"])
def test_mixed_add_norm_backward_without_h_takes_no_zeros(name):
  """A float32 residual stream with a bfloat16 `x` (`residual_dtype=float32`): with `h` used, one
  mixed backward kernel takes both cotangents; with only `y` used (the last block of a stream),
  the mixed backward without `h`'s cotangent (no float32 zeros written for it to add). The
  gradients match the reference path's, with an outlier first and a 1e5 offset."""
  fn = getattr(nj, name)
  r = np.asarray(rand((4, 6, 67), 1), np.float32)
  r[0, 0, 0] = 3e4
  r[1] += 1e5
  x, r = jnp.asarray(rand((4, 6, 67), 0), jnp.bfloat16), jnp.asarray(r)
  w = jnp.asarray(rand((67,), 2, loc=1.0))
  cts = (jnp.asarray(rand((4, 6, 67), 3), jnp.bfloat16), jnp.asarray(rand((4, 6, 67), 4)))
  f = lambda x, r, w: fn(x, r, w, residual_dtype=F32)
  train = lambda x, r, w: jax.vjp(f, x, r, w)[1](cts)
  y_only_at = lambda x, r, w, c: jax.vjp(lambda *a: f(*a)[0], x, r, w)[1](c)
  y_only = lambda x, r, w: y_only_at(x, r, w, cts[0])
  hlo = jax.jit(train).lower(x, r, w).compile().as_text()
  assert "NormjaxRowsAddBackwardMixed" in hlo and "NormjaxRowsBackwardMixed" not in hlo
  hlo = jax.jit(y_only).lower(x, r, w).compile().as_text()
  assert "NormjaxRowsBackwardMixed" in hlo and "NormjaxRowsAddBackward" not in hlo
  for g in (train, y_only):
    got = jax.jit(g)(x, r, w)
    with nj.implementation("reference"):
      want = jax.jit(g)(x, r, w)
    for a, b in zip(got, want, strict=True):
      assert a.dtype == b.dtype
      tol = 1e-2 if a.dtype == jnp.bfloat16 else 1e-4
      a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
      np.testing.assert_allclose(a, b, rtol=tol, atol=tol * float(np.abs(b).max()))
  # Per-example gradients (the primitive's batching rule) equal a loop over the examples.
  per_example = jax.jit(jax.vmap(y_only_at, in_axes=(0, 0, None, 0)))(x, r, w, cts[0])
  loop = [jax.jit(y_only_at)(x[i], r[i], w, cts[0][i]) for i in range(4)]
  for k, got in enumerate(per_example):
    want = np.stack([np.asarray(v[k], np.float32) for v in loop])
    np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=1e-5,
                               atol=1e-5 * float(np.abs(want).max()))


_THREADS_SCRIPT = """
import os, sys
if sys.argv[2] == "one":      # before jax starts: XLA sizes its intra-op pool to the CPUs it may use
  os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
import jax, jax.numpy as jnp, numpy as np
import normjax as nj
from tests.helpers import rand
f32 = jnp.float32
out = {}
def grads(name, f, *args):   # a random cotangent: sums over rows that cancel show any change
  ct = jnp.asarray(rand(jax.eval_shape(f, *args).shape, seed=len(out)))
  loss = lambda *a: jnp.sum(f(*a).astype(f32) * ct)
  for k, v in enumerate(jax.jit(jax.grad(loss, argnums=tuple(range(len(args)))))(*args)):
    out[f"{name}/{k}"] = np.asarray(v.astype(f32))
for dt in (jnp.float32, jnp.bfloat16):
  x = jnp.asarray(rand((512, 768), seed=1, loc=3.0), dt)
  z = jnp.asarray(rand((512, 768), seed=2), dt)
  w = jnp.asarray(rand((768,), seed=3, loc=1.0), f32)
  b = jnp.asarray(rand((768,), seed=4), f32)
  mod = jnp.asarray(rand((4, 1, 768), seed=5) * 0.1, dt)
  img = jnp.asarray(rand((8, 16, 16, 96), seed=6, loc=2.0), dt)
  c, cb = jnp.asarray(rand((96,), seed=7, loc=1.0), f32), jnp.asarray(rand((96,), seed=8), f32)
  grads(f"layer {dt.__name__}", nj.layer_norm, x, w, b)
  grads(f"adaLN {dt.__name__}", nj.adaptive_layer_norm, x.reshape(4, 128, 768), mod, mod * 2)
  grads(f"gated {dt.__name__}", lambda x, z, w: nj.gated_rms_norm(x, z, w), x, z, w)
  grads(f"tanh {dt.__name__}", lambda x, a, w, b: nj.dynamic_tanh(x, a, w, b), x,
        jnp.asarray(0.5, f32), w, b)
  grads(f"group {dt.__name__}", lambda x, c, cb: nj.group_norm(x, c, cb, num_groups=8), img, c, cb)
  grads(f"batch {dt.__name__}", lambda x, c, cb: nj.batch_norm(
      x, c, cb, nj.init_batch_stats(96), train=True)[0], img, c, cb)
np.savez(sys.argv[1], **out)
"""


@pytest.mark.slow
@pytest.mark.skipif(not _native.NATIVE, reason="native kernel not built")
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 or more CPUs")
def test_kernels_give_the_same_bits_on_one_thread_as_on_all(tmp_path):
  """The kernels' chunks depend on the shape only and their partial sums are added in chunk
  order (threads.h), so every derivative (the sums over rows of layer norm, adaLN's per-example
  sums, the gated and dynamic tanh backward's, the moments kernels' column sums of group and
  batch norm) has the same bits with XLA's pool on one CPU as on all of them."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  # One host device: under conftest.py's XLA_FLAGS (4 devices) a chunk count that followed the
  # thread count went unseen.
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
  got = {}
  for cpus in ("all", "one"):
    path = str(tmp_path / f"{cpus}.npz")
    proc = subprocess.run([sys.executable, "-c", _THREADS_SCRIPT, path, cpus], cwd=root,
                          env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got[cpus] = np.load(path)
  assert len(got["all"].files) == 38
  for name in got["all"].files:
    np.testing.assert_array_equal(got["all"][name].view(np.uint32),
                                  got["one"][name].view(np.uint32), err_msg=name)
