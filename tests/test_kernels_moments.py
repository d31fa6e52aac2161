"""Per-channel moments from one read (normjax/_src/kernels/moments.py) and their CPU kernels.

Batch, instance and group norm on NHWC input take their statistics from `column_moments_p`,
batch and group norm on NCHW input from `row_moments_p` (one read of `x` each); these tests
check the dispatch, the kernels against their jax.numpy definitions and float64 NumPy, the
pooling of statistics (channel groups, and the batch for NCHW batch norm) at large means,
vmap and derivatives. The variant-level suites (test_variants, test_numerics_moments,
test_torch_parity, ...) run through them as well.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import normjax as nj
from normjax._src.kernels import moments as _columns
from normjax._src.kernels import cpu as _native
from tests import reference
from tests.helpers import rand, slow_except

F32 = jnp.float32
KERNEL = "NormjaxColumnMoments"
ROW_KERNEL = "NormjaxRowMoments"


def _hlo(fn, *args):
  return jax.jit(fn).lower(*args).compile().as_text()


def _batch_norm(x, **kw):
  return nj.batch_norm(x, None, None, nj.init_batch_stats(x.shape[-1]), train=True, **kw)[0]


def _batch_norm_nchw(x):
  return nj.batch_norm(x, None, None, nj.init_batch_stats(x.shape[1]), train=True,
                       channel_axis=1)[0]


def _group_norm_nchw(x):
  return nj.group_norm(x, num_groups=2, channel_axis=1)


def _nhwc(fn):
  """`fn` of channels-first input, seen as a function of channels-last input."""
  return lambda x: jnp.moveaxis(fn(jnp.moveaxis(x, -1, 1)), 1, -1)


@pytest.mark.skipif(not _native.NATIVE, reason="native kernel not built")
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_channels_last_statistics_call_the_kernel(dtype):
  x = rand((4, 6, 5, 32), dtype=dtype)
  for fn in (_batch_norm, nj.instance_norm, lambda x: nj.group_norm(x, num_groups=8)):
    assert KERNEL in _hlo(fn, x)
    assert KERNEL in _hlo(jax.grad(lambda x: jnp.sum(fn(x).astype(F32) ** 2)), x)


def test_other_statistics_do_not_call_the_kernel():
  x = rand((4, 6, 5, 32))
  mask = jnp.asarray(rand((4, 6, 5, 1), seed=1) > 0)
  for fn in (_batch_norm_nchw,                                               # the row kernel
             lambda x: _batch_norm(x, fast_variance=True),
             lambda x: nj.instance_norm(x, mask=jnp.broadcast_to(mask, x.shape)),
             lambda x: nj.layer_norm(x)):                                   # the rows kernel
    assert KERNEL not in _hlo(fn, x)


def _check_stats(stats, mean, var):
  """A moments primitive's (shift, offset, var) against the float64 mean and variance of the
  elements pooled into each entry: the shift is the mean rounded (so offset is tiny)."""
  shift, offset, v = (np.asarray(a, np.float64) for a in stats)
  np.testing.assert_allclose(shift, mean, rtol=1e-6, atol=1e-5)
  np.testing.assert_allclose(shift + offset, mean, rtol=1e-7, atol=1e-6)
  np.testing.assert_allclose(v, var, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not _native.NATIVE, reason="native kernel not built")
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_channels_first_statistics_call_the_row_kernel(dtype):
  x = rand((4, 8, 5, 6), dtype=dtype)
  for fn in (_batch_norm_nchw, _group_norm_nchw):
    assert ROW_KERNEL in _hlo(fn, x)
    assert ROW_KERNEL in _hlo(jax.grad(lambda x: jnp.sum(fn(x).astype(F32) ** 2)), x)
  assert ROW_KERNEL not in _hlo(lambda x: _batch_norm(x), x)               # channels last
  assert ROW_KERNEL not in _hlo(lambda x: nj.instance_norm(x, channel_axis=1), x)  # rows


ROW_SHAPES = [(1, 1, 1), (2, 3, 7), (3, 64, 1000), (4, 48, 33), (1, 256, 4096)]


@pytest.mark.parametrize("shape", slow_except(ROW_SHAPES, ROW_SHAPES[-1]))
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("pool_outer,size", [(False, 1), (True, 1), (False, 0), (True, 0)])
def test_row_kernel_matches_reference_and_numpy(shape, dtype, pool_outer, size):
  outer, c, p = shape
  size = size or {1: 1, 3: 3, 64: 4, 48: 16, 256: 32}[c]             # 0: a group size of c
  x = rand(shape, dtype=dtype, loc=100.0, spread=3.0, seed=2)
  # Distinct means per channel and per outer index, so that pooled rows have different shifts.
  means = np.arange(c, dtype=np.float32)[None, :, None] + 5.0 * np.arange(outer)[:, None, None]
  x = (x.astype(F32) + jnp.asarray(means)).astype(dtype)
  kw = dict(pool_outer=pool_outer, group_size=size)
  kernel = jax.jit(functools.partial(_columns.row_moments_p.bind, **kw))(x)
  ref = jax.jit(functools.partial(_columns._row_reference, **kw))(x)
  x64 = np.asarray(x.astype(F32), np.float64)
  pools = x64.reshape(outer, c // size, size, p)
  axes = (0, 2, 3) if pool_outer else (2, 3)
  spread = lambda v: np.broadcast_to(np.repeat(v, size, axis=-1), (outer, c))
  mean, var = spread(pools.mean(axes)), spread(pools.var(axes))
  for stats in (kernel, ref):
    _check_stats(stats, mean, var)


def test_channels_first_pooling_at_large_and_different_means():
  """NCHW batch and group norm at 1e5 + 10 c (+ 3 per example): the pooled statistics must
  give the variance to float32 accuracy, as the channels-last reference does."""
  means = 1e5 + 10.0 * np.arange(16, dtype=np.float32) + 3.0 * np.arange(2)[:, None, None, None]
  x = (rand((2, 9, 7, 16), seed=3) + means).astype(np.float32)
  want_bn = reference.batch_norm(x, None, None, np.zeros(16), np.ones(16), train=True)[0]
  for fn, want in ((_nhwc(_batch_norm_nchw), want_bn),
                   (_nhwc(_group_norm_nchw), reference.group_norm(x, num_groups=2))):
    np.testing.assert_allclose(jax.jit(fn)(jnp.asarray(x)), want, atol=2e-4)


SHAPES = [(1, 1, 1), (2, 7, 3), (3, 1000, 64), (1, 4096, 48), (5, 33, 256)]
GROUP_SIZES = {(1, 1, 1): 1, (2, 7, 3): 3, (3, 1000, 64): 4, (1, 4096, 48): 16, (5, 33, 256): 32}


@pytest.mark.parametrize("shape", slow_except(SHAPES, SHAPES[-1]))
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("grouped", [False, True])
def test_kernel_matches_reference_and_numpy(shape, dtype, grouped):
  size = GROUP_SIZES[shape] if grouped else 1
  x = rand(shape, dtype=dtype, loc=100.0, spread=3.0, seed=2)
  # Distinct channel means, so that a group's channels have different shifts to reconcile.
  x = (x.astype(jnp.float32) + jnp.arange(shape[2], dtype=jnp.float32)[None, None]).astype(dtype)
  kernel = jax.jit(functools.partial(_columns.column_moments_p.bind, group_size=size))(x)
  ref = jax.jit(functools.partial(_columns._column_reference, group_size=size))(x)
  x64 = np.asarray(x.astype(np.float32), np.float64)
  b, p, c = shape
  groups = x64.reshape(b, p, c // size, size)
  per_channel = lambda v: np.repeat(v, size, axis=-1)          # [b, c // size] -> [b, c]
  mean, var = per_channel(groups.mean((1, 3))), per_channel(groups.var((1, 3)))
  for stats in (kernel, ref):
    _check_stats(stats, mean, var)


def test_group_norm_regrouping_at_large_and_different_channel_means():
  """Channels of a group with means 1e5 + 10 c: their shifts differ, and the pooled statistics
  must still give the group's variance to float32 accuracy."""
  x = rand((2, 9, 7, 16), seed=3) + 1e5 + 10.0 * np.arange(16, dtype=np.float32)
  y = jax.jit(lambda x: nj.group_norm(x, num_groups=4))(x)
  np.testing.assert_allclose(y, reference.group_norm(x, num_groups=4), atol=2e-4)
  x = rand((2, 9, 7, 16), seed=4) + 1e5
  for fn, want in ((lambda x: nj.group_norm(x, num_groups=4),
                    lambda x: reference.group_norm(x, num_groups=4)),
                   (nj.instance_norm, reference.instance_norm),
                   (_batch_norm, lambda x: reference.batch_norm(
                       x, None, None, np.zeros(16), np.ones(16), train=True)[0])):
    np.testing.assert_allclose(jax.jit(fn)(x), want(x), atol=2e-4)


@pytest.mark.parametrize("fn,kernel", [(lambda x: nj.group_norm(x, num_groups=2), KERNEL),
                                       (_group_norm_nchw, ROW_KERNEL),      # folds the batch
                                       (_batch_norm_nchw, None)])          # pools: vmap(reference)
@pytest.mark.slow
def test_vmap_folds_into_the_example_axis(fn, kernel):
  x = rand((3, 2, 8, 5, 4), seed=5)
  np.testing.assert_allclose(jax.vmap(fn)(x), jnp.stack([fn(xi) for xi in x]), atol=1e-5)
  if kernel is not None:
    assert kernel in _hlo(jax.vmap(fn), x) or not _native.NATIVE
  loss = lambda x: jnp.sum(jnp.sin(fn(x)))
  np.testing.assert_allclose(jax.vmap(jax.grad(loss))(x),
                             jnp.stack([jax.grad(loss)(xi) for xi in x]), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_derivatives_agree_with_the_xla_path():
  """Gradient and Hessian-vector products (both modes) through the shifted moments equal
  those of the numerics' own (conditional-variance) moments."""
  x = jnp.asarray(rand((2, 3, 4, 8), seed=6, spread=2.0))
  v, c = jnp.asarray(rand(x.shape, seed=7)), jnp.asarray(rand(x.shape, seed=8))

  def quantities():
    out = []
    for fn in (_batch_norm, nj.instance_norm, lambda x: nj.group_norm(x, num_groups=2),
               _nhwc(_batch_norm_nchw), _nhwc(_group_norm_nchw)):
      loss = lambda x: jnp.vdot(fn(x), c)
      out += [jax.grad(loss)(x), jax.jvp(jax.grad(loss), (x,), (v,))[1],
              jax.grad(lambda x: jnp.vdot(jax.grad(loss)(x), v))(x)]
    return out
  columns = quantities()
  with nj.implementation("reference"):
    reference = quantities()
  for got, want in zip(columns, reference):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-6)


# ----------------------------------------------------------------- the backward's sums kernel

SUMS_KERNEL = "NormjaxColumnSums"
ROW_SUMS_KERNEL = "NormjaxRowSums"


@pytest.mark.skipif(not _native.NATIVE, reason="native kernel not built")
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_backward_calls_the_sums_kernels(dtype):
  x = rand((4, 6, 5, 32), dtype=dtype)
  grad_hlo = lambda fn, x: _hlo(jax.grad(lambda x: jnp.sum(fn(x).astype(F32) ** 2)), x)
  for fn in (_batch_norm, nj.instance_norm, lambda x: nj.group_norm(x, num_groups=8)):
    assert SUMS_KERNEL in grad_hlo(fn, x)
  for fn in (_batch_norm_nchw, _group_norm_nchw):
    hlo = grad_hlo(fn, rand((4, 32, 6, 5), dtype=dtype))
    assert ROW_SUMS_KERNEL in hlo and SUMS_KERNEL not in hlo


def _sums64(x, g, shift, offset):
  x, g = (np.asarray(np.asarray(a, np.float32), np.float64) for a in (x, g))
  d = x - (np.asarray(shift, np.float64) + np.asarray(offset, np.float64))[:, None]
  return g.sum(1), (g * d).sum(1), np.abs(g).sum(1), np.abs(g * d).sum(1)


@pytest.mark.slow   # 2^17-long sums: the default run keeps the other sums tests of this file
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("shape", [(2, 1 << 17, 8), (2, 1 << 17, 72), (6, 1 << 17)])
def test_sums_kernels_match_float64(dtype, shape):
  """`column_sums_p` (3-D) and `row_sums_p` (2-D), the native kernels where built, else their
  definition, against float64: x = 1e5 + N(0, 1) about its float32 mean split as shift +
  offset, a cotangent with a huge first element and a mean far from 0, 2^17 positions per
  entry (many blocks and chunks); both sums within 1e-6 of the float64 sum of absolute
  values."""
  rng = np.random.default_rng(11)
  x = (1e5 + rng.normal(size=shape)).astype(np.float32)
  g = (3.0 + rng.normal(size=x.shape)).astype(np.float32)
  g[:, 0] = 1e4
  x = np.asarray(jnp.asarray(x).astype(dtype).astype(F32))
  mean = x.astype(np.float64).mean(1)
  shift = mean.astype(np.float32)
  offset = (mean - shift).astype(np.float32)
  sums = _columns.column_sums_p if len(shape) == 3 else _columns.row_sums_p
  sg, sgx = jax.jit(sums.bind)(jnp.asarray(x).astype(dtype), jnp.asarray(g),
                               jnp.asarray(shift), jnp.asarray(offset))
  want_g, want_gx, abs_g, abs_gx = _sums64(x, g, shift, offset)
  assert np.all(np.abs(np.asarray(sg, np.float64) - want_g) <= 1e-6 * abs_g)
  assert np.all(np.abs(np.asarray(sgx, np.float64) - want_gx) <= 1e-6 * abs_gx)


@pytest.mark.parametrize("kind", ["batch", "instance", "group", "batch_nchw", "group_nchw"])
def test_gradients_match_float64_at_large_offsets(kind):
  """The input gradient of batch/instance/group norm (NHWC, and NCHW for the row kernels) at
  1e5 + N(0, 1) against the float64 closed form `rstd (g - E[g] - xhat E[g xhat])` (per
  statistic), within 1e-6 of its largest entry (both paths measured 0.9e-7 to 1.3e-7)."""
  rng = np.random.default_rng(12)
  x = (1e5 + rng.normal(size=(4, 16, 16, 72))).astype(np.float32)
  g = rng.normal(size=x.shape).astype(np.float32)
  group_nchw = lambda x: nj.group_norm(x, num_groups=8, channel_axis=1)
  fn = {"batch": _batch_norm, "instance": nj.instance_norm,
        "group": lambda x: nj.group_norm(x, num_groups=8),
        "batch_nchw": _nhwc(_batch_norm_nchw), "group_nchw": _nhwc(group_nchw)}[kind]
  kind = kind.replace("_nchw", "")
  got = np.asarray(jax.jit(jax.grad(lambda x: jnp.vdot(fn(x), g)))(jnp.asarray(x)), np.float64)
  x64, g64 = x.astype(np.float64), g.astype(np.float64)
  if kind == "group":
    x64, g64 = x64.reshape(4, 16, 16, 8, 9), g64.reshape(4, 16, 16, 8, 9)
  axes = {"batch": (0, 1, 2), "instance": (1, 2), "group": (1, 2, 4)}[kind]
  mean = lambda v: v.mean(axes, keepdims=True)
  rstd = 1.0 / np.sqrt(x64.var(axes, keepdims=True) + 1e-5)
  xhat = (x64 - mean(x64)) * rstd
  want = (rstd * (g64 - mean(g64) - xhat * mean(g64 * xhat))).reshape(x.shape)
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-6 * np.abs(want).max())
