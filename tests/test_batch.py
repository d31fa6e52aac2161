"""Ghost batch norm (`batch_norm(virtual_batch_size=k)`) against per-group float64 batch norm, and
the running statistics' `count` (`momentum=None`) with empty batches."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import normjax as nj
from tests import reference as ref
from tests.helpers import as_dtype, rand, slow_except, tolerance


@pytest.mark.parametrize("use_jit", slow_except([False, True], True))
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("shape,channel_axis,k", [((12, 5), -1, 4), ((8, 3, 3, 4), -1, 2),
                                                  ((6, 4, 5), 1, 3), ((6, 3), -1, 6)])
def test_ghost_batch_norm(use_jit, dtype, shape, channel_axis, k):
  c = shape[channel_axis]
  # Groups with different means and spreads, so per-group statistics differ from the batch's.
  x = np.concatenate([rand((k,) + shape[1:], 20 + g, loc=g, spread=1 + g)
                      for g in range(shape[0] // k)])
  x, x64 = as_dtype(x, dtype)
  scale, bias = rand((c,), 1), rand((c,), 2)
  mean, var = rand((c,), 3), np.abs(rand((c,), 4)) + 0.5
  stats = nj.BatchStats(jnp.asarray(mean), jnp.asarray(var), jnp.asarray(0, jnp.int32))

  def fn(x, stats):
    return nj.batch_norm(x, jnp.asarray(scale), jnp.asarray(bias), stats, train=True,
                         channel_axis=channel_axis, momentum=0.8, virtual_batch_size=k)
  y, new = (jax.jit(fn) if use_jit else fn)(x, stats)

  ys, means, vars_ = [], [], []
  for g in range(shape[0] // k):
    yg, mg, vg = ref.batch_norm(x64[g * k:(g + 1) * k], scale, bias, np.zeros(c), np.zeros(c),
                                train=True, channel_axis=channel_axis, momentum=0.0)
    ys.append(yg)
    means.append(mg)     # momentum 0: the group's own mean and variance
    vars_.append(vg)
  rtol, atol = tolerance(dtype)
  np.testing.assert_allclose(np.asarray(y, np.float64), np.concatenate(ys), rtol, atol)
  np.testing.assert_allclose(new.mean, 0.8 * mean + 0.2 * np.mean(means, 0), 1e-5, 1e-5)
  np.testing.assert_allclose(new.var, 0.8 * var + 0.2 * np.mean(vars_, 0), 1e-5, 1e-5)
  assert int(new.count) == 1 and y.dtype == dtype


def test_ghost_gradients_match_per_group_batch_norm():
  x = jnp.asarray(rand((8, 3), 5, loc=2.0))
  g = jnp.asarray(rand((8, 3), 6))
  stats = nj.init_batch_stats(3)

  def ghost(x):
    return jnp.sum(g * nj.batch_norm(x, None, None, stats, train=True, virtual_batch_size=4)[0])

  def per_group(x):
    ys = [nj.batch_norm(x[i:i + 4], None, None, stats, train=True)[0] for i in (0, 4)]
    return jnp.sum(g * jnp.concatenate(ys))
  np.testing.assert_allclose(jax.grad(ghost)(x), jax.grad(per_group)(x), 1e-5, 1e-5)


def test_ghost_is_ignored_in_evaluation():
  x = jnp.asarray(rand((8, 3), 7))
  stats = nj.init_batch_stats(3)
  y, _ = nj.batch_norm(x, None, None, stats, train=False, virtual_batch_size=4)
  np.testing.assert_array_equal(y, nj.batch_norm(x, None, None, stats, train=False)[0])


@pytest.mark.parametrize("k,error,match", [
    (3, ValueError, "must divide the batch axis 0"), (0, ValueError, "positive int"),
    (2.0, TypeError, "virtual_batch_size must be a positive int"),
])
def test_ghost_bad_sizes(k, error, match):
  with pytest.raises(error, match=match):
    nj.batch_norm(jnp.ones((8, 2)), None, None, nj.init_batch_stats(2), train=True,
                  virtual_batch_size=k)


@pytest.mark.parametrize("unbiased", [False, True])
def test_ghost_with_mask_skips_empty_groups(unbiased):
  """Masks within groups: each group's statistics from its True elements; a group with no True
  element in a channel is left out of that channel's mean over groups (it must not pull the
  running statistics towards 0); a channel empty everywhere keeps its running statistics."""
  k, c = 4, 3
  x = np.concatenate([rand((k, 2, c), 40 + g, loc=3.0 + g, spread=1 + g) for g in range(3)])
  mask = rand((12, 2, c), 43) > -0.5
  mask[4:8, :, 0] = False          # group 1 empty in channel 0
  mask[:, :, 2] = False            # channel 2 empty in every group
  mask[0, 0, 1] = True
  mean, var = rand((c,), 44), np.abs(rand((c,), 45)) + 0.5
  stats = nj.BatchStats(jnp.asarray(mean), jnp.asarray(var), jnp.asarray(0, jnp.int32))
  y, new = nj.batch_norm(jnp.asarray(x), None, None, stats, train=True, momentum=0.8,
                         mask=jnp.asarray(mask), virtual_batch_size=k,
                         unbiased_running_var=unbiased)
  group_means, group_vars = [], []
  for g in range(3):
    sl = slice(g * k, (g + 1) * k)
    yg, mg, vg = ref.batch_norm(x[sl], None, None, np.zeros(c), np.zeros(c), train=True,
                                momentum=0.0, mask=mask[sl], unbiased_running_var=unbiased)
    np.testing.assert_allclose(np.where(mask[sl], y[sl], 0), np.where(mask[sl], yg, 0),
                               2e-5, 2e-5)
    has = mask[sl].reshape(-1, c).any(0)
    group_means.append(np.where(has, mg, np.nan))
    group_vars.append(np.where(has, vg, np.nan))
  want_mean = np.array([0.8 * mean[i] + 0.2 * np.nanmean([m[i] for m in group_means])
                        for i in range(2)] + [mean[2]])
  want_var = np.array([0.8 * var[i] + 0.2 * np.nanmean([v[i] for v in group_vars])
                       for i in range(2)] + [var[2]])
  np.testing.assert_allclose(new.mean, want_mean, 1e-5, 1e-5)
  np.testing.assert_allclose(new.var, want_var, 1e-5, 1e-5)
  assert np.all(np.isfinite(np.asarray(y)))


@pytest.mark.parametrize("vmapped", [False, True])
def test_evaluation_with_non_finite_running_variance_gives_nan_channels(vmapped):
  """A channel whose running variance is inf or NaN normalizes to NaN (as in training), the
  others to `(x - mean) / sqrt(var + eps) * scale + bias`, also under `vmap`."""
  rng = np.random.default_rng(21)
  x = rng.normal(size=(2, 5, 4)).astype(np.float32)
  mean = np.array([0.5, -1.0, 2.0, 0.0], np.float32)
  scale, bias = np.full(4, 2.0, np.float32), np.full(4, 0.25, np.float32)
  finite = np.array([1.5, 0.5, 2.0, 1.0], np.float32)
  bad = np.array([1.5, np.inf, 2.0, np.nan], np.float32)
  want = (x.astype(np.float64) - mean) / np.sqrt(finite.astype(np.float64) + 1e-5) * 2.0 + 0.25

  def evaluate(x, var):
    stats = nj.BatchStats(jnp.asarray(mean), var, jnp.zeros((), jnp.int32))
    return nj.batch_norm(x, jnp.asarray(scale), jnp.asarray(bias), stats, train=False)[0]
  run = jax.jit(jax.vmap(evaluate, in_axes=(0, None)) if vmapped else evaluate)
  y = np.asarray(run(jnp.asarray(x), jnp.asarray(finite)))
  np.testing.assert_allclose(y, want, rtol=1e-6, atol=1e-6)
  y = np.asarray(run(jnp.asarray(x), jnp.asarray(bad)))
  assert np.all(np.isnan(y[..., [1, 3]]))
  np.testing.assert_allclose(y[..., [0, 2]], want[..., [0, 2]], rtol=1e-6, atol=1e-6)


def _fused_computations(text):
  """{name: body} of the fused computations in compiled HLO text."""
  return {m.group(1): m.group(2) for m in re.finditer(
      r"^%?(\S+) [^\n]*\{\n(.*?)^\}", text, flags=re.M | re.S)}


def test_evaluation_loop_over_x_takes_the_per_channel_factor_from_outside():
  """The compiled evaluation forward is one elementwise loop over `x` whose per-channel factor
  (`rsqrt`, the non-finite check) is computed once per channel outside it, as in flax's
  program: no `rsqrt`, `compare` or `select` per element of `x` (`rstd` picks the NaN
  before the `rsqrt`; a select after it was fused into the loop)."""
  x = jnp.zeros((4, 8, 8, 16), jnp.float32)
  c = jnp.ones(16, jnp.float32)

  def evaluate(x, scale, bias, mean, var):
    stats = nj.BatchStats(mean, var, jnp.zeros((), jnp.int32))
    return nj.batch_norm(x, scale, bias, stats, train=False)[0]
  text = jax.jit(evaluate).lower(x, c, c, c, c).compile().as_text()
  entry = text.split("ENTRY", 1)[1]
  loops = re.findall(r"= f32\[4,8,8,16\]\S* fusion\(.*calls=%(\S+?)[,\s]", entry)
  assert len(loops) == 1, entry
  body = _fused_computations(text)[loops[0]]
  for op in ("rsqrt(", "compare(", "select("):
    assert op not in body, (op, body)


def _padded_batches():
  """[N, T, C] batches with padding masks `[N, T, 1]` shared by the channels: one with data,
  one all padding, an empty one `(0, T, C)`, one partly padded, and one without a mask."""
  out = []
  for i, keep in enumerate([None, 0, None, 3, None]):
    n = 0 if i == 2 else 4
    x = rand((n, 5, 3), 30 + i, loc=10.0 * i, spread=1.0 + i)
    mask = None if keep is None else np.arange(5)[None, :, None] < np.full((n, 1, 1), keep)
    out.append((x, mask))
  return out


@pytest.mark.parametrize("fn", ["batch_norm", "batch_renorm"])
def test_cumulative_average_skips_batches_without_data(implementation, fn):
  """`momentum=None` over batches whose padding leaves nothing (all-False mask) or that are
  empty: those change neither `count` nor any statistic, so the running mean and var are the
  float64 average over the batches with data (PyTorch's where every batch has data). Before,
  both were counted and the next batch weighed the running values as a batch seen."""
  call = getattr(nj, fn)
  step = jax.jit(lambda x, s, m: call(x, None, None, s, train=True, momentum=None, mask=m))
  stats, means, vars_ = nj.init_batch_stats(3), [], []
  for x, mask in _padded_batches():
    _, stats = step(jnp.asarray(x), stats, None if mask is None else jnp.asarray(mask))
    if mask is not None and not mask.any() or x.size == 0:
      continue
    m = np.broadcast_to(True if mask is None else mask, x.shape)
    m0, v0, _ = ref.moments(x, (0, 1), m)
    means.append(m0.ravel())
    vars_.append(v0.ravel())
  assert int(stats.count) == len(means) == 3
  np.testing.assert_allclose(stats.mean, np.mean(means, 0), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(stats.var, np.mean(vars_, 0), rtol=1e-5)


@pytest.mark.parametrize("momentum", [None, 0.9])
def test_empty_batch_moves_no_state(implementation, momentum):
  stats = nj.BatchStats(jnp.asarray([1.0, 2.0]), jnp.asarray([3.0, 4.0]), jnp.asarray(5))
  y, new = nj.batch_norm(jnp.zeros((0, 2)), None, None, stats, train=True, momentum=momentum)
  assert y.shape == (0, 2)
  for got, want in zip(new, stats):
    np.testing.assert_array_equal(got, want)
