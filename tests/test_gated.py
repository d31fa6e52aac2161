"""`gated_rms_norm` (normjax/_src/gated.py; Mamba-2's `RMSNormGated`) on every implementation,
against the float64 formula of tests/reference.py: the gate before and after the norm, grouped
mean squares, values on adversarial data, first and second derivatives in `x`, `z` and `scale`
(both modes), bfloat16, NaN/Inf confined to their group, empty and size-1 axes, jit/vmap, and
misuse."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import normjax as nj
from tests import reference as ref
from tests.helpers import rand, slow_except

SHAPE = (3, 5, 16)
# (norm_before_gate, group_size, with scale)
CONFIGS = [(before, group, scaled) for before in (False, True) for group in (None, 4)
           for scaled in (True, False)]
_FAST = ((False, 4, True), (True, None, True))


def _args(kind="normal", shape=SHAPE):
  x = rand(shape, seed=0).astype(np.float64)
  if kind == "outlier_first":
    x[..., 0] = 3e4
  elif kind == "offset":
    x = x + 1e5
  z = rand(shape, seed=1, spread=2.0)
  return x.astype(np.float32), z, rand(shape[-1:], seed=2, loc=1.0, spread=0.3)


def _fns(before, group, scaled, **kw):
  kw = dict(group_size=group, norm_before_gate=before, **kw)
  return ((lambda x, z, s: nj.gated_rms_norm(x, z, s if scaled else None, **kw)),
          (lambda x, z, s: ref.gated_rms_norm(x, z, s if scaled else None, **kw)))


@pytest.mark.parametrize("config", slow_except(CONFIGS, *_FAST))
@pytest.mark.parametrize("kind", slow_except(["normal", "outlier_first", "offset"],
                                              "outlier_first"))
def test_matches_float64(implementation, config, kind):
  fn, want = _fns(*config)
  x, z, s = _args(kind)
  y = jax.jit(fn)(x, z, s)
  assert y.shape == x.shape and y.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(y, np.float64), want(x, z, s), rtol=1e-5, atol=1e-5)


def test_definitions():
  """The two orders and the groups, as the API states them through the plain norm."""
  x, z, s = map(jnp.asarray, _args())
  silu = lambda z: z * jax.nn.sigmoid(z)
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-6, atol=2e-6)
  close(nj.gated_rms_norm(x, z, s), nj.rms_norm(x * silu(z), s))
  close(nj.gated_rms_norm(x, z, s, norm_before_gate=True), nj.rms_norm(x, s) * silu(z))
  grouped = nj.rms_norm((x * silu(z)).reshape(3, 5, 4, 4)).reshape(SHAPE) * s[None, None]
  close(nj.gated_rms_norm(x, z, s, group_size=4), grouped)
  close(nj.gated_rms_norm(x, z, s, group_size=16), nj.gated_rms_norm(x, z, s))


@pytest.mark.parametrize("config", slow_except(CONFIGS, (True, 4, True)))
def test_derivatives_against_float64(implementation, config):
  """First and second derivatives in x, z and scale, reverse and forward mode."""
  fn, want = _fns(*config)
  ref.assert_derivatives_match(fn, want, _args(), key=("gated", config))


def test_axis_other_than_last(implementation):
  x, z, s = _args()
  fn = lambda x, z, s: nj.gated_rms_norm(x, z, s[:5], axis=1, group_size=5)
  np.testing.assert_allclose(
      np.asarray(jax.jit(fn)(x, z, s), np.float64),
      ref.gated_rms_norm(x, z, s[:5], axis=1, group_size=5), rtol=1e-5, atol=1e-5)
  two_axes = lambda x, z: nj.gated_rms_norm(x, z, axis=(1, 2), norm_before_gate=True)
  np.testing.assert_allclose(
      np.asarray(jax.jit(two_axes)(x, z), np.float64),
      ref.gated_rms_norm(x, z, axis=(1, 2), norm_before_gate=True), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("before", [False, True])
def test_bfloat16(implementation, before):
  """bfloat16 x, z and scale: the gate and the product in float32, the output bfloat16 within
  a rounding of float64."""
  x, z, s = (jnp.asarray(a, jnp.bfloat16) for a in _args("outlier_first"))
  y = jax.jit(lambda x, z, s: nj.gated_rms_norm(x, z, s, group_size=4,
                                                norm_before_gate=before))(x, z, s)
  assert y.dtype == jnp.bfloat16
  f64 = lambda a: np.asarray(a.astype(jnp.float32), np.float64)
  want = ref.gated_rms_norm(f64(x), f64(z), f64(s), group_size=4, norm_before_gate=before)
  np.testing.assert_allclose(np.asarray(y.astype(jnp.float32)), want, rtol=1e-2, atol=2e-2)


@pytest.mark.parametrize("special", [np.nan, np.inf])
@pytest.mark.parametrize("before", [False, True])
def test_nan_and_inf_stay_in_their_group(implementation, special, before):
  x, z, s = _args()
  x[1, 2, 5] = special   # the second group of four
  y = np.asarray(jax.jit(lambda x, z, s: nj.gated_rms_norm(
      x, z, s, group_size=4, norm_before_gate=before))(x, z, s))
  bad = np.zeros(SHAPE, bool)
  bad[1, 2, 4:8] = True
  np.testing.assert_array_equal(np.isnan(y), bad)


@pytest.mark.parametrize("size", [0, 1])
def test_empty_and_size_one_axes(implementation, size):
  x, z, s = _args(shape=(3, 2, size))
  for config in [(False, None, True), (True, size or 1, True)]:
    fn, want = _fns(*config)
    y = jax.jit(fn)(x, z, s)
    assert y.shape == x.shape
    np.testing.assert_allclose(np.asarray(y, np.float64), want(x, z, s), rtol=1e-5, atol=1e-5)


def test_vmap_and_grad_under_jit():
  x, z, s = map(jnp.asarray, _args())
  fn = lambda x, z: nj.gated_rms_norm(x, z, s, group_size=4)
  np.testing.assert_allclose(jax.jit(jax.vmap(fn))(x, z), fn(x, z), rtol=1e-6, atol=1e-6)
  loss = lambda x, z: jnp.sum(jnp.sin(fn(x, z)))
  for g, w in zip(jax.jit(jax.vmap(jax.grad(loss, (0, 1))))(x, z), jax.grad(loss, (0, 1))(x, z)):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


_X = jnp.ones((2, 3, 8))


@pytest.mark.parametrize("call, error, message", [
    (lambda: nj.gated_rms_norm(_X, jnp.ones((2, 1, 8))), ValueError,
     r"z must have the shape of x, \(2, 3, 8\); got shape \(2, 1, 8\)"),
    (lambda: nj.gated_rms_norm(_X, jnp.ones((2, 3, 8), jnp.int32)), TypeError, "z"),
    (lambda: nj.gated_rms_norm(_X, _X, group_size=3), ValueError,
     r"group_size=3 must divide the one normalized axis"),
    (lambda: nj.gated_rms_norm(_X, _X, axis=(1, 2), group_size=4), ValueError, "group_size"),
    (lambda: nj.gated_rms_norm(_X, _X, group_size=0), ValueError, "group_size"),
    (lambda: nj.gated_rms_norm(_X, _X, group_size=2.0), TypeError, "group_size"),
    (lambda: nj.gated_rms_norm(_X, _X, norm_before_gate=1), TypeError, "norm_before_gate"),
    (lambda: nj.gated_rms_norm(_X, _X, jnp.ones(3)), ValueError, "scale must have shape"),
    (lambda: nj.gated_rms_norm(_X, _X, axis=()), ValueError, "axis must name"),
    (lambda: nj.gated_rms_norm(_X, _X, eps=float("nan")), ValueError, "eps"),
])
def test_misuse_raises_a_named_error(call, error, message):
  with pytest.raises(error, match=message):
    call()


@pytest.mark.parametrize("norm_before_gate", [False, True])
@pytest.mark.slow   # 2^24 values; CI runs it
def test_rows_of_2_24_values(norm_before_gate):
  """One row of 2^24 values (offset 3), both gate orders, against float64."""
  rng = np.random.default_rng(7)
  x = rng.standard_normal((1, 1 << 24), dtype=np.float32) + np.float32(3.0)
  z = rng.standard_normal((1, 1 << 24), dtype=np.float32)
  y = np.asarray(jax.jit(lambda x, z: nj.gated_rms_norm(x, z, norm_before_gate=norm_before_gate))(
      x, z), np.float64)
  want = ref.gated_rms_norm(x.astype(np.float64), z.astype(np.float64),
                            norm_before_gate=norm_before_gate)
  np.testing.assert_allclose(y, want, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("before", [False, True])
@pytest.mark.parametrize("scaled", [True, False])
@pytest.mark.parametrize("group", [None, 4])
def test_trains_through_the_gated_kernels(before, scaled, group):
  """Float32 on the native CPU kernels, the gate in either place, with and without groups: the
  forward and the reverse-mode program call the gated kernels (the gate computed inside them)
  and nothing else, the first and second derivatives (both modes) match float64 at a 1e5
  offset, the value under `vjp` is the forward's bit for bit, and the gradients are the
  reference path's."""
  from normjax._src.kernels import primitives
  if not primitives.has_kernel(jax.default_backend()):
    pytest.skip("no native kernels here")
  fn, want = _fns(before, group, scaled)
  args = _args("offset")
  ref.assert_derivatives_match(fn, want, args)
  x, z, s = map(jnp.asarray, args)
  ct = jnp.asarray(rand(SHAPE, seed=3))
  train = lambda x, z, s, ct: jax.vjp(fn, x, z, s)[1](ct)
  jaxpr = str(jax.make_jaxpr(lambda *a: (fn(*a[:3]), train(*a)))(x, z, s, ct))
  assert "normjax_rows_gated_forward" in jaxpr and "normjax_rows_gated_backward" in jaxpr
  assert "normjax_rows_forward" not in jaxpr and "normjax_rows_backward" not in jaxpr
  y, _ = jax.jit(lambda x, z, s: jax.vjp(fn, x, z, s))(x, z, s)
  np.testing.assert_array_equal(y, jax.jit(fn)(x, z, s))   # the forward's value, bit for bit
  with nj.implementation("reference"):
    want_grads = jax.jit(train)(x, z, s, ct)
  for g, w in zip(jax.jit(train)(x, z, s, ct), want_grads, strict=True):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5 * float(np.max(np.abs(w))))


@pytest.mark.parametrize("before", [False, True])
def test_bfloat16_value_rounds_once(implementation, before):
  """bfloat16: under differentiation the value is still the forward's (the product rounded to
  bfloat16 once, bit for bit), and the gradients in `x`, `z` and `scale` agree with float64
  within bfloat16's rounding."""
  x, z, s = (jnp.asarray(a, jnp.bfloat16) for a in _args())
  fn = lambda x, z, s: nj.gated_rms_norm(x, z, s, norm_before_gate=before)
  ct = jnp.asarray(rand(SHAPE, seed=3), jnp.bfloat16)
  y, vjp = jax.jit(lambda x, z, s: jax.vjp(fn, x, z, s))(x, z, s)
  np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(jax.jit(fn)(x, z, s),
                                                                      np.float32))
  grads = vjp(ct)
  f64 = lambda a: np.asarray(a.astype(jnp.float32), np.float64)
  with jax.enable_x64(True):
    want = jax.vjp(lambda x, z, s: ref.gated_rms_norm(x, z, s, norm_before_gate=before),
                   f64(x), f64(z), f64(s))[1](f64(ct))
  for g, w in zip(grads, want, strict=True):
    assert g.dtype == jnp.bfloat16
    np.testing.assert_allclose(f64(g), np.asarray(w), rtol=3e-2, atol=3e-2 * np.abs(w).max())
