"""Numerics beyond the anchors: large means, low precision, degenerate inputs, gradients."""


import math
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.test_util import check_grads

import normjax as nj
from normjax._src.kernels import moments as _columns
from normjax._src.numerics import moments as _moments
from tests import reference as ref
from tests.helpers import fast_compiles, rand, slow_except


def _bn_train(x, **kw):
  y, _ = nj.batch_norm(x, None, None, nj.init_batch_stats(x.shape[-1]), train=True, **kw)
  return y


LARGE_MEAN_CASES = {
    "layer_norm": (lambda x: nj.layer_norm(x), lambda x: ref.layer_norm(x)),
    "batch_norm": (_bn_train, lambda x: ref.batch_norm(x, None, None, np.zeros(x.shape[-1]),
                                                      np.ones(x.shape[-1]), train=True)[0]),
    "group_norm": (lambda x: nj.group_norm(x, num_groups=4),
                   lambda x: ref.group_norm(x, num_groups=4)),
    "instance_norm": (lambda x: nj.instance_norm(x), lambda x: ref.instance_norm(x)),
}


@pytest.mark.parametrize("name", sorted(LARGE_MEAN_CASES))
@pytest.mark.parametrize("offset", [1e4, 1e5])
@pytest.mark.parametrize("shape", slow_except([(16, 8, 64), (3, 7, 9, 256)], (16, 8, 64)))
def test_large_mean_float32(name, offset, shape):
  """`offset + N(0, 1)` in float32 normalizes to within 1e-4 of float64 (the input's own values).

  (3, 7, 9, 256) reduces over counts that are not powers of two, where `sum / n` becomes
  `sum * (1 / n)`, which XLA:CPU could contract into an FMA when recomputed in the output loop
  (a shift differing from the one the sums used by up to half an ulp of the mean).
  """
  ours, reference = LARGE_MEAN_CASES[name]
  x = rand(shape, 1, loc=offset)
  err = np.abs(np.asarray(jax.jit(ours)(jnp.asarray(x)), np.float64)
               - reference(x.astype(np.float64))).max()
  assert err < 1e-4, f"{name}: max error {err:.2e} at offset {offset:g}"


def _branch_inputs():
  """A well-conditioned batch, an ill-conditioned one (`1e5 + N(0, 1)`), and both rows mixed."""
  good = rand((8, 512), 11, loc=0.5, spread=2.0)          # mean**2 / var ~ 0.06: one pass
  bad = rand((8, 512), 12, loc=1e5)                        # mean**2 / var ~ 1e10: shifted pass
  mixed = np.where(np.arange(8)[:, None] % 2 == 0, good, bad).astype(np.float32)
  return {"well_conditioned": (good, True), "ill_conditioned": (bad, False),
          "mixed": (mixed, False)}


@pytest.fixture
def xla_moments():
  """The numerics' `moments` on its XLA path (the conditional variance, which masks, named axes and
  float16/float64 input take), not the one-read kernels of `_columns` that plain float32
  reductions like `moments(x, (1,))` are otherwise handed to."""
  with nj.implementation("reference"):
    yield


@pytest.mark.usefixtures("xla_moments")
@pytest.mark.parametrize("case", slow_except(["well_conditioned", "ill_conditioned", "mixed"],
                                              "mixed"))
@pytest.mark.parametrize("use_jit", [True, False])
def test_conditional_fast_path_both_branches(case, use_jit):
  """The one-pass variance is used only when every row is well conditioned; both agree with
  float64 (layer norm over rows, batch norm over the batch axis, moments directly)."""
  x, one_pass = _branch_inputs()[case]
  maybe = jax.jit if use_jit else (lambda f: f)
  stats = maybe(lambda x: _moments.moments(x, (1,)))(jnp.asarray(x))
  # The branch taken: the one-pass result has a zero shift, the shifted pass the pass-1 mean.
  assert bool(np.all(np.asarray(stats.shift) == 0)) == one_pass
  mean, var, _ = ref.moments(x, (1,))
  np.testing.assert_allclose(np.asarray(stats.mean, np.float64), mean, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(np.asarray(stats.var, np.float64), var, rtol=1e-4)
  y = np.asarray(maybe(nj.layer_norm)(jnp.asarray(x)), np.float64)
  assert np.abs(y - ref.layer_norm(x)).max() < 1e-4
  # Columns of the transposed input: per-channel statistics over the batch axis.
  xt = np.ascontiguousarray(x.T)
  y = np.asarray(maybe(_bn_train)(jnp.asarray(xt)), np.float64)
  expected = ref.batch_norm(xt, None, None, np.zeros(8), np.ones(8), train=True)[0]
  assert np.abs(y - expected).max() < 1e-4
  # The gradient (the JVP rule calls the same `moments`) matches the float64 closed form.
  w = np.linspace(-1.0, 1.0, 512)
  g = maybe(jax.grad(lambda x: jnp.sum(nj.layer_norm(x) * jnp.asarray(w[None], jnp.float32))))(
      jnp.asarray(x))
  rstd = 1.0 / np.sqrt(var + 1e-5)
  xhat = (x.astype(np.float64) - mean) * rstd
  expected = rstd * (w - w.mean() - xhat * (xhat * w).mean(axis=1, keepdims=True))
  np.testing.assert_allclose(np.asarray(g, np.float64), expected, atol=1e-4)


@pytest.mark.usefixtures("xla_moments")
def test_conditional_fast_path_threshold():
  """Rows just inside `mean**2 <= TAU * var` take the one pass, rows just outside the second."""
  base = rand((4, 256), 13)
  base = (base - base.mean(1, keepdims=True)) / base.std(1, keepdims=True)   # var 1, mean 0
  for ratio, one_pass in ((0.5 * _moments.TAU, True), (2.0 * _moments.TAU, False)):
    x = (base + np.sqrt(ratio)).astype(np.float32)
    stats = _moments.moments(jnp.asarray(x), (1,))
    assert bool(np.all(np.asarray(stats.shift) == 0)) == one_pass
    np.testing.assert_allclose(np.asarray(stats.var), 1.0, rtol=1e-5)
  # Constant rows with a non-zero mean (var 0) take the shifted pass and give exactly 0.
  stats = _moments.moments(jnp.full((2, 64), 3.0, jnp.float32), (1,))
  assert not np.all(np.asarray(stats.shift) == 0)
  np.testing.assert_array_equal(np.asarray(stats.var), 0.0)


@pytest.mark.parametrize("name", ["batch_norm", "instance_norm"])
def test_large_mean_float32_under_vmap(name):
  """Under `jax.vmap` the fast-path cond becomes a select; the shifted pass stays accurate."""
  ours, reference = LARGE_MEAN_CASES[name]
  x = rand((2, 3, 7, 9, 256), 2, loc=1e5)
  y = np.asarray(jax.jit(jax.vmap(ours))(jnp.asarray(x)), np.float64)
  for i in range(x.shape[0]):
    err = np.abs(y[i] - reference(x[i].astype(np.float64))).max()
    assert err < 1e-4, f"{name}: max error {err:.2e} in example {i}"


def test_fast_variance_is_documented_as_inaccurate():
  """The opt-in one-pass formula does lose the large-mean case (why it is not the default)."""
  x = rand((16, 256), 2, loc=1e4)
  fast = np.asarray(nj.layer_norm(jnp.asarray(x), fast_variance=True), np.float64)
  assert np.abs(fast - ref.layer_norm(x)).max() > 1e-2
  # ... and agrees with the stable default on well-scaled data.
  x = rand((16, 256), 3)
  np.testing.assert_allclose(nj.layer_norm(jnp.asarray(x), fast_variance=True),
                             ref.layer_norm(x), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("dtype", slow_except([jnp.bfloat16, jnp.float16], jnp.bfloat16))
def test_low_precision_accumulates_in_float32(dtype):
  """bf16/fp16 in, same dtype out, with statistics as accurate as the input allows."""
  x = jnp.asarray(rand((4, 4096), 4, loc=3.0), dtype)   # a long row: bf16 sums would drift
  y = nj.layer_norm(x)
  assert y.dtype == dtype
  expected = ref.layer_norm(np.asarray(x.astype(jnp.float32), np.float64))
  # One rounding of the output to the dtype, no more.
  tol = 2 * float(jnp.finfo(dtype).eps) * (np.abs(expected) + 1)
  assert np.all(np.abs(np.asarray(y.astype(jnp.float32), np.float64) - expected) <= tol)
  _, stats = nj.batch_norm(x.reshape(64, 256), None, None, nj.init_batch_stats(256), train=True)
  assert stats.mean.dtype == jnp.float32


def test_float64_input_keeps_float64_statistics():
  with jax.enable_x64(True):
    x = jnp.asarray(rand((8, 32), 5, loc=1e8).astype(np.float64))
    y = nj.layer_norm(x)
    assert y.dtype == jnp.float64
    np.testing.assert_allclose(np.asarray(y), ref.layer_norm(np.asarray(x)), atol=1e-7)


ALL_VARIANTS = {
    "batch_norm": lambda x, s, b, **kw: nj.batch_norm(x, s, b, nj.init_batch_stats(x.shape[-1]),
                                                      train=True, **kw)[0],
    "layer_norm": lambda x, s, b, **kw: nj.layer_norm(x, s, b, **kw),
    "rms_norm": lambda x, s, b, **kw: nj.rms_norm(x, s, **kw),
    "instance_norm": lambda x, s, b, **kw: nj.instance_norm(x, s, b, **kw),
    "group_norm": lambda x, s, b, **kw: nj.group_norm(x, s, b, num_groups=2, **kw),
}


@pytest.mark.parametrize("name", slow_except(sorted(ALL_VARIANTS), "layer_norm", "instance_norm"))
def test_zero_variance_is_finite(name):
  fn = ALL_VARIANTS[name]
  x = jnp.full((4, 3, 4), 7.0)
  s, b = jnp.full((4,), 1.5), jnp.full((4,), 0.5)
  loss = lambda x, s, b: jnp.sum(fn(x, s, b) ** 2)
  y = fn(x, s, b)
  grads = jax.grad(loss, argnums=(0, 1, 2))(x, s, b)
  assert np.all(np.isfinite(y))
  assert all(np.all(np.isfinite(g)) for g in grads)
  if name != "rms_norm":   # constant input normalizes to exactly the bias
    np.testing.assert_allclose(y, np.broadcast_to(0.5, x.shape), atol=1e-6)


@pytest.mark.parametrize("name", slow_except(
    ["layer_norm", "rms_norm", "instance_norm", "group_norm", "batch_norm"],
    "rms_norm", "group_norm"))
def test_fully_masked_rows_are_finite(name):
  fn = ALL_VARIANTS[name]
  x = jnp.asarray(rand((4, 3, 4), 6, loc=2.0))
  mask = np.ones((4, 3, 4), bool)
  mask[1] = False                   # a whole example (row / instance / group) is padding
  mask[:, :, 2] = False if name == "batch_norm" else mask[:, :, 2]   # a whole channel
  mask = jnp.asarray(mask)
  s, b = jnp.ones((4,)), jnp.zeros((4,))
  y = fn(x, s, b, mask=mask)
  g = jax.grad(lambda x: jnp.sum(fn(x, s, b, mask=mask) ** 2))(x)
  assert np.all(np.isfinite(y)) and np.all(np.isfinite(g))


def test_fully_masked_channel_keeps_running_stats():
  x = jnp.asarray(rand((6, 3), 7, loc=4.0))
  mask = jnp.asarray(np.array([[True, False, True]] * 6))
  stats = nj.BatchStats(jnp.asarray([1.0, 2.0, 3.0]), jnp.asarray([4.0, 5.0, 6.0]),
                        jnp.asarray(0, jnp.int32))
  _, new = nj.batch_norm(x, None, None, stats, train=True, momentum=0.5, mask=mask)
  assert float(new.mean[1]) == 2.0 and float(new.var[1]) == 5.0
  assert float(new.mean[0]) != 1.0


GRAD_CASES = {
    "batch_norm": dict(fn=ALL_VARIANTS["batch_norm"], shape=(5, 3)),
    "batch_norm_nchw": dict(fn=lambda x, s, b: nj.batch_norm(
        x, s, b, nj.init_batch_stats(3), train=True, channel_axis=1)[0], shape=(2, 3, 4)),
    "batch_norm_eval": dict(fn=lambda x, s, b: nj.batch_norm(
        x, s, b, nj.BatchStats(jnp.ones(3), 2 * jnp.ones(3), jnp.zeros((), jnp.int32)),
        train=False)[0], shape=(5, 3)),
    "layer_norm": dict(fn=ALL_VARIANTS["layer_norm"], shape=(3, 5)),
    "layer_norm_2axes": dict(fn=lambda x, s, b: nj.layer_norm(x, s[:, None] * jnp.ones((3, 4)),
                                                              None, axis=(1, 2)),
                             shape=(2, 3, 4)),
    "rms_norm": dict(fn=ALL_VARIANTS["rms_norm"], shape=(3, 5)),
    "instance_norm": dict(fn=ALL_VARIANTS["instance_norm"], shape=(2, 4, 3)),
    "group_norm": dict(fn=lambda x, s, b: nj.group_norm(x, s, b, num_groups=2), shape=(2, 3, 4)),
    "group_norm_masked": dict(fn=lambda x, s, b: nj.group_norm(
        x, s, b, num_groups=2, mask=jnp.arange(12).reshape(1, 3, 4) % 5 != 0), shape=(2, 3, 4)),
}


@pytest.mark.parametrize("name", slow_except(sorted(GRAD_CASES), "rms_norm", "batch_norm_eval"))
def test_gradients_second_order(name):
  """Forward and reverse mode, first and second order, against finite differences (float64)."""
  case = GRAD_CASES[name]
  with jax.enable_x64(True), fast_compiles():
    x = jnp.asarray(rand(case["shape"], 8, loc=1.0).astype(np.float64))
    c = case["shape"][-1] if not name.endswith(("nchw", "2axes")) else 3
    s = jnp.asarray(1.0 + rand((c,), 9).astype(np.float64) * 0.3)
    b = jnp.asarray(rand((c,), 10).astype(np.float64))
    w = jnp.asarray(rand(case["shape"], 11).astype(np.float64))
    loss = jax.jit(lambda x, s, b: jnp.sum(jnp.sin(case["fn"](x, s, b)) * w))
    check_grads(loss, (x, s, b), order=2, modes=("fwd", "rev"), atol=1e-5, rtol=1e-5)
    # jax.hessian (forward over reverse) runs and is symmetric.
    h = jax.jit(jax.hessian(lambda x: loss(x, s, b)))(x)
    h = np.asarray(h).reshape(x.size, x.size)
    np.testing.assert_allclose(h, h.T, atol=1e-8)


def test_layer_norm_gradient_matches_closed_form():
  """d/dx of sum(w * LN(x)) = rstd * (g - mean(g) - xhat * mean(g * xhat)), g = w * scale."""
  x = rand((3, 7), 12, loc=2.0).astype(np.float64)
  w = rand((3, 7), 13).astype(np.float64)
  scale = rand((7,), 14).astype(np.float64)
  grad = jax.grad(lambda x: jnp.sum(nj.layer_norm(x, jnp.asarray(scale, jnp.float32)) * w))(
      jnp.asarray(x, jnp.float32))
  mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
  rstd = 1 / np.sqrt(var + 1e-5)
  xhat, g = (x - mean) * rstd, w * scale
  expected = rstd * (g - g.mean(-1, keepdims=True) - xhat * (g * xhat).mean(-1, keepdims=True))
  np.testing.assert_allclose(grad, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", sorted(ALL_VARIANTS))
def test_jit_and_eager_agree(name):
  fn = ALL_VARIANTS[name]
  x = jnp.asarray(rand((4, 3, 4), 15, loc=-1.0))
  s, b = jnp.asarray(rand((4,), 16)), jnp.asarray(rand((4,), 17))
  np.testing.assert_allclose(jax.jit(fn)(x, s, b), fn(x, s, b), rtol=1e-6, atol=1e-6)
  ge = jax.grad(lambda x: jnp.sum(fn(x, s, b) ** 3))(x)
  gj = jax.jit(jax.grad(lambda x: jnp.sum(fn(x, s, b) ** 3)))(x)
  np.testing.assert_allclose(gj, ge, rtol=1e-5, atol=1e-5)


def test_training_step_does_not_retrace():
  """A jitted optax step threading BatchStats compiles once, whatever the values."""
  optimizer = optax.sgd(0.1)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(params, stats, opt_state, x):
    def loss_fn(params):
      y, new_stats = nj.batch_norm(x, params["scale"], params["bias"], stats, train=True,
                                   momentum=0.9)
      return jnp.mean((y - 1.0) ** 2), new_stats
    (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = optimizer.update(grads, opt_state)
    return optax.apply_updates(params, updates), new_stats, opt_state, loss

  chex.clear_trace_counter()
  params = {"scale": jnp.ones(3), "bias": jnp.zeros(3)}
  stats, opt_state = nj.init_batch_stats(3), optimizer.init(params)
  losses = []
  for i in range(4):
    params, stats, opt_state, loss = step(params, stats, opt_state, jnp.asarray(rand((8, 3), i)))
    losses.append(float(loss))
  assert int(stats.count) == 4
  assert losses[-1] < losses[0]


# ----------------------------------------------------------------- one read on GPUs and TPUs

def _reductions_over(fn, args, platform, size):
  """How many `stablehlo.reduce` ops in `fn`'s module lowered for `platform` read an operand
  of `size` elements (one variadic reduction counts once)."""
  text = jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()
  count = 0
  for line in text.splitlines():
    if re.search(r"= stablehlo\.reduce\(", line):
      signature = re.search(r":\s*\((.*?)\)\s*->", line)
      assert signature, line
      shapes = re.findall(r"tensor<((?:\d+x)+)[a-z]", signature.group(1))
      count += any(math.prod(int(d) for d in s[:-1].split("x")) == size for s in shapes)
  return count


def _module_pairs():
  import flax.linen as nn

  import normjax.linen as njl
  return {
      "layer": (njl.LayerNorm(), nn.LayerNorm()), "rms": (njl.RMSNorm(), nn.RMSNorm()),
      "batch": (njl.BatchNorm(use_running_average=False),
                nn.BatchNorm(use_running_average=False)),
      "group": (njl.GroupNorm(num_groups=4), nn.GroupNorm(num_groups=4)),
      "instance": (njl.InstanceNorm(), nn.InstanceNorm()),
  }


def _forward_and_backward_counts(module, x, g, platform):
  variables = module.init(jax.random.key(0), x)
  params = variables["params"]
  rest = {k: v for k, v in variables.items() if k != "params"}

  def apply(x, params):
    out = module.apply({"params": params, **rest}, x, mutable=list(rest))
    return out[0] if isinstance(out, tuple) else out

  def backward(x, params, g):   # the cotangent is an argument (a constant one folds)
    _, vjp = jax.vjp(apply, x, params)
    return vjp(g)
  return (_reductions_over(apply, (x, params), platform, x.size),
          _reductions_over(backward, (x, params, g), platform, x.size))


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
@pytest.mark.parametrize("name", ["layer", "rms", "batch", "group", "instance"])
def test_reads_of_x_lowered_for_gpu_and_tpu_at_most_flax(platform, name):
  """On the code GPUs and TPUs run (the jax.numpy path), the statistics read `x` once: the
  module lowered for the platform reduces over `x`'s shape at most as often as flax's, forward
  and backward (before the one-read statistics: 3 and 4 forward against flax's 2)."""
  x = jnp.asarray(rand((4, 8, 8, 16), seed=1))
  g = jnp.asarray(rand((4, 8, 8, 16), seed=2))
  ours, flax_module = _module_pairs()[name]
  with nj.implementation("reference"):
    forward, backward = _forward_and_backward_counts(ours, x, g, platform)
  flax_forward, flax_backward = _forward_and_backward_counts(flax_module, x, g, platform)
  assert forward == 1, forward                  # one variadic reduction (RMS: one sum)
  assert forward <= flax_forward, (forward, flax_forward)
  assert backward <= flax_backward, (backward, flax_backward)


def _partial_stats(x, axes, mask=None):
  p = jax.jit(lambda x: _moments.welford(x, axes, mask))(jnp.asarray(x))
  n = np.maximum(np.asarray(p.n), 1)
  mean = np.asarray(p.m, np.float64) + np.asarray(p.c, np.float64)
  var = (np.asarray(p.m2, np.float64) + np.asarray(p.c2, np.float64)) / n
  return np.asarray(p.n), mean, var


@pytest.mark.parametrize("kind", ["offset_1e5", "outlier_first", "constant_large",
                                  "masked", "size_1"])
def test_one_read_statistics_match_float64(kind):
  """`welford` (the one-read statistics GPUs and TPUs run) against float64 on adversarial
  rows: mean and variance to float32 rounding of the statistic (XLA:CPU runs the variadic
  reduction as one sequential loop, the hardest order for a running mean)."""
  rng = np.random.default_rng(0)
  x = (rng.standard_normal((6, 4099)) + 1e5).astype(np.float32)
  mask = None
  if kind == "outlier_first":
    x = rng.standard_normal((6, 4099)).astype(np.float32)
    x[:, 0] = 1e8
  elif kind == "constant_large":
    x = np.full((6, 4099), 1e9 + 64, np.float32)
  elif kind == "masked":
    mask = rng.random((6, 4099)) < 0.3
    mask[0] = False   # an empty row: count 0, mean 0, variance 0
  elif kind == "size_1":
    x = x[:, :1]
  n, mean, var = _partial_stats(x, (1,), None if mask is None else jnp.asarray(mask))
  x64 = x.astype(np.float64)
  w = np.ones_like(x64, bool) if mask is None else mask
  want_n = w.sum(axis=1, keepdims=True)
  want_mean = np.where(w, x64, 0).sum(axis=1, keepdims=True) / np.maximum(want_n, 1)
  want_var = np.where(w, (x64 - want_mean) ** 2, 0).sum(axis=1, keepdims=True) / np.maximum(
      want_n, 1)
  np.testing.assert_array_equal(n, want_n)
  np.testing.assert_allclose(mean, want_mean, rtol=1e-7, atol=0)
  np.testing.assert_allclose(var, want_var, rtol=1e-6, atol=1e-6 * want_var.max() + 1e-30)
  if kind == "constant_large":
    assert (var == 0).all()


@pytest.mark.slow
def test_one_read_statistics_over_2_24_elements():
  """2**25 elements in one sequential loop: without the renormalized compensations the
  variance was 1e-3 off and the mean 3e-5 (a float32 count stops at 2**24)."""
  x = (np.random.default_rng(1).standard_normal(1 << 25, dtype=np.float32) + np.float32(3.0))
  n, mean, var = _partial_stats(x, (0,))
  x64 = x.astype(np.float64)
  assert int(n[0]) == 1 << 25
  np.testing.assert_allclose(mean[0], x64.mean(), rtol=1e-9)
  np.testing.assert_allclose(var[0], x64.var(), rtol=1e-7)


def test_combine_has_an_identity_on_either_side():
  """An empty part (what a compiler pads a reduction with) leaves a part as it is, also with
  a huge mean (no `inf * 0`)."""
  part = _moments.Partial(jnp.int32(7), jnp.float32(3e38), jnp.float32(1e31),
                          jnp.float32(2.5), jnp.float32(1e-8))
  empty = _moments.Partial(jnp.int32(0), *(jnp.float32(0),) * 4)
  for got in (_moments.combine(part, empty), _moments.combine(empty, part)):
    for a, b in zip(got, part):
      assert float(a) == float(b), (got, part)


def test_one_read_nonfinite_rows_are_nan_and_others_exact():
  """A NaN or Inf in a row gives that row NaN statistics (NaN outputs, as on CPU) and leaves
  the other rows exact."""
  x = (np.random.default_rng(2).standard_normal((3, 257)) + 1e4).astype(np.float32)
  x[0, 5], x[1, 0] = np.nan, np.inf
  _, mean, var = _partial_stats(x, (1,))
  assert np.isnan(var[:2]).all()
  np.testing.assert_allclose(var[2], x[2].astype(np.float64).var(), rtol=1e-6)
  np.testing.assert_allclose(mean[2], x[2].astype(np.float64).mean(), rtol=1e-7)


@pytest.mark.skipif(jax.device_count() < 4, reason="needs 4 devices (conftest's XLA_FLAGS)")
@pytest.mark.parametrize("groups", [None, (2, 2)])
def test_one_read_statistics_merge_across_devices_and_groups(groups):
  """The one-read statistics merged across devices (`shard_map` over 4, `psum` of the
  parts' shifted sums) and channel groups equal float64's over the whole batch, at a 1e5
  offset with uneven masks (a device with no counted element included)."""
  from jax.sharding import Mesh, PartitionSpec as P

  from normjax._src.numerics import platform
  x = rand((8, 6, 4), seed=3, loc=1e5)
  mask = rand((8, 6, 4), seed=4) > -0.5
  mask[:2] = False   # device 0 counts nothing
  mesh = Mesh(np.array(jax.devices()[:4]), ("d",))

  def local(x, mask):
    m = _moments.moments(x, (0, 1), mask=mask, axis_name="d", groups=groups)
    return (m.shift, m.offset), m.var, m.count

  with platform.lowered_for("cuda"):
    fn = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P("d"), P("d")),
                               out_specs=((P(), P()), P(), P()), check_vma=False))
    (shift, offset), var, count = fn(jnp.asarray(x), jnp.asarray(mask))
  mean = np.asarray(shift, np.float64) + np.asarray(offset, np.float64)
  x64 = np.where(mask, x.astype(np.float64), np.nan)
  if groups is not None:   # channels (axis 2) in groups of 2
    x64 = np.repeat(x64.reshape(8, 6, 2, 2).transpose(0, 1, 3, 2).reshape(8, 12, 2), 2, axis=2)
  want_mean = np.nanmean(x64, axis=(0, 1), keepdims=True)
  want_var = np.nanvar(x64, axis=(0, 1), keepdims=True)
  np.testing.assert_allclose(mean, want_mean, rtol=1e-9)
  np.testing.assert_allclose(np.asarray(var, np.float64), want_var, rtol=1e-5)
  assert np.asarray(count).min() > 0
