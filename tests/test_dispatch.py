"""One suite over every implementation the dispatch can pick (`nj.implementation`: the
reference in `normjax/_src/numerics`, the native CPU kernels, and any later kernel): each
variant and layout against the float64 NumPy reference on adversarial data (a huge first element, large
offsets, long rows, overflow, NaN/Inf, empty and size-1 axes, vmap over empty batches, eps of
every real type). The `implementation` fixture (tests/conftest.py) pins the dispatch; a new
kernel joins by adding its name there."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import normjax as nj
from tests import reference as ref
from tests.helpers import rand, slow_except


def _bn(channel_axis):
  def fn(x, eps=1e-5):
    c = x.shape[channel_axis]
    return nj.batch_norm(x, None, None, nj.init_batch_stats(c), train=True,
                         channel_axis=channel_axis, eps=eps)[0]

  def want(x, eps=1e-5):
    c = x.shape[channel_axis]
    return ref.batch_norm(x, None, None, np.zeros(c), np.ones(c), train=True,
                          channel_axis=channel_axis, eps=eps)[0]
  return fn, want


# name -> (normjax function of (x, eps), float64 reference of (x, eps)); x is 4-D, NHWC or
# NCHW as the name says (the kernels see rows, columns and channels-first rows).
VARIANTS = {
    "layer": (lambda x, eps=1e-5: nj.layer_norm(x, eps=eps),
              lambda x, eps=1e-5: ref.layer_norm(x, eps=eps)),
    "layer_2axes": (lambda x, eps=1e-5: nj.layer_norm(x, axis=(-2, -1), eps=eps),
                    lambda x, eps=1e-5: ref.layer_norm(x, axis=(-2, -1), eps=eps)),
    "rms": (lambda x, eps=1e-5: nj.rms_norm(x, eps=eps),
            lambda x, eps=1e-5: ref.rms_norm(x, eps=eps)),
    "instance_nhwc": (lambda x, eps=1e-5: nj.instance_norm(x, eps=eps),
                      lambda x, eps=1e-5: ref.instance_norm(x, eps=eps)),
    "instance_nchw": (lambda x, eps=1e-5: nj.instance_norm(x, channel_axis=1, eps=eps),
                      lambda x, eps=1e-5: ref.instance_norm(x, channel_axis=1, eps=eps)),
    "group_nhwc": (lambda x, eps=1e-5: nj.group_norm(x, num_groups=2, eps=eps),
                   lambda x, eps=1e-5: ref.group_norm(x, num_groups=2, eps=eps)),
    "group_nchw": (lambda x, eps=1e-5: nj.group_norm(x, num_groups=2, channel_axis=1, eps=eps),
                   lambda x, eps=1e-5: ref.group_norm(x, num_groups=2, channel_axis=1,
                                                      eps=eps)),
    "batch_nhwc": _bn(-1),
    "batch_nchw": _bn(1),
}

# The variants the default run keeps where a test covers them all (CI runs every one): the
# rows kernel, RMS, the column moments (NHWC) and the row moments (NCHW).
_REPRESENTATIVE = ("layer", "rms", "group_nhwc", "batch_nchw")


def _data(kind, shape=(4, 8, 16, 8), seed=0):
  x = rand(shape, seed=seed).astype(np.float64)
  if kind == "outlier_first":
    # The first element of every statistic's reduction (rows, channels, groups, batch).
    x[:, 0, 0, :] = 1e4
    x[..., 0] = 3e4
  elif kind == "offset":
    x = x + 1e5
  elif kind == "mixed_scales":
    x = x * np.logspace(-3, 3, shape[-1])
  return x.astype(np.float32)


@pytest.mark.parametrize("kind", slow_except(["normal", "outlier_first", "offset", "mixed_scales"],
                                              "outlier_first"))
@pytest.mark.parametrize("name", slow_except(sorted(VARIANTS), *_REPRESENTATIVE))
def test_matches_float64(implementation, name, kind):
  fn, want = VARIANTS[name]
  x = _data(kind)
  y = np.asarray(jax.jit(fn)(jnp.asarray(x)), np.float64)
  expected = want(x)
  np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", slow_except(sorted(VARIANTS), *_REPRESENTATIVE))
def test_bfloat16_matches_float64(implementation, name):
  fn, want = VARIANTS[name]
  x = jnp.asarray(_data("outlier_first"), jnp.bfloat16)
  y = np.asarray(jax.jit(fn)(x).astype(jnp.float32), np.float64)
  np.testing.assert_allclose(y, want(np.asarray(x.astype(jnp.float32))), rtol=1e-2, atol=2e-2)


@pytest.mark.parametrize("name", slow_except(sorted(VARIANTS), *_REPRESENTATIVE))
def test_overflow_nan_and_inf_give_nan_statistics(implementation, name):
  """A statistic that overflows float32, or sees a NaN or an Inf, gives NaN wherever it is
  used (every path alike; flax's behaviour), and nothing else is touched."""
  fn, want = VARIANTS[name]
  y = np.asarray(jax.jit(fn)(jnp.asarray(_data("normal") * np.float32(1e20))))
  assert np.isnan(y).all()
  for special in (np.nan, np.inf, -np.inf):
    x = _data("normal")
    x[1, 2, 3, 4] = special
    y = np.asarray(jax.jit(fn)(jnp.asarray(x)), np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):   # NaN and Inf in, NaN out: expected
      expected = want(x)
    if name == "rms" and np.isinf(special):
      expected[1, 2, 3, :] = np.nan   # float64 gives x / inf = 0 beside it; an Inf statistic is NaN
    np.testing.assert_array_equal(np.isnan(y), np.isnan(expected))
    assert np.isnan(y).any()
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)   # NaNs compare equal


@pytest.mark.parametrize("name", ["layer", "batch_nhwc", "batch_nchw", "group_nhwc",
                                  "instance_nchw"])
def test_sums_beyond_float32_range(implementation, name):
  """Where the sum of squared deviations (n * var) fits float32 but the sum of squares does
  not (`3e17 + 1e17 N(0, 1)`, 4096+ values), the output is float64's on every path; where it
  does not fit (`4e17 N(0, 1)`), every path gives NaN. The reference kept its one-pass
  `E[x^2]` (Inf, then NaN) for the first; the native kernels, which merge blocks in double,
  gave finite values for the second."""
  fn, want = VARIANTS[name]
  shape = {"layer": (1, 1, 2, 4096), "batch_nhwc": (4096, 1, 1, 2),
           "batch_nchw": (64, 2, 8, 8), "group_nhwc": (1, 64, 64, 4),
           "instance_nchw": (1, 2, 64, 64)}[name]
  noise = np.random.default_rng(4).standard_normal(shape)
  x = (3e17 + 1e17 * noise).astype(np.float32)
  y = np.asarray(jax.jit(fn)(jnp.asarray(x)), np.float64)
  np.testing.assert_allclose(y, want(x), rtol=1e-5, atol=1e-5)
  y = np.asarray(jax.jit(fn)(jnp.asarray((4e17 * noise).astype(np.float32))))
  assert np.isnan(y).all()


@pytest.mark.parametrize("name", ["layer", "rms", "batch_nhwc", "batch_nchw", "group_nhwc",
                                  "instance_nchw"])
@pytest.mark.slow
def test_long_reductions(implementation, name):
  """2^24 values per statistic: no accuracy lost to summation order or length."""
  fn, want = VARIANTS[name]
  shape = {"layer": (1, 1, 1 << 12, 1 << 12), "rms": (1, 1, 1 << 12, 1 << 12),
           "batch_nhwc": (1 << 10, 1 << 7, 1 << 7, 2), "batch_nchw": (1 << 10, 2, 1 << 7, 1 << 7),
           "group_nhwc": (1, 1 << 12, 1 << 11, 4),
           "instance_nchw": (1, 2, 1 << 12, 1 << 12)}[name]
  if name == "layer":
    fn = lambda x: nj.layer_norm(x, axis=(-2, -1))
    want = lambda x: ref.layer_norm(x, axis=(-2, -1))
  if name == "rms":
    fn = lambda x: nj.rms_norm(x, axis=(-2, -1))
    want = lambda x: ref.rms_norm(x, axis=(-2, -1), eps=1e-6)
  x = (np.random.default_rng(1).standard_normal(shape, dtype=np.float32) + np.float32(3.0))
  y = np.asarray(jax.jit(fn)(jnp.asarray(x)), np.float64)
  expected = want(x)
  # A variance off by a relative 1e-6 moves every output by about 5e-7 of its size.
  err = np.abs(y - expected).max() / np.abs(expected).max()
  assert err < 1e-6, err


@pytest.mark.parametrize("name", slow_except(sorted(VARIANTS), "batch_nchw"))
def test_empty_and_size_one_axes(implementation, name):
  fn, want = VARIANTS[name]
  for shape in ((0, 4, 4, 4), (2, 4, 4, 0), (2, 0, 4, 4)):
    if name.startswith("batch") and 0 in shape[1:]:
      continue   # init_batch_stats needs at least one channel
    x = jnp.zeros(shape)
    assert jax.jit(fn)(x).shape == shape
    assert jax.grad(lambda x: jnp.sum(fn(x)))(x).shape == shape
  # vmap over an empty batch (the kernels' batching rules fold the batch into rows).
  out = jax.vmap(fn)(jnp.zeros((0, 2, 4, 4, 4)))
  assert out.shape == (0, 2, 4, 4, 4)
  grad = jax.vmap(jax.grad(lambda x: jnp.sum(fn(x))))(jnp.zeros((0, 2, 4, 4, 4)))
  assert grad.shape == (0, 2, 4, 4, 4)
  if name in ("layer", "rms", "instance_nchw"):   # a size-1 reduction: var 0, y = bias = 0
    x = jnp.asarray(rand((2, 3, 4, 1), seed=2))
    np.testing.assert_allclose(jax.jit(fn)(x), want(np.asarray(x)), atol=1e-5)


@pytest.mark.parametrize("value", slow_except([1e7 + 1, 1e8 + 8, 1e9 + 64], 1e9 + 64))
@pytest.mark.parametrize("name", slow_except(sorted(set(VARIANTS) - {"rms"}), *_REPRESENTATIVE[2:]))
def test_constant_data_at_large_offsets_has_zero_variance(implementation, name, value):
  """Every statistic over a constant, at an offset whose last mantissa bit is set and with
  counts that are not powers of two, has variance exactly 0: the gradient (through `rstd`,
  where `var` meets `eps`) is the one at constant zeros, as the centered norms are
  shift-invariant. The reference's `t2 / n - offset**2` through XLA's reciprocal of `n` gave
  a variance of 1.9e-6 at 1e8 and gradients 8-77 % off."""
  fn, _ = VARIANTS[name]
  shape = (2, 6, 5, 6)
  w = jnp.asarray(rand(shape, seed=3))
  grad = jax.jit(jax.grad(lambda x: jnp.vdot(fn(x), w)))
  got = grad(jnp.full(shape, value, jnp.float32))
  want = grad(jnp.zeros(shape, jnp.float32))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(jnp.abs(want).max()))


@pytest.mark.parametrize("name", slow_except(["layer", "batch_nhwc", "group_nhwc", "instance_nchw"],
                                              "layer", "group_nhwc"))
def test_tiny_scales_with_zero_eps(implementation, name):
  """Data near 1e-17 with `eps=0` over 5000-value statistics: the mean's square is below
  float32's normal range (and flushed to zero), the variance is not; the result is as
  accurate as at scale 1 (the reference's `s2 / n - mean**2` lost 1e-4)."""
  fn, want = VARIANTS[name]
  shape = {"layer": (1, 1, 4, 5000), "batch_nhwc": (5000, 1, 1, 2),
           "group_nhwc": (2, 50, 50, 4), "instance_nchw": (1, 2, 50, 100)}[name]
  x = (np.random.default_rng(0).standard_normal(shape) * 1e-17).astype(np.float32)
  y = np.asarray(jax.jit(lambda x: fn(x, 0.0))(jnp.asarray(x)), np.float64)
  np.testing.assert_allclose(y, want(x, 0.0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("eps", slow_except(
    [0, 1, 0.5, np.float32(1e-5), np.int64(2), np.float64(1e-3)], np.int64(2)))
@pytest.mark.parametrize("name", slow_except(["layer", "rms", "batch_nhwc", "group_nchw"], "rms",
                                             "batch_nhwc"))
def test_eps_of_any_real_type(implementation, name, eps):
  fn, want = VARIANTS[name]
  x = _data("normal")
  expected = want(x, float(eps))
  np.testing.assert_allclose(jax.jit(lambda x: fn(x, eps))(jnp.asarray(x)), expected,
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(fn(jnp.asarray(x), eps), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", slow_except(sorted(VARIANTS), "batch_nchw"))
def test_gradients_match_the_reference_implementation(implementation, name):
  """First and second derivatives of every implementation equal the reference's."""
  fn, _ = VARIANTS[name]
  x = jnp.asarray(_data("offset", shape=(3, 4, 6, 4), seed=5))
  c = jnp.asarray(rand(x.shape, seed=6))
  loss = lambda x: jnp.vdot(jnp.sin(fn(x)), c)
  got = [jax.jit(jax.grad(loss))(x), jax.jit(lambda x: jax.jvp(jax.grad(loss), (x,), (c,))[1])(x)]
  with nj.implementation("reference"):
    want = [jax.grad(loss)(x), jax.jvp(jax.grad(loss), (x,), (c,))[1]]
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4 * float(jnp.abs(w).max()))


# name -> (axis, shape of scale and bias): layer/RMS norm whose feature parameters vary along
# reduced axes that are not trailing (the moments kernels' view, with per-feature parameters).
PARAMETERS_ALONG_REDUCED_AXES = {
    "layer_axis1": (1, (8,)),
    "layer_axes12": ((1, 2), (8, 16)),
    "layer_axes02": ((0, 2), (4, 16)),
    "rms_axis1": (1, (8,)),
}


@pytest.mark.parametrize("name", slow_except(sorted(PARAMETERS_ALONG_REDUCED_AXES), "layer_axes02"))
def test_parameters_varying_along_the_reduced_axes(implementation, name):
  """Output against float64, and first and second derivatives (in x, scale and bias) against
  the reference implementation, where the scale varies along a reduced, non-trailing axis."""
  axis, pshape = PARAMETERS_ALONG_REDUCED_AXES[name]
  rms = name.startswith("rms")
  x = jnp.asarray(_data("normal", seed=7))
  scale = jnp.asarray(1.0 + 0.5 * rand(pshape, seed=8))
  bias = None if rms else jnp.asarray(rand(pshape, seed=9))

  def fn(x, scale, bias):
    if rms:
      return nj.rms_norm(x, scale, axis=axis, eps=1e-5)
    return nj.layer_norm(x, scale, bias, axis=axis, eps=1e-5)
  want = (ref.rms_norm(x, scale, axis=axis, eps=1e-5) if rms
          else ref.layer_norm(x, scale, bias, axis=axis, eps=1e-5))
  np.testing.assert_allclose(jax.jit(fn)(x, scale, bias), want, rtol=1e-5, atol=1e-5)

  c = jnp.asarray(rand(x.shape, seed=10))
  loss = lambda *p: jnp.vdot(jnp.sin(fn(*p)), c)
  args = (x, scale, bias)
  argnums = (0, 1) if rms else (0, 1, 2)
  second = lambda x, *p: jax.jvp(lambda x: jax.grad(loss)(x, *p), (x,), (c,))[1]
  got = [jax.jit(jax.grad(loss, argnums))(*args), jax.jit(second)(*args)]
  with nj.implementation("reference"):
    want = [jax.grad(loss, argnums)(*args), second(*args)]
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4 * float(jnp.abs(w).max()))


@pytest.mark.parametrize("name", slow_except(["layer", "rms", "group_nhwc", "instance_nchw",
                                               "batch_nchw"], *_REPRESENTATIVE))
def test_bfloat16_input_made_by_a_fused_op(implementation, name):
  """`norm(x + r)` in bfloat16 under jit: XLA may keep the fused sum in float32 in some
  consumers and not others; the statistics and the output must see the same rounded values."""
  fn, want = VARIANTS[name]
  rng = np.random.default_rng(7)
  x = jnp.asarray(3e4 + rng.standard_normal((4, 8, 16, 8)), jnp.bfloat16)
  r = jnp.asarray(7e4 + 3.0 * rng.standard_normal((4, 8, 16, 8)), jnp.bfloat16)
  y = np.asarray(jax.jit(lambda x, r: fn(x + r))(x, r).astype(jnp.float32), np.float64)
  h = np.asarray((x + r).astype(jnp.float32), np.float64)
  np.testing.assert_allclose(y, want(h), rtol=1e-2, atol=3e-2)


# ----------------------------------------------------------------- choosing the implementation

def test_implementation_names():
  """Every name is accepted (pallas included); an unknown one is a ValueError listing them."""
  from normjax._src import dispatch  # pylint: disable=import-outside-toplevel
  x = jnp.asarray(rand((2, 8), seed=1))
  for name in ("auto", "reference", "native", "pallas"):
    with nj.implementation(name):
      assert dispatch._CHOICE.value == name
      np.testing.assert_allclose(nj.layer_norm(x), ref.layer_norm(x), atol=1e-5)
  for bad in ("triton", "Pallas", None):
    with pytest.raises(ValueError, match="'auto', 'reference', 'native', 'pallas'; got"):
      nj.implementation(bad)


def test_pallas_plan(monkeypatch):
  """Under "pallas", the rows plan asks for the Pallas kernels (no native library needed);
  everything else, the moments plan included, takes the reference."""
  from normjax._src import dispatch  # pylint: disable=import-outside-toplevel
  from normjax._src.kernels import pallas, primitives  # pylint: disable=import-outside-toplevel
  x = jnp.zeros((4, 6, 8))
  vec = jnp.ones((1, 1, 8))
  rows = dispatch.Plan(kernel="rows", per_row=False, implementation="pallas")
  with nj.implementation("pallas"):
    assert dispatch.plan(x, (2,), vec, vec, 1e-5) == rows
    monkeypatch.setitem(primitives.LOWERINGS["native"], "cpu", False)
    assert dispatch.plan(x, (2,), vec, None, 1e-5, centered=False) == rows
    assert dispatch.plan(x, (1, 2), None, None, 1e-5) == rows
    assert dispatch.plan(x, (0, 1), None, None, 1e-5) == dispatch.REFERENCE      # batch norm
    assert dispatch.plan(x.astype(jnp.float16), (2,), None, None, 1e-5) == dispatch.REFERENCE
    assert dispatch.plan(x[:0], (2,), None, None, 1e-5) == dispatch.REFERENCE
    wide = jnp.zeros((2, pallas.MAX_FEATURES + 1))
    assert dispatch.plan(wide, (1,), None, None, 1e-5) == dispatch.REFERENCE
  with nj.implementation("native"):
    assert dispatch.plan(x, (2,), vec, vec, 1e-5) == dispatch.REFERENCE      # no native library
