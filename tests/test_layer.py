"""The residual-add norms `add_layer_norm` / `add_rms_norm` (normjax/_src/layer.py), on every path:
the reference (`x + residual`, then the dispatch's `standardize`) and the fused native kernel
(`rows_add_forward_p`, `NormjaxRowsAddForward*`): outputs against float64 NumPy, `h` exactly
the rounded sum, derivatives equal to those of `layer_norm(x + residual)`, the kernel called
with `h` written once, `jax.export`, and bad input."""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import normjax as nj
from normjax._src.kernels import primitives
from tests import reference as ref
from tests.helpers import rand, slow_except, tolerance

F32 = jnp.float32


# name -> (fused function of (x, r, s, b), unfused normjax function of (h, s, b),
#          float64 reference of (h, s, b))
VARIANTS = {
    "layer": (lambda x, r, s, b: nj.add_layer_norm(x, r, s, b),
              lambda h, s, b: nj.layer_norm(h, s, b),
              lambda h, s, b: ref.layer_norm(h, s, b)),
    "layer_2axes": (lambda x, r, s, b: nj.add_layer_norm(x, r, s.reshape(8, 16),
                                                         b.reshape(8, 16), axis=(-2, -1)),
                    lambda h, s, b: nj.layer_norm(h, s.reshape(8, 16), b.reshape(8, 16),
                                                  axis=(-2, -1)),
                    lambda h, s, b: ref.layer_norm(h, s.reshape(8, 16), b.reshape(8, 16),
                                                   axis=(-2, -1))),
    "layer_no_affine": (lambda x, r, s, b: nj.add_layer_norm(x, r, eps=1e-3),
                        lambda h, s, b: nj.layer_norm(h, eps=1e-3),
                        lambda h, s, b: ref.layer_norm(h, eps=1e-3)),
    "rms": (lambda x, r, s, b: nj.add_rms_norm(x, r, s),
            lambda h, s, b: nj.rms_norm(h, s),
            lambda h, s, b: ref.rms_norm(h, s)),
}
SHAPE = (3, 5, 8, 16)   # rows of 16 (and of 128 for the 2-axis layer norm)


def _inputs(dtype, kind="normal", shape=SHAPE):
  x = rand(shape, seed=0)
  r = rand(shape, seed=1, spread=3.0)
  if kind == "offset":   # a large common offset: the sum is ill-conditioned for E[h^2]-E[h]^2
    x, r = x + 3e4, r + 7e4
  s = rand((128,), seed=2, loc=1.0, spread=0.3)[:shape[-1] * shape[-2]]
  b = rand((128,), seed=3)[:shape[-1] * shape[-2]]
  s16, b16 = s[:16], b[:16]
  return jnp.asarray(x, dtype), jnp.asarray(r, dtype), s, b, s16, b16


def _params(name, s, b, s16, b16):
  return (s, b) if name == "layer_2axes" else (s16, b16)


def _rounded_sum(x, r):
  """x + r as the dtype rounds it: the float32 sum rounded to x.dtype (NumPy, not normjax)."""
  total = np.asarray(x, np.float32) + np.asarray(r, np.float32)
  return np.asarray(jnp.asarray(total, x.dtype))


@pytest.mark.parametrize("name", sorted(VARIANTS))
@pytest.mark.parametrize("dtype", slow_except([jnp.float32, jnp.bfloat16], jnp.bfloat16))
@pytest.mark.parametrize("kind", slow_except(["normal", "offset"], "offset"))
@pytest.mark.parametrize("use_jit", slow_except([False, True], True))
def test_against_float64(implementation, name, dtype, kind, use_jit):
  fused, _, want = VARIANTS[name]
  x, r, s, b, s16, b16 = _inputs(dtype, kind)
  s, b = _params(name, s, b, s16, b16)
  fn = jax.jit(fused) if use_jit else fused
  y, h = fn(x, r, s, b)
  assert y.dtype == h.dtype == x.dtype and y.shape == h.shape == x.shape
  h_want = _rounded_sum(x, r)
  np.testing.assert_array_equal(np.asarray(h), h_want)
  rtol, atol = tolerance(dtype)
  np.testing.assert_allclose(np.asarray(y, np.float64),
                             want(np.asarray(h_want, np.float64), s, b), rtol=rtol, atol=atol)


@pytest.mark.parametrize("name", sorted(VARIANTS))
@pytest.mark.parametrize("dtype", slow_except([jnp.float32, jnp.bfloat16], jnp.bfloat16))
def test_same_as_unfused(implementation, name, dtype):
  """Bit for bit the unfused `norm(x + residual)` on the same path: the kernel normalizes the
  rounded sum, as the unfused program does."""
  fused, unfused, _ = VARIANTS[name]
  x, r, s, b, s16, b16 = _inputs(dtype)
  s, b = _params(name, s, b, s16, b16)
  y, h = jax.jit(fused)(x, r, s, b)
  np.testing.assert_array_equal(np.asarray(y, np.float32),
                                np.asarray(jax.jit(unfused)(x + r, s, b), np.float32))


def _loss(fn):
  """A scalar using both outputs (the next block reads h, the sublayer reads y)."""
  def loss(x, r, s, b):
    y, h = fn(x, r, s, b)
    return jnp.sum(jnp.sin(y.astype(F32)) * jnp.cos(h.astype(F32)))
  return loss


@pytest.mark.parametrize("name", slow_except(sorted(VARIANTS), "layer_2axes"))
@pytest.mark.parametrize("dtype", slow_except([jnp.float32, jnp.bfloat16], jnp.bfloat16))
def test_gradients_are_those_of_the_unfused_form(implementation, name, dtype):
  """Gradients w.r.t. x, residual, scale and bias equal those of `norm(x + residual)`, and
  agree with a float64 reference (the float64 run of the unfused form, through the
  reference path's autodiff of the plain formula)."""
  fused, unfused, _ = VARIANTS[name]
  x, r, s, b, s16, b16 = _inputs(dtype)
  s, b = map(jnp.asarray, _params(name, s, b, s16, b16))
  got = jax.jit(jax.grad(_loss(fused), argnums=(0, 1, 2, 3)))(x, r, s, b)
  unfused_pair = lambda x, r, s, b: (unfused(x + r, s, b), x + r)
  want = jax.jit(jax.grad(_loss(unfused_pair), argnums=(0, 1, 2, 3)))(x, r, s, b)
  for g, w in zip(got, want):
    assert g.dtype == w.dtype and g.shape == w.shape
    g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
    if dtype == jnp.float32:
      np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
    else:   # bfloat16 cotangents, summed over 120 rows for scale and bias
      np.testing.assert_allclose(g, w, rtol=2e-2, atol=5e-2 * np.abs(w).max())
  # dx == dresidual: y and h depend on the sum only.
  np.testing.assert_array_equal(np.asarray(got[0], np.float32), np.asarray(got[1], np.float32))


def test_gradients_against_float64_formula(implementation):
  """Independent of normjax's derivative: layer norm written out in float64 jax.numpy."""
  x, r, s, b, s16, b16 = _inputs(jnp.float32)

  def plain(x, r, s, b):
    h = x + r
    mean = h.mean(-1, keepdims=True)
    var = ((h - mean) ** 2).mean(-1, keepdims=True)
    return (h - mean) / jnp.sqrt(var + 1e-5) * s[None, None, None] + b[None, None, None], h
  got = jax.grad(_loss(nj.add_layer_norm), argnums=(0, 1, 2, 3))(x, r, s16, b16)
  with jax.enable_x64(True):
    f64 = lambda a: jnp.asarray(np.asarray(a, np.float64))
    want = jax.grad(_loss(plain), argnums=(0, 1, 2, 3))(f64(x), f64(r), f64(s16), f64(b16))
    want = [np.asarray(w) for w in want]
  for g, w in zip(got, want):
    np.testing.assert_allclose(np.asarray(g, np.float64), w, rtol=1e-4, atol=1e-4)


def test_forward_mode_and_second_order(implementation):
  x, r, s, b, s16, b16 = _inputs(jnp.float32)
  dx, dr = rand(SHAPE, seed=5), rand(SHAPE, seed=6)
  (y, h), (dy, dh) = jax.jvp(lambda x, r: nj.add_layer_norm(x, r, s16, b16), (x, r), (dx, dr))
  y2, dy2 = jax.jvp(lambda h: nj.layer_norm(h, s16, b16), (x + r,), (dx + dr,))
  np.testing.assert_allclose(dy, dy2, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dh, dx + dr, rtol=1e-6, atol=1e-6)
  hvp = lambda f: jax.jvp(jax.grad(_loss(f)), (x, r, s16, b16), (dx, dr, s16, b16))[1]
  unfused = lambda x, r, s, b: (nj.layer_norm(x + r, s, b), x + r)
  np.testing.assert_allclose(hvp(nj.add_layer_norm), hvp(unfused), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("batch", slow_except([0, 3], 3))
def test_vmap(implementation, batch):
  x = jnp.asarray(rand((batch, 4, 16), seed=0))
  r = jnp.asarray(rand((batch, 4, 16), seed=1))
  s = jnp.asarray(rand((16,), seed=2, loc=1.0))
  y, h = jax.jit(jax.vmap(lambda x, r: nj.add_layer_norm(x, r, s)))(x, r)
  assert y.shape == h.shape == x.shape
  if batch:
    np.testing.assert_allclose(y, ref.layer_norm(np.asarray(h, np.float64), s), rtol=2e-5,
                               atol=2e-5)
    np.testing.assert_array_equal(h, _rounded_sum(x, r))
  # Only x batched (the residual shared), and a batched scale (the vmap fallback).
  y1, _ = jax.vmap(lambda x: nj.add_rms_norm(x, r[0] if batch else x, s))(x)
  if batch:
    np.testing.assert_allclose(y1, ref.rms_norm(np.asarray(x + r[:1], np.float64), s),
                               rtol=2e-5, atol=2e-5)
  ss = jnp.stack([s] * batch) if batch else jnp.zeros((0, 16))
  y2, _ = jax.vmap(lambda x, r, s: nj.add_layer_norm(x, r, s))(x, r, ss)
  if batch:
    np.testing.assert_allclose(y2, y, rtol=1e-6, atol=1e-6)


def _entry_opcodes(text):
  entry = text.split("ENTRY", 1)[1]
  return {m.group(1) for m in re.finditer(r"=\s*\S+(?:\[[^\]]*\])?(?:\{[^}]*\})?\s+"
                                          r"([a-z-]+)\(", entry)}


@pytest.mark.skipif(not primitives.has_kernel("cpu"), reason="native kernel not built")
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_kernel_called_and_h_written_once(dtype):
  x, r, s, b, s16, b16 = _inputs(dtype)
  suffix = "F32" if dtype == jnp.float32 else "BF16"
  text = jax.jit(nj.add_layer_norm).lower(x, r, s16, b16).compile().as_text()
  assert f"NormjaxRowsAddForward{suffix}" in text
  # The whole program is the one kernel call: no add (or fusion) writes h before it.
  ops = _entry_opcodes(text)
  assert ops <= {"parameter", "bitcast", "custom-call", "get-tuple-element", "tuple",
                 "broadcast", "constant", "convert"}, ops
  # The check can fail: the unfused form writes the sum in a fusion of its own.
  unfused = lambda x, r, s, b: (nj.layer_norm(x + r, s, b), x + r)
  assert "fusion" in _entry_opcodes(jax.jit(unfused).lower(x, r, s16, b16).compile().as_text())
  grad = jax.jit(jax.grad(_loss(nj.add_layer_norm), argnums=(0, 1, 2, 3)))
  text = grad.lower(x, r, s16, b16).compile().as_text()
  # The loss uses y and h: one backward kernel takes both cotangents.
  assert f"NormjaxRowsAddForward{suffix}" in text and f"NormjaxRowsAddBackward{suffix}" in text


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_backward_keeps_only_h_and_statistics(implementation, dtype):
  """Reverse mode keeps the sum h (which the caller keeps anyway), not x, residual or a
  normalized copy (as tests/test_numerics_standardize.py checks for the plain norms)."""
  x, r, s, b, s16, b16 = _inputs(dtype, shape=(4, 16, 32))
  s, b = jnp.asarray(rand((32,), seed=2)), jnp.asarray(rand((32,), seed=3))
  leaves = jax.eval_shape(
      lambda *a: jax.tree.leaves(jax.vjp(nj.add_layer_norm, *a)[1]), x, r, s, b)
  full = [l for l in leaves if math.prod(l.shape) == x.size]
  assert len(full) == 1 and full[0].dtype == x.dtype, leaves


def test_export_without_native_calls():
  x, r, s, b, s16, b16 = _inputs(jnp.float32)
  fn = jax.jit(lambda x, r: nj.add_layer_norm(x, r, s16, b16))
  grad = jax.jit(jax.grad(lambda x, r: _loss(nj.add_layer_norm)(x, r, s16, b16), (0, 1)))
  for f, want in ((fn, fn(x, r)), (grad, grad(x, r))):
    exported = jax.export.export(f)(x, r)
    assert "custom_call" not in exported.mlir_module()
    restored = jax.export.deserialize(exported.serialize())
    for got, w in zip(restored.call(x, r), want):
      np.testing.assert_allclose(got, w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fn", [nj.add_layer_norm, nj.add_rms_norm])
def test_bad_residual(fn):
  x = jnp.ones((2, 8))
  with pytest.raises(ValueError, match=r"residual must have the shape of x, \(2, 8\); got "
                                       r"shape \(1, 8\)"):
    fn(x, jnp.ones((1, 8)))
  with pytest.raises(TypeError, match="residual must have the dtype of x, float32; got dtype "
                                      "bfloat16"):
    fn(x, jnp.ones((2, 8), jnp.bfloat16))
  with pytest.raises(TypeError, match="residual must have a floating dtype"):
    fn(x, jnp.ones((2, 8), jnp.int32))
  with pytest.raises(ValueError, match="scale must have shape"):
    fn(x, x, jnp.ones(3))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_flax_modules(dtype):
  """linen/nnx AddLayerNorm/AddRMSNorm: the variables of LayerNorm/RMSNorm, and the output of
  those modules on the sum (their fallback for feature axes outside the reduction too)."""
  from flax import nnx
  import normjax.linen as njnn
  import normjax.nnx as njnnx
  x, r, *_ = _inputs(dtype, shape=(2, 5, 16))
  tol = dict(rtol=1e-6, atol=1e-6) if dtype == jnp.float32 else dict(rtol=1e-2, atol=1e-2)
  for add, plain, kw in ((njnn.AddLayerNorm, njnn.LayerNorm, {}),
                         (njnn.AddRMSNorm, njnn.RMSNorm, {}),
                         (njnn.AddLayerNorm, njnn.LayerNorm, dict(dtype=dtype)),
                         (njnn.AddLayerNorm, njnn.LayerNorm,
                          dict(reduction_axes=(1, 2), feature_axes=-1))):
    variables = plain(**kw).init(jax.random.key(0), x)
    y, h = jax.jit(add(**kw).apply)(variables, x, r)
    assert jax.tree.structure(add(**kw).init(jax.random.key(0), x, r)) == jax.tree.structure(
        variables)
    want = plain(**kw).apply(variables, (x + r).astype(h.dtype))
    assert y.dtype == want.dtype
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(want, np.float32), **tol)
    # h in the computation dtype (float32 for bfloat16 x with float32 params, as flax's rule)
    h_want = np.asarray(x, np.float32) + np.asarray(r, np.float32)
    np.testing.assert_array_equal(np.asarray(h, np.float32),
                                  np.asarray(jnp.asarray(h_want, h.dtype), np.float32))
  for add, plain in ((njnnx.AddLayerNorm, njnnx.LayerNorm), (njnnx.AddRMSNorm, njnnx.RMSNorm)):
    y, h = add(16, rngs=nnx.Rngs(0))(x, r)
    want = plain(16, rngs=nnx.Rngs(0))((x + r).astype(h.dtype))
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(want, np.float32), **tol)
  with pytest.raises(ValueError, match="residual must have the shape of x"):
    njnn.AddLayerNorm().init(jax.random.key(0), x, r[:1])
  with pytest.raises(TypeError, match="residual must have the dtype of x"):
    njnnx.AddRMSNorm(16, rngs=nnx.Rngs(0))(x, r.astype(jnp.float16))


def test_core_add_standardize_reference_definition():
  """The numerics' `add_standardize` without a kernel's `add_forward` (its jax.numpy definition):
  float64 values and the unfused form's gradients."""
  from normjax._src.numerics import standardize as _standardize  # pylint: disable=import-outside-toplevel
  x, r, s, b, s16, b16 = _inputs(jnp.float32)
  fn = lambda x, r, s, b: _standardize.add_standardize(x, r, (3,), s.reshape(1, 1, 1, 16),
                                                 b.reshape(1, 1, 1, 16), 1e-5)
  y, h = jax.jit(fn)(x, r, s16, b16)
  np.testing.assert_array_equal(h, _rounded_sum(x, r))
  np.testing.assert_allclose(y, ref.layer_norm(np.asarray(h, np.float64), s16, b16),
                             rtol=2e-5, atol=2e-5)
  unfused = lambda x, r, s, b: (nj.layer_norm(x + r, s, b), x + r)
  got = jax.grad(_loss(fn), argnums=(0, 1, 2, 3))(x, r, s16, b16)
  want = jax.grad(_loss(unfused), argnums=(0, 1, 2, 3))(x, r, s16, b16)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


# ------------------------------------------------ scale_offset and residual_dtype (issue 28)

# name -> (normjax function of (x, w, b, **kw) returning y, float64 reference of (x, w, b) for
# the scale 1 + w, traceable by jax under x64 for the derivatives)
OFFSET_VARIANTS = {
    "layer": (lambda x, w, b, **kw: nj.layer_norm(x, w, b, **kw),
              lambda x, w, b: ref.adaptive_layer_norm(x, b.reshape(1, 1, -1),
                                                      w.reshape(1, 1, -1), eps=1e-5)),
    "rms": (lambda x, w, b, **kw: nj.rms_norm(x, w, **kw),
            lambda x, w, b: ref.adaptive_rms_norm(x, w.reshape(1, 1, -1))),
    "add_layer": (lambda x, w, b, **kw: nj.add_layer_norm(x, x, w, b, **kw)[0],
                  lambda x, w, b: ref.adaptive_layer_norm(2 * x, b.reshape(1, 1, -1),
                                                          w.reshape(1, 1, -1), eps=1e-5)),
    "add_rms": (lambda x, w, b, **kw: nj.add_rms_norm(x, x, w, **kw)[0],
                lambda x, w, b: ref.adaptive_rms_norm(2 * x, w.reshape(1, 1, -1))),
}


def _offset_inputs(loc=0.0):
  return rand((4, 6, 16), 0, loc=loc), rand((16,), 1, spread=0.1), rand((16,), 2)


@pytest.mark.parametrize("name", slow_except(sorted(OFFSET_VARIANTS), "layer", "add_rms"))
@pytest.mark.parametrize("loc", slow_except([0.0, 1e5], 1e5))
def test_scale_offset_against_float64(implementation, name, loc):
  """`scale_offset=1.0`: the scale is `1 + w` (Gemma's zero-centered scale), on every path."""
  fn, want = OFFSET_VARIANTS[name]
  x, w, b = _offset_inputs(loc)
  y = jax.jit(lambda x, w, b: fn(x, w, b, scale_offset=1.0))(x, w, b)
  assert y.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(y, np.float64), want(x, w, b), rtol=1e-5, atol=1e-5)
  # Another offset: y = xhat * (offset + w) + b; and 0.0 is the plain norm, bit for bit.
  y2 = jax.jit(lambda x, w, b: fn(x, w, b, scale_offset=-2.5))(x, w, b)
  np.testing.assert_allclose(np.asarray(y2, np.float64), want(x, w - 3.5, b), rtol=1e-5,
                             atol=1e-5)
  np.testing.assert_array_equal(fn(x, w, b, scale_offset=0.0), fn(x, w, b))


@pytest.mark.parametrize("name", slow_except(sorted(OFFSET_VARIANTS), "rms"))
def test_scale_offset_derivatives(implementation, name):
  """First and second derivatives in x and w (and b), reverse and forward mode."""
  fn, want = OFFSET_VARIANTS[name]
  ref.assert_derivatives_match(lambda x, w, b: fn(x, w, b, scale_offset=1.0), want,
                               _offset_inputs(), key=("scale_offset", name))


@pytest.mark.parametrize("name", slow_except(sorted(OFFSET_VARIANTS), "rms", "add_layer"))
def test_scale_offset_is_formed_in_float32(implementation, name):
  """A bfloat16 w of 1e-3 scales by 1.001 (a bfloat16 1 + w is 1.0): with float32 x to 1e-6;
  with bfloat16 x the output is bfloat16, as float64's on the rounded input within a rounding,
  and as the float32 scale `1 + w` gives within a bfloat16 ulp."""
  fn, want = OFFSET_VARIANTS[name]
  x, _, b = _offset_inputs()
  w = jnp.full((16,), 1e-3, jnp.bfloat16)
  assert float((1 + w)[0]) == 1.0   # the rounding the offset avoids
  w64 = np.asarray(w.astype(jnp.float32), np.float64)
  b16 = jnp.asarray(b, jnp.bfloat16)
  b64 = np.asarray(b16.astype(jnp.float32), np.float64)
  # Eager too: under jit XLA:CPU may fuse a bfloat16 `1 + w` into the float32 use and keep w.
  for y in (jax.jit(lambda x, w, b: fn(x, w, b, scale_offset=1.0))(x, w, b16),
            fn(x, w, b16, scale_offset=1.0)):
    assert y.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(y, np.float64), want(x, w64, b64), rtol=1e-6,
                               atol=1e-6)
  assert np.abs(want(x, w64, b64) - want(x, 0 * w64, b64)).max() > 1e-3   # the check can tell
  xb = jnp.asarray(x, jnp.bfloat16)
  yb = jax.jit(lambda x, w, b: fn(x, w, b, scale_offset=1.0))(xb, w, b16)
  assert yb.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(yb, np.float32), np.asarray(   # within a bf16 ulp
      fn(xb, 1 + w.astype(F32), b16), np.float32), rtol=2.0 ** -7, atol=1e-6)
  x64 = np.asarray(xb.astype(F32), np.float64)
  np.testing.assert_allclose(np.asarray(yb, np.float64), want(x64, w64, b64), rtol=1e-2,
                             atol=2e-2)


@pytest.mark.parametrize("name", ["add_layer", "add_rms"])
@pytest.mark.parametrize("residual", slow_except(["float32", "bfloat16"], "float32"))
def test_residual_dtype(implementation, name, residual):
  """bfloat16 x, a float32 (or bfloat16) residual, residual_dtype=float32: h is the float32
  sum, formed, kept and returned in float32; y is bfloat16, the norm of that h within a
  rounding; residual_dtype=bfloat16 is the default."""
  fn = nj.add_layer_norm if name == "add_layer" else nj.add_rms_norm
  norm = ref.layer_norm if name == "add_layer" else ref.rms_norm
  x = jnp.asarray(rand((4, 6, 16), 0), jnp.bfloat16)
  r = jnp.asarray(rand((4, 6, 16), 1, loc=100.0, spread=3.0), residual)
  w = jnp.asarray(rand((16,), 2, loc=1.0, spread=0.1))
  y, h = jax.jit(lambda x, r: fn(x, r, w, residual_dtype=jnp.float32))(x, r)
  assert y.dtype == jnp.bfloat16 and h.dtype == jnp.float32
  h_want = np.asarray(x, np.float32) + np.asarray(r, np.float32)
  np.testing.assert_array_equal(np.asarray(h), h_want)
  # the float32 sum keeps what bfloat16 rounds away (x is ~1 against a residual of ~100)
  assert np.abs(h_want - np.asarray(jnp.asarray(h_want, jnp.bfloat16), np.float32)).max() > 0.1
  np.testing.assert_allclose(np.asarray(y, np.float64), norm(h_want.astype(np.float64), w),
                             rtol=1e-2, atol=2e-2)
  np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(
      fn(h, jnp.zeros_like(h), w)[0].astype(jnp.bfloat16), np.float32))
  if residual == "bfloat16":
    for got, same in zip(fn(x, r, w, residual_dtype=jnp.bfloat16), fn(x, r, w)):
      assert got.dtype == same.dtype == jnp.bfloat16
      np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(same, np.float32))


@pytest.mark.parametrize("name", ["add_layer", "add_rms"])
def test_residual_dtype_fuses_the_add_in_one_kernel(name):
  """Native kernels, bfloat16 x and a float32 residual: the add and the norm are one kernel
  (the mixed residual-add forward), whose y and h are bit for bit those of the float32 sum's
  norm rounded to bfloat16 (the unfused program), on rows with an outlier first, a 1e5 offset,
  a NaN and scalar tails; the backward too is one kernel (bfloat16 cotangent of y read, both
  cotangents of x and r written), with the unfused program's gradients bit for bit."""
  from normjax._src.kernels import primitives
  if not primitives.has_kernel(jax.default_backend()):
    pytest.skip("no native kernels here")
  fn = nj.add_layer_norm if name == "add_layer" else nj.add_rms_norm
  norm = nj.layer_norm if name == "add_layer" else nj.rms_norm
  x = rand((5, 3, 67), 0).astype(np.float32)
  x[0, 0, 0] = 3e4
  x[1] += 1e5
  x[2, 1, 5] = np.nan
  x = jnp.asarray(x, jnp.bfloat16)
  r = jnp.asarray(rand((5, 3, 67), 1, loc=100.0, spread=3.0))
  w = jnp.asarray(rand((67,), 2, loc=1.0, spread=0.1))
  fused = lambda x, r: fn(x, r, w, residual_dtype=F32)
  def unfused(x, r):   # h computed once (two sums would round x's cotangent twice)
    h = x.astype(F32) + r
    return norm(h, w).astype(jnp.bfloat16), h
  assert "normjax_rows_add_forward_mixed" in str(jax.make_jaxpr(fused)(x, r))
  for got, want in zip(jax.jit(fused)(x, r), jax.jit(unfused)(x, r), strict=True):
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
  cts = (jnp.asarray(rand((5, 3, 67), 3), jnp.bfloat16), jnp.asarray(rand((5, 3, 67), 4)))
  keep = jnp.asarray(np.arange(5) != 2)[:, None, None]   # the NaN example's gradients are NaN
  train = lambda f: jax.jit(lambda x, r: jax.vjp(f, jnp.where(keep, x, 0).astype(x.dtype),
                                                 r)[1](cts))
  hlo = train(fused).lower(x, r).compile().as_text()
  assert "NormjaxRowsAddBackwardMixed" in hlo and "NormjaxRowsBackward" not in hlo
  for got, want in zip(train(fused)(x, r), train(unfused)(x, r), strict=True):
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


def test_residual_dtype_derivatives():
  """(On the default path: the native kernel where built.) Gradients in x (bfloat16) and the float32 residual: those of the float32 norm of the float32
  sum, each in its argument's dtype; second order by forward over reverse."""
  x = jnp.asarray(rand((4, 6, 16), 0), jnp.bfloat16)
  r = jnp.asarray(rand((4, 6, 16), 1))
  w = jnp.asarray(rand((16,), 2, loc=1.0))
  loss = lambda x, r: _loss(lambda x, r, s, b: nj.add_rms_norm(x, r, s, residual_dtype=F32))(
      x, r, w, None)
  plain = lambda x, r: _loss(lambda x, r, s, b: (nj.rms_norm(x.astype(F32) + r, s).astype(
      jnp.bfloat16), x.astype(F32) + r))(x, r, w, None)
  got = jax.jit(jax.grad(loss, (0, 1)))(x, r)
  want = jax.jit(jax.grad(plain, (0, 1)))(x, r)
  assert got[0].dtype == jnp.bfloat16 and got[1].dtype == F32
  for g, v in zip(got, want):
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(v, np.float32), rtol=1e-2,
                               atol=1e-2)
  dr = jnp.asarray(rand((4, 6, 16), 3))
  hvp = lambda f: jax.jvp(lambda r: jax.grad(f, 1)(x, r), (r,), (dr,))[1]
  np.testing.assert_allclose(hvp(loss), hvp(plain), rtol=1e-3, atol=1e-3)


_XO = jnp.ones((2, 8))


@pytest.mark.parametrize("call, error, message", [
    (lambda: nj.layer_norm(_XO, scale_offset=1.0), ValueError,
     r"scale_offset=1.0 needs a scale to offset .*got scale=None"),
    (lambda: nj.rms_norm(_XO, scale_offset=1.0), ValueError, "scale_offset=1.0 needs a scale"),
    (lambda: nj.add_rms_norm(_XO, _XO, scale_offset=1.0), ValueError, "scale_offset"),
    (lambda: nj.add_layer_norm(_XO, _XO, None, jnp.ones(8), scale_offset=1.0), ValueError,
     "scale_offset"),
    (lambda: nj.rms_norm(_XO, jnp.ones(8), scale_offset=float("nan")), TypeError,
     "scale_offset must be a finite Python number"),
    (lambda: nj.rms_norm(_XO, jnp.ones(8), scale_offset="1"), TypeError, "scale_offset"),
    (lambda: jax.jit(lambda o: nj.rms_norm(_XO, jnp.ones(8), scale_offset=o))(1.0), TypeError,
     "scale_offset"),
    (lambda: nj.add_layer_norm(_XO, _XO, residual_dtype=jnp.int32), TypeError,
     "residual_dtype must be None or a floating dtype.*got residual_dtype=int32"),
    (lambda: nj.add_rms_norm(_XO, _XO, residual_dtype=jnp.bool_), TypeError, "residual_dtype"),
    (lambda: nj.add_rms_norm(_XO.astype(jnp.bfloat16), _XO.astype(jnp.float16),
                             residual_dtype=F32), TypeError,
     "residual must have the dtype of x or residual_dtype, bfloat16 or float32; got dtype "
     "float16"),
    (lambda: nj.add_layer_norm(_XO, _XO.astype(jnp.bfloat16)), TypeError,
     "residual must have the dtype of x, float32; got dtype bfloat16"),
])
def test_scale_offset_and_residual_dtype_misuse(call, error, message):
  with pytest.raises(error, match=message):
    call()
