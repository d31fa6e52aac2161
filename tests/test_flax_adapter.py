"""Tests of `normjax._src.flax_adapter`'s layout and dtype helpers: `result_dtype`,
`promote_dtype`, `merge_axes`, `map_axes`, `to_shape`, `no_index_groups`, `check_channels`."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.linen import dtypes as linen_dtypes

from normjax._src import flax_adapter as fa
from tests.helpers import rand

BF16, F16, F32 = jnp.bfloat16, jnp.float16, jnp.float32


def _flax_dtype(*args, dtype=None):
  """flax's own `canonicalize_dtype`, with the standard promotion it is written for."""
  with jax.numpy_dtype_promotion("standard"):
    return jnp.dtype(linen_dtypes.canonicalize_dtype(*args, dtype=dtype))


@pytest.mark.parametrize("dtypes, dtype", [
    ((BF16, F32), None), ((BF16, None), None), ((F16, BF16), None), ((BF16, BF16, F16), None),
    ((F32,), None), ((BF16, F32), BF16), ((F32, F32), F16), ((BF16,), jnp.float64),
])
def test_result_dtype_is_flax_canonicalize_dtype(dtypes, dtype):
  """The promoted dtype of the arrays (None skipped), or `dtype` if given: what flax's
  `canonicalize_dtype` returns, also under strict promotion (this suite's setting)."""
  arrays = [None if d is None else jnp.zeros((2,), d) for d in dtypes]
  expected = _flax_dtype(*arrays, dtype=dtype)
  assert jax.config.jax_numpy_dtype_promotion == "strict"
  assert fa.result_dtype(*arrays, dtype=dtype) == expected
  assert fa.result_dtype(*(None if d is None else jnp.dtype(d) for d in dtypes),
                         dtype=dtype) == expected   # dtypes work as arrays do


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.int8, jnp.uint8, jnp.bool_])
def test_result_dtype_rejects_non_floating(dtype):
  """An integer or bool output dtype raises ValueError naming it, as flax raises."""
  x = jnp.zeros((2,), F32)
  with pytest.raises(ValueError):
    _flax_dtype(x, dtype=dtype)
  with pytest.raises(ValueError, match=jnp.dtype(dtype).name):
    fa.result_dtype(x, dtype=dtype)


@pytest.mark.parametrize("dtype", [None, BF16, F16])
def test_promote_dtype_under_strict_promotion(dtype):
  """Every non-None array cast to flax's dtype (where flax's `promote_dtype` raises under strict
  promotion for bfloat16 with float32), values as NumPy casts them; None passes through."""
  x = rand((3, 4), seed=1).astype(BF16)
  scale = rand((4,), seed=2)
  args = (jnp.asarray(x), jnp.asarray(scale), None)
  with jax.numpy_dtype_promotion("strict"):
    out = fa.promote_dtype(args, dtype=dtype)
  target = _flax_dtype(*args, dtype=dtype)
  assert len(out) == 3 and out[2] is None
  assert out[0].dtype == target and out[1].dtype == target
  np.testing.assert_array_equal(np.asarray(out[0]), x.astype(target))
  np.testing.assert_array_equal(np.asarray(out[1]), scale.astype(target))


def _random_cases(count, seed):
  """(shape, axes) pairs: rank 1 to 4, sizes 1 to 4, axes any subset in any order."""
  rng = np.random.default_rng(seed)
  for _ in range(count):
    ndim = int(rng.integers(1, 5))
    shape = tuple(int(n) for n in rng.integers(1, 5, ndim))
    axes = tuple(int(a) for a in rng.permutation(ndim)[:int(rng.integers(0, ndim + 1))])
    yield shape, axes


@pytest.mark.parametrize("shape, axes", list(_random_cases(10, seed=0)) + [((2, 3, 4), (2, 0))])
def test_merge_axes_and_its_inverse(shape, axes):
  """`axes` moved to the end (in the given order) and merged row-major into one axis (size 1 for
  none), as NumPy's transpose and reshape do; the inverse gives `x` back bit for bit."""
  x = rand(shape, seed=len(shape))
  merged, undo = fa.merge_axes(jnp.asarray(x), axes)
  rest = [a for a in range(len(shape)) if a not in axes]
  expected = np.transpose(x, rest + list(axes)).reshape([shape[a] for a in rest] + [-1])
  np.testing.assert_array_equal(np.asarray(merged), expected)
  np.testing.assert_array_equal(np.asarray(undo(merged)), x)
  # The inverse puts each feature position back where it came from (not just any reshape).
  np.testing.assert_array_equal(np.asarray(undo(merged * 2.0)), x * 2.0)


def _slice_fn(a, b, c):
  """A per-slice function that mixes the slice's values (a wrong slicing shows)."""
  return a * jnp.sum(b) + jnp.max(a) + c.shape[0] * c[..., :1]


@pytest.mark.parametrize("axes", [(), (1,), (0, 2), (3, 1, 0)])
def test_map_axes_is_a_loop_over_slices(axes):
  """`fn` applied to each slice along `axes`, re-assembled along the same axes: a Python loop
  over NumPy slices in float64. A None argument passes through."""
  a, b, c = rand((2, 3, 4, 5), seed=1), rand((2, 3, 4, 5), seed=2), rand((2, 3, 4, 5), seed=3)
  out = fa.map_axes(lambda a, none, b, c: _slice_fn(a, b, c) if none is None else None, axes,
                    jnp.asarray(a), None, jnp.asarray(b), jnp.asarray(c))
  expected = np.empty(a.shape)
  kept = [n for i, n in enumerate(a.shape) if i not in axes]
  for index in itertools.product(*(range(a.shape[i]) for i in sorted(axes))):
    where = [slice(None)] * a.ndim
    for axis, i in zip(sorted(axes), index, strict=True):
      where[axis] = i
    sa, sb, sc = (np.float64(v[tuple(where)]) for v in (a, b, c))
    assert list(sa.shape) == kept
    expected[tuple(where)] = sa * np.sum(sb) + np.max(sa) + sc.shape[0] * sc[..., :1]
  np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-5, atol=1e-5)


def test_to_shape():
  """The same values in the same (row-major) order in the new shape; None stays None; a wrong
  size raises ValueError naming the parameter, the sizes and the shapes."""
  p = np.arange(6.0, dtype=np.float32)
  np.testing.assert_array_equal(np.asarray(fa.to_shape(p, (2, 3), "scale")), p.reshape(2, 3))
  np.testing.assert_array_equal(np.asarray(fa.to_shape(p.reshape(3, 2), [6], "scale")), p)
  assert fa.to_shape(None, (2, 3), "bias") is None
  with pytest.raises(ValueError, match=r"bias must have 6 values .*\(2, 3\).*got shape \(5,\)"):
    fa.to_shape(np.zeros(5, np.float32), (2, 3), "bias")


def test_no_index_groups():
  """`axis_index_groups` other than None raises ValueError naming the module and the value."""
  assert fa.no_index_groups(None, "LayerNorm") is None
  with pytest.raises(ValueError, match=r"GroupNorm: axis_index_groups .*\[\[0, 1\], \[2, 3\]\]"):
    fa.no_index_groups([[0, 1], [2, 3]], "GroupNorm")


@pytest.mark.parametrize("axis, num_features, raises", [
    (-1, 5, False), (1, 4, False), (-1, 4, True), (0, 5, True),
    (3, 7, False), (-4, 7, False),   # out of range: left to the normjax function's own error
])
def test_check_channels(axis, num_features, raises):
  """ValueError naming both counts unless `x` has `num_features` along `axis`."""
  x = jnp.zeros((3, 4, 5))
  if not raises:
    assert fa.check_channels(x, axis, num_features) is None
    return
  got = x.shape[axis]
  with pytest.raises(ValueError, match=rf"num_features={num_features} .*got {got} "):
    fa.check_channels(x, axis, num_features)
