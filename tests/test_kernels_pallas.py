"""The Pallas kernels of the row primitives (normjax/_src/kernels/pallas.py), in interpret mode.

On a CPU the kernels run in Pallas interpret mode, with the GPU's blocks (features padded to a
power of two and masked, a grid over blocks of 16 rows or fewer, ragged last blocks). Each
kernel is held to float64 NumPy on adversarial data (an outlier first in every row, a 1e5
offset, drift within a row, constant rows, 2^24-value rows, overflow, NaN/Inf), and to its
primitive's `jax.numpy` definition; the public functions that reach them under
`nj.implementation("pallas")` (layer/RMS norm, the residual-add forms, the zero-centered scale)
against float64 values, first derivatives and second derivatives (a float64 finite difference
of the float64 gradient). The lowerings for CUDA (Triton) and TPU (Mosaic) are checked as text:
they need no device.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import normjax as nj
from normjax._src.kernels import pallas
from normjax._src.kernels import rows as _rows
from tests.helpers import slow_except

F32 = jnp.float32
BF16 = jnp.bfloat16
PALLAS = dict(implementation="pallas")


def _f64(a):
  return np.asarray(jnp.asarray(a).astype(F32), np.float64)


def _forward(x, scale, bias, eps=1e-5, centered=True, per_row=False):
  return jax.jit(lambda *a: _rows.rows_forward_p.bind(
      *a, eps=eps, centered=centered, per_row=per_row, **PALLAS))(x, scale, bias)


# ----------------------------------------------------------------- kernels against float64

def _numpy_rows(x64, scale, bias, eps, centered, per_row):
  mean = x64.mean(1, keepdims=True) if centered else np.zeros((x64.shape[0], 1))
  var = ((x64 - mean) ** 2).mean(1, keepdims=True)
  xhat = (x64 - mean) / np.sqrt(var + eps)
  e = (lambda p: _f64(p)[:, None]) if per_row else (lambda p: _f64(p)[None])
  return xhat * e(scale) + e(bias), mean[:, 0], var[:, 0], xhat


# (rows, features): one block padded 7 -> 8 with 20 rows (a ragged second block of 4), a
# 128-wide row in a single short block, 37 rows of 100 (padded to 128; three blocks).
KERNEL_SHAPES = [(20, 7), (3, 128), (37, 100)]
KERNEL_CASES = [(s, d, c, p) for s in KERNEL_SHAPES for d in (F32, BF16) for c in (True, False)
                for p in (False, True)]
FAST_KERNEL_CASES = slow_except(KERNEL_CASES, ((20, 7), F32, True, False),
                                ((37, 100), BF16, False, True), unpack=True)


@pytest.mark.parametrize("shape,dtype,centered,per_row", FAST_KERNEL_CASES)
def test_forward_and_backward_kernels_match_float64_and_the_definition(shape, dtype, centered,
                                                                       per_row):
  rng = np.random.default_rng(0)
  x = jnp.asarray(0.5 + rng.standard_normal(shape), dtype)
  ct = jnp.asarray(rng.standard_normal(shape), dtype)
  params = shape[:1] if per_row else shape[1:]
  scale = jnp.asarray(1.0 + 0.5 * rng.standard_normal(params), F32)
  bias = jnp.asarray(rng.standard_normal(params), F32)
  kw = dict(centered=centered, per_row=per_row)
  y, shift, offset, var = _forward(x, scale, bias, eps=1e-3, **kw)
  y64, mean64, var64, xhat = _numpy_rows(_f64(x), scale, bias, 1e-3, centered, per_row)
  tol = 1e-5 if dtype == F32 else 2e-2
  assert y.dtype == x.dtype and var.dtype == F32 and var.shape == shape[:1]
  np.testing.assert_allclose(_f64(y), y64, atol=4 * tol, rtol=tol)
  np.testing.assert_allclose(_f64(shift) + _f64(offset), mean64, atol=1e-6, rtol=1e-6)
  np.testing.assert_allclose(_f64(var), var64, atol=1e-7, rtol=1e-6)

  rstd = jax.lax.rsqrt(var + 1e-3)
  args = (x, ct, shift, offset, rstd, scale)
  got = jax.jit(lambda *a: _rows.rows_backward_p.bind(*a, **kw, **PALLAS))(*args)
  ref = jax.jit(lambda *a: _rows._backward_reference(*a, **kw))(*args)
  g64 = _f64(ct)
  gs = g64 * (_f64(scale)[:, None] if per_row else _f64(scale)[None])
  rs = 1 / np.sqrt(var64[:, None] + 1e-3)
  dx64 = rs * (gs - (gs.mean(1, keepdims=True) if centered else 0.0)
               - xhat * (gs * xhat).mean(1, keepdims=True))
  axis = 1 if per_row else 0
  want = (dx64, (g64 * xhat).sum(axis), g64.sum(axis))
  tol = 1e-4 if dtype == F32 else 3e-2
  assert got[0].dtype == x.dtype and got[1].dtype == F32 and got[1].shape == scale.shape
  for g, r, w in zip(got, ref, want, strict=True):
    for value in (g, r):
      np.testing.assert_allclose(_f64(value), w, atol=tol * max(1.0, np.abs(w).max()), rtol=tol)


@pytest.mark.parametrize("dtype", slow_except([F32, BF16], BF16))
def test_add_forward_kernel_writes_the_sum_and_normalizes_it(dtype):
  rng = np.random.default_rng(1)
  x = jnp.asarray(3.0 + rng.standard_normal((21, 33)), dtype)
  r = jnp.asarray(rng.standard_normal((21, 33)), dtype)
  scale, bias = jnp.linspace(0.5, 1.5, 33), jnp.linspace(-1.0, 1.0, 33)
  kw = dict(eps=1e-5, centered=True, per_row=False)
  y, h, shift, offset, var = jax.jit(lambda *a: _rows.rows_add_forward_p.bind(
      *a, **kw, **PALLAS))(x, r, scale, bias)
  np.testing.assert_array_equal(np.asarray(h.astype(F32)), np.asarray((x + r).astype(F32)))
  y64, mean64, var64, _ = _numpy_rows(_f64(h), scale, bias, 1e-5, True, False)
  tol = 1e-5 if dtype == F32 else 2e-2
  assert y.dtype == h.dtype == x.dtype
  np.testing.assert_allclose(_f64(y), y64, atol=4 * tol, rtol=tol)
  np.testing.assert_allclose(_f64(shift) + _f64(offset), mean64, atol=1e-6)
  np.testing.assert_allclose(_f64(var), var64, rtol=1e-6)


def test_backward_partial_sums_over_many_blocks():
  """Per-feature dscale/dbias summed over 200 blocks of 16 rows (one ragged): each block's
  partial sum counted once, rows past the end not at all."""
  rows, n = 16 * 199 + 3, 16
  rng = np.random.default_rng(6)
  x = jnp.asarray(rng.standard_normal((rows, n)), F32)
  ct = jnp.asarray(1.0 + 0.1 * rng.standard_normal((rows, n)), F32)
  scale = jnp.ones(n)
  kw = dict(centered=True, per_row=False)
  _, shift, offset, var = _forward(x, scale, scale, **kw)
  rstd = jax.lax.rsqrt(var + 1e-5)
  _, dscale, dbias = jax.jit(lambda *a: _rows.rows_backward_p.bind(*a, **kw, **PALLAS))(
      x, ct, shift, offset, rstd, scale)
  x64, g64 = _f64(x), _f64(ct)
  xhat = (x64 - x64.mean(1, keepdims=True)) / np.sqrt(x64.var(1, keepdims=True) + 1e-5)
  np.testing.assert_allclose(_f64(dbias), g64.sum(0), rtol=1e-6)
  np.testing.assert_allclose(_f64(dscale), (g64 * xhat).sum(0),
                             atol=1e-6 * np.abs(g64 * xhat).sum(0).max())


# ----------------------------------------------------------------- adversarial statistics

def _adversarial(kind, dtype):
  rng = np.random.default_rng(2)
  if kind == "outlier_first":          # the first element of every row far from the rest
    x = rng.standard_normal((20, 1000)).astype(np.float32)
    x[:, 0] = 1e4
    x[0, 1] = -3e4
  elif kind == "offset":               # rows of 4099 values at 1e5 (one row per block)
    x = (1e5 + rng.standard_normal((6, 4099))).astype(np.float32)
  else:                                # "drift": later parts of a row far from earlier ones
    n = 8 * 1024 + 5
    x = rng.standard_normal((6, n)).astype(np.float32)
    x[0, n // 2:] += 1e3
    x[1] += np.linspace(0.0, 5e3, n, dtype=np.float32)
    x[2, 5000] = -3e4
    x[3] += 1e5
    x[4] = 7.0                         # a constant row: variance exactly 0
    x[5, 1024:] += 50.0
  return jnp.asarray(x).astype(dtype)


def _check_statistics(shift, offset, var, x64):
  """Mean and variance to float32 rounding: the mean to 1e-7 of the rows' root mean square,
  the variance to a relative 1e-6; the shift within an ulp of the mean."""
  mean, var64 = x64.mean(1), x64.var(1)
  shift, offset, var = _f64(shift), _f64(offset), _f64(var)
  atol = 1e-7 * np.sqrt(var64 + mean ** 2)
  assert np.all(np.abs(shift + offset - mean) <= atol)
  np.testing.assert_allclose(var, var64, rtol=1e-6, atol=0)
  assert np.all(np.abs(shift - mean) <= 2.0 ** -22 * np.abs(mean) + atol)


ADVERSARIAL = [(k, d) for k in ("outlier_first", "offset", "drift") for d in (F32, BF16)]


@pytest.mark.parametrize("kind,dtype", slow_except(ADVERSARIAL, ("outlier_first", F32),
                                                   ("offset", BF16), unpack=True))
def test_statistics_on_adversarial_rows_match_float64(kind, dtype):
  x = _adversarial(kind, dtype)
  n = x.shape[1]
  y, shift, offset, var = _forward(x, jnp.ones(n), jnp.zeros(n))
  x64 = _f64(x)
  _check_statistics(shift, offset, var, x64)
  want = (x64 - x64.mean(1, keepdims=True)) / np.sqrt(x64.var(1, keepdims=True) + 1e-5)
  tol = 1e-5 if dtype == F32 else 2e-2
  np.testing.assert_allclose(_f64(y), want, atol=tol, rtol=tol)
  if kind == "drift":
    assert float(var[4]) == 0.0 and np.all(_f64(y[4]) == 0.0)


@pytest.mark.slow
def test_rows_of_2_24_values_match_float64():
  if jax.default_backend() != "cpu":
    pytest.skip("a row of 2^24 values is one block: interpret mode only (the dispatch takes "
                "the reference beyond pallas.MAX_FEATURES)")
  n = 1 << 24
  x = np.random.default_rng(4).standard_normal((1, n), dtype=np.float32)
  x64 = np.asarray(x, np.float64)
  y, shift, offset, var = _forward(jnp.asarray(x), jnp.ones(n), jnp.zeros(n), eps=0.0)
  assert abs(float(var[0]) / x64.var() - 1) <= 1e-6
  assert abs(float(shift[0]) + float(offset[0]) - x64.mean()) <= 1e-7 * np.sqrt(x64.var())
  np.testing.assert_allclose(_f64(y[0, :4096]), (x64[0, :4096] - x64.mean()) / x64.std(),
                             atol=1e-6)
  del y
  ms = _forward(jnp.asarray(x), jnp.ones(n), jnp.zeros(n), eps=0.0, centered=False)[3]
  assert abs(float(ms[0]) / np.mean(x64 ** 2) - 1) <= 1e-6


@pytest.mark.parametrize("centered", [True, False])
def test_overflow_nan_and_inf_give_nan_rows(centered):
  """Squares beyond float32's range, a NaN, an Inf: that row is NaN (its variance not
  finite), the others untouched; the backward's row of dx is NaN too."""
  rng = np.random.default_rng(8)
  x = rng.standard_normal((5, 300)).astype(np.float32)
  x[1] = (rng.choice([-1, 1], 300) * 10.0 ** rng.uniform(20, 30, 300)).astype(np.float32)
  x[2, 17], x[3, 3], x[4, 299] = np.nan, np.inf, -np.inf
  x = jnp.asarray(x)
  ones = jnp.ones(300)
  y, shift, offset, var = _forward(x, ones, ones, centered=centered)
  y, var = np.asarray(y), np.asarray(var)
  assert not np.isfinite(var[1:]).any() and np.isfinite(var[0])
  assert np.all(np.isnan(y[1:])) and np.all(np.isfinite(y[0]))
  kw = dict(centered=centered, per_row=False)
  rstd = nj_rstd(var)
  dx, dscale, _ = jax.jit(lambda *a: _rows.rows_backward_p.bind(*a, **kw, **PALLAS))(
      x, jnp.ones_like(x), shift, offset, rstd, ones)
  assert np.all(np.isnan(np.asarray(dx)[1:])) and np.all(np.isfinite(np.asarray(dx)[0]))
  assert np.all(np.isnan(np.asarray(dscale)))


def nj_rstd(var):
  from normjax._src.numerics.standardize import rstd  # pylint: disable=import-outside-toplevel
  return rstd(jnp.asarray(var), 1e-5)


# ----------------------------------------------------------------- the public functions

def _norm64(h, scale, bias, eps, centered):
  mean = h.mean(-1, keepdims=True) if centered else 0.0
  rstd = 1 / np.sqrt(((h - mean) ** 2).mean(-1, keepdims=True) + eps)
  xhat = (h - mean) * rstd
  return xhat * scale + bias, xhat, rstd


# name -> (centered, eps, residual form, scale_offset, has bias)
FORMS = {
    "layer_norm": (True, 1e-5, False, 0.0, True),
    "rms_norm": (False, 1e-6, False, 0.0, False),
    "rms_norm_scale_offset": (False, 1e-6, False, 1.0, False),
    "add_layer_norm": (True, 1e-5, True, 0.0, True),
    "add_rms_norm": (False, 1e-6, True, 0.0, False),
}


def _call(name, x, r, scale, bias):
  _, eps, residual, offset, _ = FORMS[name]
  if name == "layer_norm":
    return nj.layer_norm(x, scale, bias, eps=eps)
  if name.startswith("rms_norm"):
    return nj.rms_norm(x, scale, eps=eps, scale_offset=offset)
  if name == "add_layer_norm":
    return nj.add_layer_norm(x, r, scale, bias, eps=eps)[0]
  assert residual
  return nj.add_rms_norm(x, r, scale, eps=eps)[0]


def _grads64(name, h, scale, bias, c):
  """Float64 `(y, dL/dh, dL/dscale, dL/dbias)` of `L = sum(sin(y) * c)`."""
  centered, eps, _, offset, _ = FORMS[name]
  s = scale + offset
  y, xhat, rstd = _norm64(h, s, bias, eps, centered)
  g = np.cos(y) * c
  gs = g * s
  dh = rstd * (gs - (gs.mean(-1, keepdims=True) if centered else 0.0)
               - xhat * (gs * xhat).mean(-1, keepdims=True))
  lead = tuple(range(h.ndim - 1))
  return y, dh, (g * xhat).sum(lead), g.sum(lead)


def _inputs(kind, dtype, shape=(3, 7, 33)):
  """21 rows of 33 (two blocks of 16, the second ragged; features padded to 64)."""
  rng = np.random.default_rng(11)
  x = rng.standard_normal(shape)
  if kind == "outlier_first":
    x[..., 0] = 1e4
  elif kind == "offset":
    x = x + 1e5
  r = rng.standard_normal(shape)
  params = [jnp.asarray(0.2 * rng.standard_normal(shape[-1:]) + (1.0 if i == 0 else 0.0), F32)
            for i in range(2)]
  return (jnp.asarray(x, dtype), jnp.asarray(r, dtype), *params,
          jnp.asarray(rng.standard_normal(shape), F32), jnp.asarray(rng.standard_normal(shape)))


FUNCTION_CASES = [(n, d, k) for n in FORMS for d in (F32, BF16)
                  for k in ("normal", "outlier_first", "offset")]
FAST_FUNCTION_CASES = slow_except(FUNCTION_CASES, ("layer_norm", F32, "outlier_first"),
                                  ("rms_norm_scale_offset", F32, "offset"),
                                  ("add_rms_norm", BF16, "normal"), unpack=True)


@pytest.mark.parametrize("name,dtype,kind", FAST_FUNCTION_CASES)
def test_functions_and_derivatives_match_float64(name, dtype, kind):
  """Output, gradient (in x, the residual, scale and bias) and the derivative of the gradient
  along `v` (forward over reverse) under `nj.implementation("pallas")`, against float64."""
  centered, _, residual, _, has_bias = FORMS[name]
  x, r, scale, bias, c, v = _inputs(kind, dtype)
  if not has_bias:
    bias = None
  if residual and dtype == F32 and kind == "offset":
    r = r * 1e-3                       # keep h near 1e5 + N(0, 1) too

  def loss(x, r, scale, bias):
    return jnp.sum(jnp.sin(_call(name, x, r, scale, bias).astype(F32)) * c)
  argnums = (0, 1, 2, 3) if has_bias else (0, 1, 2)
  with nj.implementation("pallas"):
    y = jax.jit(lambda *a: _call(name, *a))(x, r, scale, bias)
    grads = jax.jit(jax.grad(loss, argnums))(x, r, scale, bias)
    second = jax.jit(lambda x: jax.jvp(lambda x: jax.grad(loss)(x, r, scale, bias), (x,),
                                       (v.astype(dtype),))[1])(x) if dtype == F32 else None
  h64 = _f64(x) + (_f64(r) if residual else 0.0)
  if residual:
    h64 = _f64((x + r))
  b64 = 0.0 if bias is None else _f64(bias)
  y64, dh, dscale, dbias = _grads64(name, h64, _f64(scale), b64, _f64(c))
  tol = 2e-5 if dtype == F32 else 2e-2
  assert y.dtype == dtype
  np.testing.assert_allclose(_f64(y), y64, rtol=tol, atol=tol)
  want = [dh] + ([dh] if residual else []) + [dscale] + ([dbias] if has_bias else [])
  got = [grads[0]] + ([grads[1]] if residual else []) + list(grads[2:])
  tol = 1e-4 if dtype == F32 else 5e-2
  for g, w in zip(got, want, strict=True):
    np.testing.assert_allclose(_f64(g), w, rtol=tol, atol=tol * np.abs(w).max())
  if second is not None:   # float64 central difference of the float64 gradient along v
    step = 1e-4 * max(1.0, float(np.abs(h64 - h64.mean(-1, keepdims=True)).max()))
    grad_at = lambda t: _grads64(name, h64 + t * _f64(v), _f64(scale), b64, _f64(c))[1]
    fd = (grad_at(step) - grad_at(-step)) / (2 * step)
    np.testing.assert_allclose(_f64(second), fd, rtol=1e-3, atol=1e-3 * np.abs(fd).max())


def test_gradient_at_a_large_offset_in_one_block():
  """Layer norm of `1e5 + N(0, 1)` in one block (3 rows of 24), forward and backward in one
  program: the shift the forward subtracts is the one it writes and the backward reads. (An
  unrounded `sum / n` was fused into `x - sum * (1 / n)` as a multiply-add in interpret mode:
  gradients off by 6e-3.)"""
  rng = np.random.default_rng(15)
  x = jnp.asarray(1e5 + rng.standard_normal((3, 24)), F32)
  c = jnp.asarray(rng.standard_normal((3, 24)), F32)
  with nj.implementation("pallas"):
    grad = jax.jit(jax.grad(lambda x: jnp.sum(jnp.sin(nj.layer_norm(x)) * c)))(x)
  _, dh, _, _ = _grads64("layer_norm", _f64(x), 1.0, 0.0, _f64(c))
  np.testing.assert_allclose(_f64(grad), dh, rtol=1e-4, atol=1e-4 * np.abs(dh).max())


def test_instance_norm_channels_first_takes_the_per_row_kernel():
  """Instance norm on NCHW normalizes rows with one scale per row (`per_row`): value and
  gradients against float64 (dscale is a per-row sum, folded over the batch)."""
  rng = np.random.default_rng(12)
  x = jnp.asarray(rng.standard_normal((2, 3, 5, 7)), F32)
  scale, bias = jnp.asarray([0.5, 1.0, 2.0]), jnp.asarray([0.1, 0.0, -0.3])
  c = jnp.asarray(rng.standard_normal(x.shape), F32)
  fn = lambda x, s, b: nj.instance_norm(x, s, b, channel_axis=1)
  loss = lambda *a: jnp.sum(jnp.sin(fn(*a)) * c)
  with nj.implementation("pallas"):
    assert "implementation=pallas" in str(jax.make_jaxpr(jax.grad(loss))(x, scale, bias))
    y = jax.jit(fn)(x, scale, bias)
    dx, ds, db = jax.jit(jax.grad(loss, (0, 1, 2)))(x, scale, bias)
  h = _f64(x).reshape(2, 3, 35)
  s64, b64 = _f64(scale)[:, None], _f64(bias)[:, None]
  y64, xhat, rstd = _norm64(h, s64, b64, 1e-5, True)
  g = np.cos(y64) * _f64(c).reshape(h.shape)
  gs = g * s64
  dx64 = rstd * (gs - gs.mean(-1, keepdims=True) - xhat * (gs * xhat).mean(-1, keepdims=True))
  np.testing.assert_allclose(_f64(y).reshape(h.shape), y64, rtol=2e-5, atol=2e-5)
  np.testing.assert_allclose(_f64(dx).reshape(h.shape), dx64, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(_f64(ds), (g * xhat).sum((0, 2)), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(_f64(db), g.sum((0, 2)), rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------- lowerings for devices

def _lowered(fn, platform, *args):
  with nj.implementation("pallas"):
    return jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()


def _calls(text):
  return set(re.findall(r"custom_call @([\w$.]+)", text))


# platform -> the custom call a Pallas kernel lowers to without a device
TARGETS = {"cuda": "__gpu$xla.gpu.triton", "tpu": "tpu_custom_call"}


@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("platform", sorted(TARGETS))
def test_lowering_for_a_device_calls_the_kernels(platform, dtype):
  """Lowered for CUDA (Triton) or TPU (Mosaic) on this CPU: the forward, the residual-add
  forward and the backward are Pallas calls (no device needed to lower)."""
  if platform not in pallas.PLATFORMS:
    pytest.skip(f"this jaxlib has no Pallas lowering for {platform}")
  rng = np.random.default_rng(13)
  x = jnp.asarray(rng.standard_normal((4, 9, 100)), dtype)
  scale, bias = jnp.ones(100), jnp.zeros(100)
  grad = jax.grad(lambda x, r, s, b: jnp.sum(nj.add_layer_norm(x, r, s, b)[0].astype(F32)),
                  argnums=(0, 1, 2, 3))
  text = _lowered(grad, platform, x, x, scale, bias)
  assert _calls(text) == {TARGETS[platform]}
  assert "normjax_rows_add_forward" in text and "normjax_rows_backward" in text
  text = _lowered(lambda x, s: nj.rms_norm(x, s, scale_offset=1.0), platform, x, scale)
  assert _calls(text) == {TARGETS[platform]} and "normjax_rows_forward" in text
  # vmap folds the batch into rows and keeps the kernel.
  text = _lowered(jax.vmap(lambda x: nj.layer_norm(x, scale, bias)), platform, x)
  assert "normjax_rows_forward" in text


def test_other_cases_and_export_take_the_reference():
  """Under "pallas": batch norm, masks and float16 lower without a Pallas call (the
  reference, not the native kernels); an exported program holds no kernel call."""
  x = jnp.asarray(np.random.default_rng(14).standard_normal((4, 8, 16)), F32)
  for fn in (lambda x: nj.batch_norm(x, None, None, nj.init_batch_stats(16), train=True)[0],
             lambda x: nj.layer_norm(x, mask=x > 0),
             lambda x: nj.layer_norm(x.astype(jnp.float16))):
    text = _lowered(fn, "cuda", x)
    assert not _calls(text), _calls(text)
    assert "Normjax" not in _lowered(fn, "cpu", x)
  with nj.implementation("pallas"):
    exported = jax.export.export(jax.jit(nj.layer_norm), platforms=("cuda", "tpu"))(x)
  assert not _calls(exported.mlir_module())


# ----------------------------------------------------------------- per-example parameters

@pytest.mark.parametrize("examples,rows_each,n", [(3, 16, 7), (2, 32, 100)])
def test_per_example_parameters_match_float64(examples, rows_each, n):
  """Scale and bias per example and feature (adaLN's `[B, 1, D]`: runs of `example_rows`
  rows, a multiple of 16, so each block lies in one example), forward and backward (dscale
  and dbias summed over each example's blocks) against float64, at a 1e5 offset."""
  rng = np.random.default_rng(21)
  rows = examples * rows_each
  x = jnp.asarray(rng.standard_normal((rows, n)) + 1e5, F32)
  g = jnp.asarray(rng.standard_normal((rows, n)), F32)
  scale = jnp.asarray(rng.standard_normal(examples * n), F32)
  bias = jnp.asarray(rng.standard_normal(examples * n), F32)
  kw = dict(centered=True, per_row=False, example_rows=rows_each, **PALLAS)
  y, shift, offset, var = jax.jit(lambda *a: _rows.rows_forward_p.bind(*a, eps=1e-5, **kw))(
      x, scale, bias)
  rstd = jax.lax.rsqrt(var + 1e-5)
  dx, dscale, dbias = jax.jit(lambda *a: _rows.rows_backward_p.bind(*a, **kw))(
      x, g, shift, offset, rstd, scale)
  x64, g64 = _f64(x), _f64(g)
  s64 = np.repeat(_f64(scale).reshape(examples, n), rows_each, axis=0)
  b64 = np.repeat(_f64(bias).reshape(examples, n), rows_each, axis=0)
  mean = x64.mean(1, keepdims=True)
  rs = 1 / np.sqrt(((x64 - mean) ** 2).mean(1, keepdims=True) + 1e-5)
  xhat = (x64 - mean) * rs
  np.testing.assert_allclose(_f64(y), xhat * s64 + b64, rtol=1e-5, atol=1e-4)
  gs = g64 * s64
  dx64 = rs * (gs - gs.mean(1, keepdims=True) - xhat * (gs * xhat).mean(1, keepdims=True))
  per_example = lambda v: v.reshape(examples, rows_each, n).sum(1).reshape(-1)
  np.testing.assert_allclose(_f64(dx), dx64, rtol=1e-4, atol=1e-4 * np.abs(dx64).max())
  for got, want in ((dscale, per_example(g64 * xhat)), (dbias, per_example(g64))):
    np.testing.assert_allclose(_f64(got), want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


@pytest.mark.parametrize("platform", sorted(TARGETS))
def test_adaptive_norms_lower_to_the_kernels_where_examples_fill_blocks(platform):
  """`adaptive_layer_norm` with `[B, 1, D]` modulation under "pallas": the forward and
  backward are Pallas calls when each example's rows are a multiple of 16, the reference
  otherwise; the values equal the reference path's."""
  if platform not in pallas.PLATFORMS:
    pytest.skip(f"this jaxlib has no Pallas lowering for {platform}")
  rng = np.random.default_rng(22)
  f = lambda x, shift, scale: nj.adaptive_layer_norm(x, shift, scale)
  grad = jax.grad(lambda *a: jnp.sum(jnp.sin(f(*a))), argnums=(0, 1, 2))
  for tokens, kernels in ((32, True), (24, False)):
    x = jnp.asarray(rng.standard_normal((2, tokens, 128)) + 3.0, F32)
    mod = jnp.asarray(rng.standard_normal((2, 1, 128)) * 0.1, F32)
    text = _lowered(grad, platform, x, mod, mod)
    assert (_calls(text) == {TARGETS[platform]}) == kernels, (tokens, _calls(text))
  with nj.implementation("pallas"):
    got = [jax.jit(f)(x[:, :16], mod, mod), *jax.jit(grad)(x[:, :16], mod, mod)]
  with nj.implementation("reference"):
    want = [jax.jit(f)(x[:, :16], mod, mod), *jax.jit(grad)(x[:, :16], mod, mod)]
  for a, b in zip(got, want):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(jnp.abs(b).max()))


@pytest.mark.skipif(jax.device_count() < 4, reason="needs 4 devices (conftest's XLA_FLAGS)")
@pytest.mark.parametrize("platform", sorted(TARGETS))
def test_kernels_inside_shard_map_lower_for_a_device(platform):
  """Inside `jax.shard_map` (check_vma on) the kernels' outputs are typed as varying like `x`
  (Pallas refuses untyped outputs there) and a replicated scale is cast to varying: the
  forward and backward lower for the device. (On a CPU the dispatch takes the reference in
  `shard_map`: interpret mode does not trace under check_vma.)"""
  if platform not in pallas.PLATFORMS:
    pytest.skip(f"this jaxlib has no Pallas lowering for {platform}")
  from jax.sharding import Mesh, PartitionSpec as P
  mesh = Mesh(np.array(jax.devices()[:4]), ("d",))

  def f(x, s):
    y, shift, offset, var = pallas.forward(x, s, s, eps=1e-5, centered=True, per_row=False,
                                           platform=platform)
    dx, ds, _ = pallas.backward(x, y, shift, offset, jax.lax.rsqrt(var + 1e-5), s,
                                centered=True, per_row=False, platform=platform)
    return dx, jax.lax.psum(ds, "d")
  g = jax.jit(jax.shard_map(f, mesh=mesh, in_specs=(P("d"), P()), out_specs=(P("d"), P())))
  text = g.trace(jnp.ones((64, 128)), jnp.ones(128)).lower(
      lowering_platforms=(platform,)).as_text()
  assert text.count(TARGETS[platform]) >= 2
