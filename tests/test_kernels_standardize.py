"""The row-normalization primitives (normjax/_rows.py) and their native CPU kernel.

Layer and RMS norm over trailing axes run through three primitives whose CPU lowering is an
XLA FFI call into normjax/_native/rows.cc. The tests here check that the kernel is built and
used, that kernel and `jax.numpy` definitions agree with each other and with float64 NumPy,
and that every transformation reaches the right rule (batch folding, the batching fallbacks,
the transpose, higher derivatives). The variant-level tests (test_variants, test_numerics,
test_torch_parity, ...) run through the kernel as well.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import normjax as nj
from normjax._kernels import cpu as _native
from normjax._kernels import standardize as _rows
from tests import reference
from tests.helpers import rand

F32 = jnp.float32


def _hlo(fn, *args):
  return jax.jit(fn).lower(*args).compile().as_text()


def test_native_kernel_is_built():
  """The install (setup.py) builds the kernel; NORMJAX_NATIVE=0 is the only way to be without."""
  if os.environ.get("NORMJAX_NATIVE") == "0":
    assert not _native.NATIVE
  else:
    assert _native.NATIVE, "normjax/_native/_rows_cpu*.so missing: reinstall with a C++ compiler"


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


@pytest.mark.parametrize("shape,dtype,centered,per_row", KERNEL_CASES)
def test_forward_kernel_matches_reference_and_numpy(shape, dtype, centered, per_row):
  x = rand(shape, dtype=dtype, loc=0.5, seed=3)
  params = shape[:1] if per_row else shape[1:]
  g, b = rand(params, seed=4), rand(params, seed=5)
  kw = dict(eps=1e-5, centered=centered, per_row=per_row)
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


@pytest.mark.parametrize("shape,dtype,centered,per_row", KERNEL_CASES)
def test_backward_kernel_matches_reference_and_numpy(shape, dtype, centered, per_row):
  x = rand(shape, dtype=dtype, loc=-0.3, seed=6)
  ct = rand(shape, dtype=dtype, seed=7)
  scale = rand(shape[:1] if per_row else shape[1:], seed=8)
  eps = 1e-3
  kw = dict(centered=centered, per_row=per_row)
  _, shift, offset, var = jax.jit(lambda *a: _rows._forward_reference(*a, eps=eps, **kw))(
      x, scale, scale)
  rstd = jax.lax.rsqrt(var + eps)
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
  kw = dict(centered=True, per_row=False)
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
  y = _rows.rows_forward_p.bind(x, zero, bias, eps=1e-5, centered=True, per_row=per_row)[0]
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
from normjax._kernels import cpu as _native
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
