"""The adaptive (per-example modulated) norms of normjax/_src/adaptive.py: `adaptive_layer_norm`,
`adaptive_rms_norm` and `adaptive_group_norm` (adaLN, adaLN-Zero, AdaGN), on every
implementation, against the float64 NumPy formulas of tests/reference.py: values on adversarial
data, first and second derivatives in `x`, `shift` and `scale` (both modes), masks, the dtype
policy (`1 + scale` in float32, output in `x.dtype`), jit/vmap, and misuse."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import normjax as nj
from tests import reference as ref
from tests.helpers import rand, slow_except


class Variant:
  """One call pattern: the normjax function and the reference of (x, shift, scale, mask), the
  shapes of x, shift and scale (shift None: no shift argument at all, as RMS)."""

  def __init__(self, fn, want, x, shift, scale):
    self.fn, self.want, self.x, self.shift, self.scale = fn, want, x, shift, scale

  def args(self, kind="normal", dtype=np.float32):
    x = rand(self.x, seed=0).astype(np.float64)
    if kind == "outlier_first":
      x[..., 0] = 3e4   # the first element of every row, group and channel
      x[:, 0] = 1e4
    elif kind == "offset":
      x = x + 1e5
    shift = None if self.shift is None else rand(self.shift, seed=1).astype(dtype)
    return x.astype(dtype), shift, rand(self.scale, seed=2, spread=0.5).astype(dtype)

  def call(self, x, shift, scale, mask=None):
    return self.fn(x, shift, scale, mask) if self.shift else self.fn(x, None, scale, mask)


B, T, D = 4, 6, 16
VARIANTS = {
    # per example, as DiT: [B, 1, D] (the native rows kernel's per-example layout)
    "layer": Variant(lambda x, b, s, m: nj.adaptive_layer_norm(x, b, s, mask=m),
                     lambda x, b, s, m: ref.adaptive_layer_norm(x, b, s, mask=m),
                     (B, T, D), (B, 1, D), (B, 1, D)),
    "layer_2axes": Variant(
        lambda x, b, s, m: nj.adaptive_layer_norm(x, b, s, axis=(1, 2), eps=1e-3, mask=m),
        lambda x, b, s, m: ref.adaptive_layer_norm(x, b, s, axis=(1, 2), eps=1e-3, mask=m),
        (B, T, D), (B, 1, D), (B, T, 1)),
    # per row and per feature: the layouts of the native rows kernel
    "layer_per_row": Variant(lambda x, b, s, m: nj.adaptive_layer_norm(x, b, s, mask=m),
                             lambda x, b, s, m: ref.adaptive_layer_norm(x, b, s, mask=m),
                             (B, T, D), (B, T, 1), (B, 1, 1)),
    "layer_per_feature": Variant(lambda x, b, s, m: nj.adaptive_layer_norm(x, b, s, mask=m),
                                 lambda x, b, s, m: ref.adaptive_layer_norm(x, b, s, mask=m),
                                 (B, T, D), (1, 1, D), (1, 1, D)),
    "rms": Variant(lambda x, b, s, m: nj.adaptive_rms_norm(x, s, mask=m),
                   lambda x, b, s, m: ref.adaptive_rms_norm(x, s, mask=m),
                   (B, T, D), None, (B, 1, D)),
    "rms_per_row": Variant(lambda x, b, s, m: nj.adaptive_rms_norm(x, s, mask=m),
                           lambda x, b, s, m: ref.adaptive_rms_norm(x, s, mask=m),
                           (B, T, D), None, (B, T, 1)),
    "group_nhwc": Variant(
        lambda x, b, s, m: nj.adaptive_group_norm(x, b, s, num_groups=2, mask=m),
        lambda x, b, s, m: ref.adaptive_group_norm(x, b, s, num_groups=2, mask=m),
        (B, 3, 5, 8), (B, 1, 1, 8), (B, 1, 1, 8)),
    "group_nchw": Variant(
        lambda x, b, s, m: nj.adaptive_group_norm(x, b, s, group_size=2, channel_axis=1, mask=m),
        lambda x, b, s, m: ref.adaptive_group_norm(x, b, s, num_groups=4, channel_axis=1,
                                                   mask=m),
        (B, 8, 3, 5), (B, 8, 1, 1), (B, 1, 1, 1)),
    "instance": Variant(
        lambda x, b, s, m: nj.adaptive_group_norm(x, b, s, group_size=1, mask=m),
        lambda x, b, s, m: ref.adaptive_group_norm(x, b, s, num_groups=8, mask=m),
        (B, 3, 5, 8), (B, 1, 1, 8), (1, 1, 1, 8)),
}
_REPRESENTATIVE = ("layer", "layer_per_row", "rms_per_row", "group_nhwc")


@pytest.mark.parametrize("kind", slow_except(["normal", "outlier_first", "offset"],
                                              "outlier_first"))
@pytest.mark.parametrize("name", slow_except(sorted(VARIANTS), *_REPRESENTATIVE))
def test_matches_float64(implementation, name, kind):
  v = VARIANTS[name]
  x, shift, scale = v.args(kind)
  y = jax.jit(v.call)(*map(_maybe_array, (x, shift, scale)))
  assert y.shape == x.shape and y.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(y, np.float64), v.want(x, shift, scale, None),
                             rtol=1e-5, atol=1e-5)


def _maybe_array(a):
  return None if a is None else jnp.asarray(a)


@pytest.mark.parametrize("name", slow_except(sorted(VARIANTS), "layer_per_row"))
def test_derivatives_against_float64(implementation, name):
  """First and second derivatives in x, shift and scale, reverse and forward mode."""
  v = VARIANTS[name]
  x, shift, scale = v.args()
  if v.shift is None:
    fn, want, args = (lambda x, s: v.fn(x, None, s, None)), (
        lambda x, s: v.want(x, None, s, None)), (x, scale)
  else:
    fn, want, args = (lambda x, b, s: v.fn(x, b, s, None)), (
        lambda x, b, s: v.want(x, b, s, None)), (x, shift, scale)
  ref.assert_derivatives_match(fn, want, args, key=("adaptive", name))


def _mask(shape, fully_masked_example=True):
  mask = rand(shape, seed=5) > -0.5
  if fully_masked_example:
    mask[0] = False
  return mask


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_mask(name):
  """Only True elements enter the statistics, a fully masked row included (a mask takes the
  reference on every implementation)."""
  v = VARIANTS[name]
  x, shift, scale = v.args()
  mask = _mask(x.shape)
  y = jax.jit(lambda x, b, s: v.call(x, b, s, jnp.asarray(mask)))(
      *map(_maybe_array, (x, shift, scale)))
  np.testing.assert_allclose(np.asarray(y, np.float64), v.want(x, shift, scale, mask),
                             rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", slow_except(sorted(VARIANTS), "group_nhwc"))
def test_mask_derivatives(name):
  """Derivatives of the masked norm in x and scale, where every row counts something (a fully
  masked row is x / sqrt(eps), whose sine in the float32 loss cannot follow)."""
  v = VARIANTS[name]
  x, shift, scale = v.args()
  mask = _mask(x.shape, fully_masked_example=False)
  fn = lambda x, s: v.call(x, _maybe_array(shift), s, jnp.asarray(mask))
  want = lambda x, s: v.want(x, None if shift is None else jnp.asarray(shift, x.dtype), s, mask)
  ref.assert_derivatives_match(fn, want, (x, scale))


@pytest.mark.parametrize("name", slow_except(["layer", "rms", "group_nhwc"], "group_nhwc"))
def test_bfloat16_input(implementation, name):
  """bfloat16 x, shift and scale: the output is bfloat16 and as close to float64 (on the
  rounded inputs) as one rounding allows."""
  v = VARIANTS[name]
  x, shift, scale = v.args("outlier_first")
  bf = lambda a: None if a is None else jnp.asarray(a, jnp.bfloat16)
  y = jax.jit(v.call)(bf(x), bf(shift), bf(scale))
  assert y.dtype == jnp.bfloat16
  f64 = lambda a: None if a is None else np.asarray(bf(a).astype(jnp.float32), np.float64)
  want = v.want(f64(x), f64(shift), f64(scale), None)
  np.testing.assert_allclose(np.asarray(y.astype(jnp.float32)), want, rtol=1e-2, atol=2e-2)


@pytest.mark.parametrize("name", slow_except(["layer", "rms", "group_nhwc"], "rms"))
def test_one_plus_scale_in_float32(implementation, name):
  """A bfloat16 scale of 1e-3 modulates by 1.001 (a bfloat16 `1 + scale` is 1.0), and the
  output of float32 x stays float32 whatever the modulation's dtype."""
  v = VARIANTS[name]
  x, shift, _ = v.args()
  scale = jnp.full(v.scale, 1e-3, jnp.bfloat16)
  assert float((1 + scale)[(0,) * scale.ndim]) == 1.0   # what the test guards against
  y = jax.jit(v.call)(jnp.asarray(x), _maybe_array(shift), scale)
  assert y.dtype == jnp.float32
  exact = v.want(x, shift, np.asarray(scale.astype(jnp.float32), np.float64), None)
  np.testing.assert_allclose(np.asarray(y, np.float64), exact, rtol=1e-5, atol=1e-5)
  assert np.abs(exact - v.want(x, shift, None, None)).max() > 1e-3   # the test can tell


@pytest.mark.parametrize("name", slow_except(sorted(VARIANTS), "rms_per_row", "group_nhwc"))
@pytest.mark.parametrize("special", [np.nan, np.inf])
def test_nan_and_inf_give_nan_rows(implementation, name, special):
  """A NaN or an Inf in x: NaN in every output its statistic reaches, and nothing else."""
  v = VARIANTS[name]
  x, shift, scale = v.args()
  x[1, 2, 2] = special
  y = np.asarray(jax.jit(v.call)(*map(_maybe_array, (x, shift, scale))), np.float64)
  with np.errstate(invalid="ignore"):
    want = v.want(x, shift, scale, None)
  if name.startswith("rms") and np.isinf(special):
    want[1, 2] = np.nan   # x / inf is 0 beside it in float64; an Inf statistic is NaN
  assert np.isnan(y).any() and not np.isnan(y).all()
  np.testing.assert_array_equal(np.isnan(y), np.isnan(want))
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("size", [0, 1])
def test_empty_and_size_one_axes(implementation, size):
  """An empty normalized axis gives an empty output; a single element normalizes to 0 (layer,
  group: the output is `shift`) or to x / sqrt(x^2 + eps) (RMS)."""
  x, shift, scale = rand((3, 2, size), seed=0) * 10, rand((3, 1, size), 1), rand((3, 1, size), 2)
  ys = jax.jit(lambda x, b, s: (nj.adaptive_layer_norm(x, b, s), nj.adaptive_rms_norm(x, s),
                                nj.adaptive_group_norm(x, b, s, group_size=1)))(x, shift, scale)
  wants = (ref.adaptive_layer_norm(x, shift, scale), ref.adaptive_rms_norm(x, scale),
           ref.adaptive_layer_norm(x, shift, scale, axis=1, eps=1e-5))
  for y, want in zip(ys, wants):
    assert y.shape == x.shape
    np.testing.assert_allclose(np.asarray(y, np.float64), want, rtol=1e-5, atol=1e-5)
  g = jax.grad(lambda x: jnp.sum(nj.adaptive_layer_norm(x, shift, scale) ** 2))(jnp.asarray(x))
  assert g.shape == x.shape and np.isfinite(np.asarray(g)).all()


def test_vmap_and_zero_modulation():
  """Inside vmap, per-example modulation is [1, D] for [T, D] input; with zero shift and scale
  (adaLN-Zero at initialisation) the output is the plain norm's."""
  x, shift, scale = VARIANTS["layer"].args()
  fn = lambda x, b, s: nj.adaptive_layer_norm(x, b, s)
  y = jax.jit(jax.vmap(fn))(jnp.asarray(x), jnp.asarray(shift), jnp.asarray(scale))
  np.testing.assert_allclose(np.asarray(y, np.float64), ref.adaptive_layer_norm(x, shift, scale),
                             rtol=1e-5, atol=1e-5)
  x, zeros = jnp.asarray(x), jnp.zeros((B, 1, D))
  for got, want in ((nj.adaptive_layer_norm(x, zeros, zeros), nj.layer_norm(x, eps=1e-6)),
                    (nj.adaptive_rms_norm(x, zeros), nj.rms_norm(x)),
                    (nj.adaptive_group_norm(x[:, None], zeros[:, None], zeros[:, None],
                                            num_groups=4), nj.group_norm(x[:, None], num_groups=4))):
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


_X = jnp.ones((2, 3, 4))


@pytest.mark.parametrize("call, error, message", [
    (lambda: nj.adaptive_layer_norm(_X, jnp.ones((2, 4))), ValueError,
     r"shift must have the rank of x \(3\).*got shape \(2, 4\).*shift\[:, None, :\]"),
    (lambda: nj.adaptive_layer_norm(_X, None, jnp.ones((2, 2, 4))), ValueError,
     r"scale must have the rank of x .*got shape \(2, 2, 4\)"),
    (lambda: nj.adaptive_rms_norm(_X, jnp.ones((4,))), ValueError, "scale must have the rank"),
    (lambda: nj.adaptive_group_norm(_X, jnp.ones((2, 4)), num_groups=2), ValueError,
     "shift must have the rank"),
    (lambda: nj.adaptive_layer_norm(_X, jnp.ones((2, 1, 4), jnp.int32)), TypeError, "shift"),
    (lambda: nj.adaptive_rms_norm(_X, jnp.ones((2, 1, 4), jnp.int32)), TypeError, "scale"),
    (lambda: nj.adaptive_layer_norm(jnp.ones((2, 3, 4), jnp.int32)), TypeError, "x"),
    (lambda: nj.adaptive_layer_norm(_X, axis=()), ValueError, "axis must name"),
    (lambda: nj.adaptive_rms_norm(_X, axis=3), ValueError, "axis"),
    (lambda: nj.adaptive_layer_norm(_X, eps=-1.0), ValueError, "eps"),
    (lambda: nj.adaptive_layer_norm(_X, mask=jnp.ones((2, 3, 4))), TypeError, "mask"),
    (lambda: nj.adaptive_group_norm(_X, num_groups=3), ValueError, "num_groups"),
    (lambda: nj.adaptive_group_norm(_X, group_size=3), ValueError, "group_size"),
])
def test_misuse_raises_a_named_error(call, error, message):
  with pytest.raises(error, match=message):
    call()


@pytest.mark.slow   # 2^26 values; CI runs it
def test_rows_of_2_24_values_with_per_example_modulation():
  """adaLN over rows of 2^24 values at an offset of 3 (two examples of two rows, the native
  kernel's per-example layout): within float32 rounding of float64, row by row."""
  n = 1 << 24
  rng = np.random.default_rng(5)
  x = (rng.standard_normal((2, 2, n), dtype=np.float32) + np.float32(3.0))
  shift = (rng.standard_normal((2, 1, n), dtype=np.float32) * np.float32(0.1))
  scale = (rng.standard_normal((2, 1, n), dtype=np.float32) * np.float32(0.1))
  y = np.asarray(jax.jit(nj.adaptive_layer_norm)(x, shift, scale))
  for b in range(2):
    for t in range(2):
      row = x[b, t].astype(np.float64)
      xhat = (row - row.mean()) / np.sqrt(row.var() + 1e-6)
      want = xhat * (1.0 + scale[b, 0].astype(np.float64)) + shift[b, 0]
      np.testing.assert_allclose(y[b, t], want, rtol=1e-5, atol=1e-5)
