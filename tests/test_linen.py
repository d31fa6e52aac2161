"""normjax.linen against flax.linen's modules (same variables in, same outputs and batch_stats
out) and against float64 NumPy references for what flax lacks or gets wrong."""

import contextlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax_helpers import SHAPE, assert_close, data, permissive, random_init, randomize
from flax_helpers import fast_compiles  # noqa: F401  (module-scoped autouse fixture)

import normjax.linen as njnn
from tests.helpers import slow_except


CASES = [  # (module, attributes, masked)
    ("BatchNorm", {}, True),
    ("BatchNorm", dict(axis=1), False),                       # channels-first
    ("BatchNorm", dict(axis=(1, 3)), True),                   # several feature axes
    ("BatchNorm", dict(momentum=0.9, epsilon=1e-3, use_bias=False), False),
    ("LayerNorm", {}, True),
    ("LayerNorm", dict(reduction_axes=(1, 2, 3), use_bias=False), False),
    ("LayerNorm", dict(reduction_axes=(1, 2), feature_axes=-1), True),  # features not reduced
    ("LayerNorm", dict(reduction_axes=(-2, -1), feature_axes=(-2, -1)), False),
    ("LayerNorm", dict(reduction_axes=(1, 2, 3), feature_axes=(1, 3), epsilon=1e-3), False),
    ("RMSNorm", {}, True),
    ("RMSNorm", dict(reduction_axes=(1, 2), feature_axes=(2, 3)), False),
    ("InstanceNorm", {}, True),
    ("InstanceNorm", dict(feature_axes=1), False),
    ("InstanceNorm", dict(feature_axes=(2, 3), use_scale=False), False),
    ("GroupNorm", dict(num_groups=4), True),
    ("GroupNorm", dict(num_groups=None, group_size=2, epsilon=1e-3, use_scale=False), False),
    ("GroupNorm", dict(num_groups=2, reduction_axes=(2, 3)), True),  # axes 0, 1 per-example
]


@pytest.mark.parametrize("name,kw,masked", slow_except(CASES, CASES[0], CASES[14], unpack=True),
                         ids=[f"{n}-{kw}{'-mask' * m}" for n, kw, m in CASES])
def test_matches_flax_init_and_training_steps(name, kw, masked):
  keys = jax.random.split(jax.random.key(2), 5)
  x0, _ = data(keys[0])
  call = dict(use_running_average=False) if name == "BatchNorm" else {}
  # init: the same tree as flax's, value for value, also with random initializers.
  inits = dict(scale_init=random_init(1.0))
  inits.update({} if name == "RMSNorm" else dict(bias_init=random_init(0.0)))
  with permissive():
    theirs = getattr(nn, name)(**kw, **inits).init(keys[1], x0, **call)
  ours = getattr(njnn, name)(**kw, **inits).init(keys[1], x0, **call)
  assert jax.tree.structure(ours) == jax.tree.structure(theirs)
  jax.tree.map(np.testing.assert_array_equal, ours, theirs)
  assert jax.tree.map(lambda a: a.dtype, ours) == jax.tree.map(lambda a: a.dtype, theirs)

  def step(module, ctx):
    def run(variables, x, mask, train):   # eager: primitives compile once for all the cases
      with ctx():
        if name != "BatchNorm":
          return module.apply(variables, x, mask=mask), {}
        return module.apply(variables, x, use_running_average=not train, mask=mask,
                            mutable=["batch_stats"])
    return run

  theirs_fn = step(getattr(nn, name)(**kw), permissive)
  ours_fn = step(getattr(njnn, name)(**kw), contextlib.nullcontext)
  theirs = ours = randomize(theirs, keys[2])   # random (not default) values
  for key in jax.random.split(keys[3], 3):     # three training steps
    x, mask = data(key)
    mask = mask if masked else None
    y_theirs, upd_theirs = theirs_fn(theirs, x, mask, True)
    y_ours, upd_ours = ours_fn(ours, x, mask, True)
    assert y_ours.shape == x.shape and y_ours.dtype == y_theirs.dtype
    assert_close(y_ours, y_theirs)
    assert_close(upd_ours, upd_theirs)
    theirs, ours = {**theirs, **upd_theirs}, {**ours, **upd_ours}
  x, mask = data(keys[4])
  y_theirs, _ = theirs_fn(theirs, x, mask if masked else None, False)   # evaluation
  y_ours, upd = ours_fn(ours, x, mask if masked else None, False)
  assert_close(y_ours, y_theirs)
  if name == "BatchNorm":
    assert_close(upd, {"batch_stats": ours["batch_stats"]}, tol=0)   # unchanged in eval


DTYPE_CASES = [
    ("BatchNorm", {}, jnp.bfloat16),                         # float32 params: float32 out
    ("BatchNorm", dict(dtype=jnp.bfloat16), jnp.float32),
    ("BatchNorm", dict(force_float32_reductions=False, param_dtype=jnp.bfloat16), jnp.bfloat16),
    ("LayerNorm", dict(dtype=jnp.bfloat16), jnp.bfloat16),
    ("LayerNorm", dict(param_dtype=jnp.bfloat16), jnp.bfloat16),
    ("RMSNorm", {}, jnp.bfloat16),
    ("InstanceNorm", dict(dtype=jnp.bfloat16), jnp.float32),
    ("GroupNorm", dict(num_groups=4), jnp.bfloat16),
]


@pytest.mark.parametrize("name,kw,x_dtype", slow_except(DTYPE_CASES, *DTYPE_CASES[::3], unpack=True))
def test_dtypes_match_flax(name, kw, x_dtype):
  x, _ = data(jax.random.key(3), dtype=x_dtype)
  call = dict(use_running_average=False) if name == "BatchNorm" else {}
  mutable = ["batch_stats"] if name == "BatchNorm" else False
  with permissive():
    theirs = getattr(nn, name)(**kw)
    variables = randomize(theirs.init(jax.random.key(4), x, **call), jax.random.key(5))
    y_theirs = theirs.apply(variables, x, **call, mutable=mutable)
  y_ours = getattr(njnn, name)(**kw).apply(variables, x, **call, mutable=mutable)
  jax.tree.map(lambda a, b: (a.dtype == b.dtype) or pytest.fail(f"{a.dtype} != {b.dtype}"),
               y_ours, y_theirs)
  # One bfloat16 rounding of an O(1) output apart at most (the statistics are float32 in both).
  assert_close(y_ours, y_theirs, tol=1e-5 if y_ours[0].dtype == jnp.float32 else 2e-2)


def _standardize64(x, axes, eps):
  x = np.asarray(x, np.float64)
  return (x - x.mean(axes, keepdims=True)) / np.sqrt(x.var(axes, keepdims=True) + eps)


@pytest.mark.parametrize("name,kw,axes", [
    ("BatchNorm", dict(use_running_average=False), (0, 1, 2)),
    ("LayerNorm", {}, (3,)),
    ("InstanceNorm", {}, (1, 2)),
    ("GroupNorm", dict(num_groups=1), (1, 2, 3)),
])
def test_large_mean_stays_correct_with_flax_default_fast_variance(name, kw, axes):
  # flax's default use_fast_variance=True computes E[x^2] - E[x]^2, which for 1e4 + N(0, 1)
  # in float32 has no correct digit; ours accepts the flag and stays within 1e-3 of float64.
  x = 1e4 + jax.random.normal(jax.random.key(6), SHAPE)
  module = getattr(njnn, name)(use_fast_variance=True, **kw)
  variables = module.init(jax.random.key(7), x)
  y = module.apply(variables, x, mutable=["batch_stats"])[0] if name == "BatchNorm" else (
      module.apply(variables, x))
  expected = _standardize64(x, axes, module.epsilon)
  np.testing.assert_allclose(np.asarray(y, np.float64), expected, atol=1e-3)


def test_jitted_training_step_matches_flax():
  x, mask = data(jax.random.key(15))
  outs = []
  for ns, ctx in ((nn, permissive), (njnn, contextlib.nullcontext)):
    module = ns.BatchNorm(axis=1, momentum=0.9)
    variables = randomize(module.init(jax.random.key(0), x, use_running_average=True),
                          jax.random.key(1))

    @jax.jit
    def train_step(variables, x, mask, module=module, ctx=ctx):
      with ctx():
        y, upd = module.apply(variables, x, use_running_average=False, mask=mask,
                              mutable=["batch_stats"])
      return y, {**variables, **upd}

    y1, variables = train_step(variables, x, mask)
    y2, variables = train_step(variables, 2.0 * x, mask)
    outs.append((y1, y2, variables))
  assert_close(outs[1], outs[0])


def test_use_running_average_at_construction_or_call_as_flax():
  x, _ = data(jax.random.key(8))
  variables = njnn.BatchNorm().init(jax.random.key(0), x, use_running_average=True)
  variables = randomize(variables, jax.random.key(9))
  y_attr = njnn.BatchNorm(use_running_average=True).apply(variables, x)
  y_call = njnn.BatchNorm().apply(variables, x, use_running_average=True)
  with permissive():
    y_flax = nn.BatchNorm(use_running_average=True).apply(variables, x)
  assert_close(y_attr, y_flax)
  assert_close(y_call, y_flax)
  for module, call in ((njnn.BatchNorm(), {}), (njnn.BatchNorm(use_running_average=True),
                                                dict(use_running_average=False))):
    with pytest.raises(ValueError, match="use_running_average"):   # flax's merge_param rule
      module.apply(variables, x, **call)


def test_init_does_not_update_or_need_a_batch():
  x, _ = data(jax.random.key(10))
  variables = njnn.BatchNorm(momentum=None).init(jax.random.key(0), x, use_running_average=False)
  np.testing.assert_array_equal(variables["batch_stats"]["mean"], np.zeros(8))
  np.testing.assert_array_equal(variables["batch_stats"]["var"], np.ones(8))
  assert int(variables["batch_stats"]["count"]) == 0
  one = njnn.BatchNorm().init(jax.random.key(0), jnp.ones((1, 8)), use_running_average=False)
  assert one["batch_stats"]["mean"].shape == (8,)


def test_init_with_output_normalizes_with_the_batch_statistics_as_flax():
  x, _ = data(jax.random.key(15))
  with permissive():
    y_theirs, v_theirs = nn.BatchNorm(momentum=0.9).init_with_output(
        jax.random.key(0), x, use_running_average=False)
  y, variables = njnn.BatchNorm(momentum=0.9).init_with_output(jax.random.key(0), x,
                                                               use_running_average=False)
  assert_close(y, y_theirs)
  x64 = np.asarray(x, np.float64)
  np.testing.assert_allclose(y, (x64 - x64.mean((0, 1, 2))) / np.sqrt(x64.var((0, 1, 2)) + 1e-5),
                             rtol=1e-4, atol=1e-4)
  assert_close(variables, v_theirs, tol=0)                  # running statistics not updated
  # As in flax, init takes the statistics without axis_name, so it works outside the mapping.
  y_named, _ = njnn.BatchNorm(axis_name="d").init_with_output(jax.random.key(0), x,
                                                              use_running_average=False)
  assert_close(y_named, y)


@pytest.mark.parametrize("shape,axis", slow_except([((1, 8), -1), ((3,), -1), ((1, 4, 1, 1), 1)],
                                                ((1, 4, 1, 1), 1), unpack=True))
def test_batch_norm_training_on_one_value_per_channel_gives_the_bias_as_flax(shape, axis):
  x = 2.0 + jax.random.normal(jax.random.key(16), shape)
  module = njnn.BatchNorm(momentum=0.9, axis=axis, use_running_average=False)
  with permissive():
    flax_bn = nn.BatchNorm(momentum=0.9, axis=axis, use_running_average=False)
    variables = randomize(flax_bn.init(jax.random.key(0), x), jax.random.key(1))
    expected = flax_bn.apply(variables, x, mutable=["batch_stats"])
  y, upd = module.apply(variables, x, mutable=["batch_stats"])
  assert_close((y, upd), expected)
  bias = variables["params"]["bias"].reshape([-1 if a == axis % len(shape) else 1
                                              for a in range(len(shape))])
  np.testing.assert_allclose(y, jnp.broadcast_to(bias, shape), atol=1e-6)
  np.testing.assert_allclose(upd["batch_stats"]["var"], 0.9 * variables["batch_stats"]["var"],
                             rtol=1e-6)                      # batch variance 0
  grad = jax.grad(lambda x, v: module.apply(v, x, mutable=["batch_stats"])[0].sum(),
                  argnums=(0, 1))(x, variables)
  assert all(np.isfinite(g).all() for g in jax.tree.leaves(grad))


@pytest.mark.parametrize("shape,feature_axes", slow_except([((10, 6), -1), ((2, 3, 4), (1, 2))],
                                                         ((2, 3, 4), (1, 2)), unpack=True))
def test_instance_norm_with_nothing_to_reduce_gives_the_bias_as_flax(shape, feature_axes):
  x = jax.random.normal(jax.random.key(17), shape)
  with permissive():
    flax_in = nn.InstanceNorm(feature_axes=feature_axes)
    variables = randomize(flax_in.init(jax.random.key(0), x), jax.random.key(1))
    expected = flax_in.apply(variables, x)
  module = njnn.InstanceNorm(feature_axes=feature_axes)
  y = module.apply(variables, x)
  assert_close(y, expected)
  np.testing.assert_allclose(y, jnp.broadcast_to(variables["params"]["bias"], shape), atol=1e-6)
  grad = jax.grad(lambda x, v: (module.apply(v, x) ** 2).sum(), argnums=(0, 1))(x, variables)
  assert all(np.isfinite(g).all() for g in jax.tree.leaves(grad))


def test_momentum_none_on_flax_variables_evaluates_and_asks_for_the_count_to_train():
  class Net(nn.Module):   # the same module path (BatchNorm_0) under either namespace
    ns: object

    @nn.compact
    def __call__(self, x, train):
      return self.ns.BatchNorm(momentum=None, use_running_average=not train)(x)

  x, _ = data(jax.random.key(18))
  with permissive():
    variables = randomize(Net(nn).init(jax.random.key(0), x, False), jax.random.key(1))
    expected = Net(nn).apply(variables, x, False)
  assert "count" not in variables["batch_stats"]["BatchNorm_0"]
  assert_close(Net(njnn).apply(variables, x, False), expected)   # evaluation needs no count
  with pytest.raises(ValueError, match=r"variables\['batch_stats'\]\['BatchNorm_0'\]\['count'\]"):
    Net(njnn).apply(variables, x, True, mutable=["batch_stats"])
  # With the count added (the loaded statistics average n = 3 batches) training continues it.
  stats = variables["batch_stats"]["BatchNorm_0"]
  counted = {**variables, "batch_stats": {"BatchNorm_0": {**stats, "count": jnp.asarray(3)}}}
  _, upd = Net(njnn).apply(counted, x, True, mutable=["batch_stats"])
  new = upd["batch_stats"]["BatchNorm_0"]
  x64 = np.asarray(x, np.float64)
  np.testing.assert_allclose(new["mean"], (3 * stats["mean"] + x64.mean((0, 1, 2))) / 4,
                             rtol=1e-5, atol=1e-6)
  assert int(new["count"]) == 4


def test_momentum_none_is_the_cumulative_average_with_a_count():
  module = njnn.BatchNorm(momentum=None, use_running_average=False)
  xs = [data(k)[0] * (i + 1) for i, k in enumerate(jax.random.split(jax.random.key(11), 4))]
  variables = module.init(jax.random.key(0), xs[0])
  assert set(variables["batch_stats"]) == {"mean", "var", "count"}
  for x in xs:
    _, upd = module.apply(variables, x, mutable=["batch_stats"])
    variables = {**variables, **upd}
  stats = variables["batch_stats"]
  xs64 = [np.asarray(x, np.float64) for x in xs]
  assert int(stats["count"]) == 4 and stats["count"].dtype == jnp.int32
  np.testing.assert_allclose(stats["mean"], np.mean([x.mean((0, 1, 2)) for x in xs64], 0),
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(stats["var"], np.mean([x.var((0, 1, 2)) for x in xs64], 0),
                             rtol=1e-5)


def test_momentum_none_skips_a_fully_masked_batch():
  """A batch whose mask keeps nothing is not counted: the next batch is the first average."""
  module = njnn.BatchNorm(momentum=None, use_running_average=False)
  x0, x1 = (data(k)[0] for k in jax.random.split(jax.random.key(12)))
  variables = module.init(jax.random.key(0), x0)
  _, upd = module.apply(variables, x0, mask=jnp.zeros(SHAPE, bool), mutable=["batch_stats"])
  assert int(upd["batch_stats"]["count"]) == 0
  _, upd = module.apply({**variables, **upd}, x1, mutable=["batch_stats"])
  assert int(upd["batch_stats"]["count"]) == 1
  x64 = np.asarray(x1, np.float64)
  np.testing.assert_allclose(upd["batch_stats"]["mean"], x64.mean((0, 1, 2)), rtol=1e-5,
                             atol=1e-5)
  np.testing.assert_allclose(upd["batch_stats"]["var"], x64.var((0, 1, 2)), rtol=1e-5)


def test_unbiased_running_var_and_mask():
  x, mask = data(jax.random.key(12))
  module = njnn.BatchNorm(momentum=0.8, unbiased_running_var=True, use_running_average=False)
  variables = module.init(jax.random.key(0), x)
  y, upd = module.apply(variables, x, mask=mask, mutable=["batch_stats"])
  x64, m = np.asarray(x, np.float64), np.asarray(mask)
  n = m.sum((0, 1, 2))
  mean = (x64 * m).sum((0, 1, 2)) / n
  var = (((x64 - mean) ** 2) * m).sum((0, 1, 2)) / n
  np.testing.assert_allclose(upd["batch_stats"]["mean"], 0.2 * mean, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(upd["batch_stats"]["var"], 0.8 + 0.2 * var * n / (n - 1), rtol=1e-5)
  # Normalization uses the biased variance of the valid elements, also at masked positions.
  np.testing.assert_allclose(y, (x64 - mean) / np.sqrt(var + 1e-5), rtol=1e-4, atol=1e-4)


def test_group_norm_channels_first_equals_flax_channels_last():
  x, mask = data(jax.random.key(13))
  with permissive():
    flax_gn = nn.GroupNorm(num_groups=4)
    variables = randomize(flax_gn.init(jax.random.key(0), x), jax.random.key(1))
    expected = flax_gn.apply(variables, x, mask=mask)
  to_nchw = lambda a: jnp.transpose(a, (0, 3, 1, 2))
  y = njnn.GroupNorm(num_groups=4, feature_axis=1).apply(variables, to_nchw(x),
                                                         mask=to_nchw(mask))
  assert_close(y, to_nchw(expected))


def test_cross_device_statistics_match_flax():
  # Four host devices (conftest), statistics pooled within two groups of two devices.
  x, _ = data(jax.random.key(14), (4, 3, 2, 5))
  outs = []
  for ns, ctx in ((nn, permissive), (njnn, contextlib.nullcontext)):
    module = ns.BatchNorm(use_running_average=False, axis_name="d",
                          axis_index_groups=[[0, 1], [2, 3]])
    variables = randomize(module.init(jax.random.key(0), x[0]), jax.random.key(1))

    def apply(v, x, module=module, ctx=ctx):
      with ctx():
        return module.apply(v, x, mutable=["batch_stats"])
    outs.append(jax.pmap(apply, axis_name="d", in_axes=(None, 0))(variables, x))
  assert_close(outs[1], outs[0])
  assert not np.allclose(outs[1][1]["batch_stats"]["mean"][0],
                         outs[1][1]["batch_stats"]["mean"][2])   # the groups differ


@pytest.mark.parametrize("make,x_shape,error,match", [
    (lambda: njnn.GroupNorm(num_groups=3), SHAPE, ValueError, "num_groups=3 must divide"),
    (lambda: njnn.GroupNorm(group_size=2), SHAPE, ValueError, "exactly one of num_groups"),
    (lambda: njnn.GroupNorm(num_groups=2, reduction_axes=(1, 2)), SHAPE, ValueError,
     "must include the channel axis"),
    (lambda: njnn.LayerNorm(axis_index_groups=[[0]]), SHAPE, ValueError, "axis_index_groups"),
    (lambda: njnn.LayerNorm(reduction_axes=(1, 1)), SHAPE, ValueError, "same axis more than once"),
    (lambda: njnn.BatchNorm(axis=4, use_running_average=True), SHAPE, ValueError, "out of range"),
    (lambda: njnn.InstanceNorm(feature_axes=(0, 3)), SHAPE, ValueError, "batch axis"),
    (lambda: njnn.InstanceNorm(feature_axes=0), SHAPE, ValueError, "feature_axes=0 must not"),
    (lambda: njnn.LayerNorm(epsilon=-1.0), SHAPE, ValueError, "eps must be a non-negative"),
    # flax raises for these too ("Dtype must be inexact"); the output would be truncated.
    (lambda: njnn.LayerNorm(dtype=jnp.int32), SHAPE, ValueError, "dtype must be a floating"),
    (lambda: njnn.BatchNorm(use_running_average=False, dtype=jnp.bool_), SHAPE, ValueError,
     "got dtype=bool"),
    (lambda: njnn.GroupNorm(num_groups=2, dtype=jnp.int8), SHAPE, ValueError, "dtype=int8"),
    (lambda: njnn.RMSNorm(reduction_axes=()), SHAPE, ValueError, r"got reduction_axes=\(\)"),
])
def test_bad_configurations_raise_the_functional_errors(make, x_shape, error, match):
  module = make()
  with pytest.raises(error, match=match):
    variables = module.init(jax.random.key(0), jnp.ones(x_shape))
    module.apply(variables, jnp.ones(x_shape), mutable=["batch_stats"])


def test_bad_inputs_raise():
  module = njnn.LayerNorm()
  variables = module.init(jax.random.key(0), jnp.ones(SHAPE))
  with pytest.raises(TypeError, match="floating dtype"):
    module.apply(variables, jnp.ones(SHAPE, jnp.int32))
  with pytest.raises(ValueError, match="broadcastable"):
    module.apply(variables, jnp.ones(SHAPE), mask=jnp.ones((3,), bool))
  with pytest.raises(TypeError, match="boolean"):
    module.apply(variables, jnp.ones(SHAPE), mask=jnp.ones(SHAPE))


# --- BatchRenorm and ghost batch norm (issue 12) ---

def _renorm_steps(module, variables, xs, **call):
  """Runs training steps; returns the outputs and the final variables."""
  ys = []
  for x in xs:
    y, upd = module.apply(variables, x, use_running_average=False, mutable=["batch_stats"],
                          **call)
    variables = {**variables, "batch_stats": upd["batch_stats"]}
    ys.append(y)
  return ys, variables


def test_batch_renorm_module_matches_the_function():
  import normjax as nj
  xs = [jnp.asarray(np.random.default_rng(i).normal(i, 1 + i, (6, 4)), jnp.float32)
        for i in range(4)]
  brn = njnn.BatchRenorm(momentum=0.8, r_max=1.5, d_max=0.5, warmup_steps=1,
                         scale_init=nn.initializers.constant(2.0))
  variables = brn.init(jax.random.key(0), xs[0], use_running_average=False)
  assert set(variables["batch_stats"]) == {"mean", "var", "count"}
  ys, variables = _renorm_steps(brn, variables, xs)
  stats = nj.init_batch_stats(4)
  for x, y in zip(xs, ys):
    y_ref, stats = nj.batch_renorm(x, 2.0 * jnp.ones(4), jnp.zeros(4), stats, train=True,
                                   momentum=0.8, r_max=1.5, d_max=0.5, warmup_steps=1)
    np.testing.assert_array_equal(y, y_ref)
  np.testing.assert_array_equal(variables["batch_stats"]["var"], stats.var)
  assert int(variables["batch_stats"]["count"]) == 4
  y_eval = brn.apply(variables, xs[0], use_running_average=True)
  np.testing.assert_array_equal(
      y_eval, nj.batch_norm(xs[0], 2.0 * jnp.ones(4), jnp.zeros(4), stats, train=False)[0])


def test_batch_renorm_loads_and_continues_sbx_variables():
  """A tree of the shape sbx's BatchRenorm makes: batch_stats {mean, var, r_max, d_max, steps}."""
  import normjax as nj
  rng = np.random.default_rng(0)
  mean, var = rng.normal(size=3).astype(np.float32), (1 + rng.random(3)).astype(np.float32)
  sbx_tree = {"params": {"scale": jnp.ones(3), "bias": jnp.zeros(3)},
              "batch_stats": {"mean": jnp.asarray(mean), "var": jnp.asarray(var),
                              "r_max": jnp.asarray(2), "d_max": jnp.asarray(1),
                              "steps": jnp.asarray(7)}}
  # sbx's attributes: use_running_average, axis, momentum, epsilon, warm_up_steps=5.
  brn = njnn.BatchRenorm(use_running_average=False, axis=-1, momentum=0.9, epsilon=1e-3,
                         warmup_steps=5)
  x = jnp.asarray(rng.normal(3.0, 4.0, (8, 3)), jnp.float32)
  y, upd = jax.jit(lambda v, x: brn.apply(v, x, mutable=["batch_stats"]))(sbx_tree, x)
  stats = nj.BatchStats(jnp.asarray(mean), jnp.asarray(var), jnp.asarray(7, jnp.int32))
  y_ref, new = nj.batch_renorm(x, jnp.ones(3), jnp.zeros(3), stats, train=True, r_max=2.0,
                               d_max=1.0, warmup_steps=5, momentum=0.9, eps=1e-3)
  np.testing.assert_allclose(y, y_ref, 1e-6, 1e-6)
  assert set(upd["batch_stats"]) == {"mean", "var", "r_max", "d_max", "steps"}
  assert int(upd["batch_stats"]["steps"]) == 8
  np.testing.assert_array_equal(upd["batch_stats"]["mean"], new.mean)
  # The stored r_max / d_max (2, 1) are used, not the attribute defaults (3, 5).
  y_default, _ = nj.batch_renorm(x, jnp.ones(3), jnp.zeros(3), stats, train=True,
                                 warmup_steps=5, momentum=0.9, eps=1e-3)
  assert not np.allclose(y, y_default, atol=1e-3)


def test_batch_norm_virtual_batch_size():
  import normjax as nj
  x = jnp.asarray(np.random.default_rng(1).normal(2.0, 3.0, (8, 2, 3)), jnp.float32)
  bn = njnn.BatchNorm(momentum=0.9, virtual_batch_size=4)
  variables = bn.init(jax.random.key(0), x, use_running_average=False)
  y, upd = bn.apply(variables, x, use_running_average=False, mutable=["batch_stats"])
  y_ref, new = nj.batch_norm(x, jnp.ones(3), jnp.zeros(3), nj.init_batch_stats(3), train=True,
                             momentum=0.9, virtual_batch_size=4)
  np.testing.assert_array_equal(y, y_ref)
  np.testing.assert_array_equal(upd["batch_stats"]["var"], new.var)


# --- Layers of today's models (issue 28): scale_offset, adaLN-Zero, AdaGN, DynamicTanh,
# --- record_health ---

def _silu64(c):
  c = np.asarray(c, np.float64)
  return c / (1.0 + np.exp(-c))


def _modulation64(cond, kernel, bias, chunks, rank):
  """DiT's `adaLN_modulation(c).chunk(n)`: `Linear(SiLU(c))` split into n `[B, 1, ..., D]`."""
  h = _silu64(cond) @ np.asarray(kernel, np.float64) + np.asarray(bias, np.float64)
  return [p.reshape((p.shape[0],) + (1,) * (rank - 2) + (p.shape[1],))
          for p in np.split(h, chunks, axis=-1)]


def _group_norm64(x, num_groups, eps):
  x = np.asarray(x, np.float64)
  g = x.reshape(x.shape[:-1] + (num_groups, -1))
  axes = tuple(range(1, x.ndim - 1)) + (x.ndim,)
  g = (g - g.mean(axes, keepdims=True)) / np.sqrt(g.var(axes, keepdims=True) + eps)
  return g.reshape(x.shape)


def _adaptive_inputs(seed=20, shape=(3, 5, 8), cond_features=6):
  kx, kc = jax.random.split(jax.random.key(seed))
  return 1.0 + 2.0 * jax.random.normal(kx, shape), jax.random.normal(kc, (shape[0],
                                                                          cond_features))


@pytest.mark.parametrize("use_gate", [True, False])
def test_adaptive_layer_norm_at_init_is_the_plain_layer_norm_with_a_zero_gate(use_gate):
  x, cond = _adaptive_inputs()
  module = njnn.AdaptiveLayerNorm(use_gate=use_gate)
  variables = module.init(jax.random.key(0), x, cond)
  n = 3 if use_gate else 2
  assert jax.tree.map(jnp.shape, variables) == {
      "params": {"modulation": {"kernel": (6, n * 8), "bias": (n * 8,)}}}
  assert all(not np.any(v) for v in jax.tree.leaves(variables))      # adaLN-Zero
  out = module.apply(variables, x, cond)
  y, gate = out if use_gate else (out, None)
  np.testing.assert_allclose(y, _standardize64(x, -1, 1e-6), rtol=1e-5, atol=1e-5)
  if use_gate:
    assert gate.shape == (3, 1, 8)
    np.testing.assert_array_equal(gate, np.zeros((3, 1, 8)))


@pytest.mark.parametrize("use_gate", [True, False])
def test_adaptive_layer_norm_with_set_parameters_matches_dit_in_float64(use_gate):
  x, cond = _adaptive_inputs(21, (3, 2, 4, 8))                 # [B, H, W, D]: middle axes
  module = njnn.AdaptiveLayerNorm(use_gate=use_gate, epsilon=1e-3)
  variables = randomize(module.init(jax.random.key(0), x, cond), jax.random.key(1))
  params = variables["params"]["modulation"]
  out = module.apply(variables, x, cond)
  parts = _modulation64(cond, params["kernel"], params["bias"], 3 if use_gate else 2, x.ndim)
  expected = _standardize64(x, -1, 1e-3) * (1 + parts[1]) + parts[0]
  y = out[0] if use_gate else out
  np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
  if use_gate:
    np.testing.assert_allclose(out[1], parts[2], rtol=1e-5, atol=1e-6)


def test_adaptive_group_norm_at_init_and_with_set_parameters_in_float64():
  x, cond = _adaptive_inputs(22, (2, 3, 3, 8), 5)               # NHWC
  module = njnn.AdaptiveGroupNorm(num_groups=4)
  variables = module.init(jax.random.key(0), x, cond)
  assert jax.tree.map(jnp.shape, variables) == {
      "params": {"modulation": {"kernel": (5, 16), "bias": (16,)}}}
  np.testing.assert_allclose(module.apply(variables, x, cond), _group_norm64(x, 4, 1e-5),
                             rtol=1e-5, atol=1e-5)
  variables = randomize(variables, jax.random.key(1))
  params = variables["params"]["modulation"]
  shift, scale = _modulation64(cond, params["kernel"], params["bias"], 2, x.ndim)
  np.testing.assert_allclose(module.apply(variables, x, cond),
                             _group_norm64(x, 4, 1e-5) * (1 + scale) + shift,
                             rtol=1e-5, atol=1e-5)


def test_dynamic_tanh_parameters_and_output_in_float64():
  x, _ = data(jax.random.key(23), (4, 8))
  module = njnn.DynamicTanh(alpha_init=0.25)
  variables = module.init(jax.random.key(0), x)
  params = variables["params"]
  assert jax.tree.map(jnp.shape, params) == {"alpha": (), "scale": (8,), "bias": (8,)}
  assert float(params["alpha"]) == 0.25
  np.testing.assert_array_equal(params["scale"], np.ones(8))
  np.testing.assert_array_equal(params["bias"], np.zeros(8))
  params = randomize(params, jax.random.key(1))
  p64 = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  np.testing.assert_allclose(module.apply({"params": params}, x),
                             np.tanh(p64["alpha"] * np.asarray(x, np.float64)) * p64["scale"]
                             + p64["bias"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["LayerNorm", "RMSNorm", "AddLayerNorm", "AddRMSNorm"])
def test_scale_offset_is_the_functional_zero_centered_scale(name):
  import normjax as nj
  x, _ = data(jax.random.key(24), (4, 8))
  r, _ = data(jax.random.key(25), (4, 8))
  args = (x, r) if name.startswith("Add") else (x,)
  assert not np.any(getattr(njnn, name)(scale_offset=1.0).init(jax.random.key(0), *args)
                    ["params"]["scale"] - 1)                 # the default initializer stays ones
  module = getattr(njnn, name)(scale_offset=1.0, scale_init=nn.initializers.zeros)
  variables = module.init(jax.random.key(0), *args)
  np.testing.assert_array_equal(variables["params"]["scale"], np.zeros(8))
  variables = randomize(variables, jax.random.key(1))
  variables["params"]["scale"] = variables["params"]["scale"] - 1.0   # small, around 0
  w, b = variables["params"]["scale"], variables["params"].get("bias")
  fn = {"LayerNorm": lambda: nj.layer_norm(x, w, b, eps=1e-6, scale_offset=1.0),
        "RMSNorm": lambda: nj.rms_norm(x, w, scale_offset=1.0),
        "AddLayerNorm": lambda: nj.add_layer_norm(x, r, w, b, eps=1e-6, scale_offset=1.0),
        "AddRMSNorm": lambda: nj.add_rms_norm(x, r, w, scale_offset=1.0)}[name]
  assert_close(module.apply(variables, *args), fn(), tol=0)
  h = np.asarray(x, np.float64) + (np.asarray(r, np.float64) if name.startswith("Add") else 0)
  xhat = (_standardize64(h, -1, 1e-6) if "Layer" in name
          else h / np.sqrt((h ** 2).mean(-1, keepdims=True) + 1e-6))
  expected = xhat * (1 + np.asarray(w, np.float64)) + (0 if b is None else np.asarray(b))
  y = module.apply(variables, *args)
  np.testing.assert_allclose(y[0] if name.startswith("Add") else y, expected, rtol=1e-5,
                             atol=1e-5)


@pytest.mark.parametrize("name,axes", [("LayerNorm", (-1,)), ("RMSNorm", (-1,)),
                                       ("BatchNorm", (0, 1))])
def test_record_health_sows_a_norm_health_into_intermediates(name, axes):
  import normjax as nj
  x = jax.random.normal(jax.random.key(26), (3, 4, 5))
  x = x.at[..., 2].set(3.0).at[1, 0].set(3.0)        # a constant channel and a constant row
  call = dict(use_running_average=False) if name == "BatchNorm" else {}
  mutable = ["intermediates", "batch_stats"]
  quiet = getattr(njnn, name)()
  variables = quiet.init(jax.random.key(0), x, **call)
  _, state = quiet.apply(variables, x, **call, mutable=mutable)
  assert "intermediates" not in state                 # default: nothing sown
  module = getattr(njnn, name)(record_health=True)
  variables = module.init(jax.random.key(0), x, **call)
  assert "intermediates" not in variables             # not during init
  _, state = module.apply(variables, x, **call, mutable=mutable)
  (health,) = state["intermediates"]["norm_health"]
  assert isinstance(health, nj.NormHealth)
  assert_close(health, nj.norm_health(x, axis=axes, eps=module.epsilon), tol=0)
  assert float(health.constant) == pytest.approx(1 / 5 if name == "BatchNorm" else 1 / 12)


def test_record_health_of_the_add_norms_is_that_of_the_sum():
  import normjax as nj
  x = jax.random.normal(jax.random.key(27), (4, 6))
  module = njnn.AddLayerNorm(record_health=True)
  variables = module.init(jax.random.key(0), x, -x)
  (_, h), state = module.apply(variables, x, -x, mutable=["intermediates"])
  assert_close(state["intermediates"]["norm_health"][0], nj.norm_health(h, eps=1e-6), tol=0)
  assert float(state["intermediates"]["norm_health"][0].constant) == 1.0   # h == 0


def _dit_reference(x, cond, kernel, bias, eps=1e-6):
  """adaLN-Zero written as DiT does, in jax.numpy (no normjax): the independent oracle of the
  module's derivatives."""
  shift, scale, gate = jnp.split(jax.nn.silu(cond) @ kernel + bias[None], 3, axis=-1)
  mean = x.mean(-1, keepdims=True)
  xhat = (x - mean) / jnp.sqrt(((x - mean) ** 2).mean(-1, keepdims=True) + eps)
  return xhat * (1 + scale[:, None]) + shift[:, None], gate[:, None]


def test_adaptive_layer_norm_under_jit_and_grad_matches_dit():
  x, cond = _adaptive_inputs(28, (3, 5, 8), 6)
  module = njnn.AdaptiveLayerNorm()
  variables = randomize(module.init(jax.random.key(0), x, cond), jax.random.key(1))
  weights = jnp.asarray(np.random.default_rng(0).normal(size=(3, 5, 8)), jnp.float32)

  def loss(variables, x, cond, forward):
    y, gate = forward(variables, x, cond)
    return jnp.sum(weights * y * (1 + gate))

  ours = lambda v, x, c: module.apply(v, x, c)
  ref = lambda v, x, c: _dit_reference(x, c, **v["params"]["modulation"])
  grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)), static_argnums=3)(variables, x, cond, ours)
  expected = jax.grad(loss, argnums=(0, 1, 2))(variables, x, cond, ref)
  assert_close(grads, expected, tol=2e-4)
  # adaLN-Zero: at the zero init the gradient reaches the modulation's kernel.
  zero = module.init(jax.random.key(0), x, cond)
  g0 = jax.grad(loss)(zero, x, cond, ours)
  assert np.abs(g0["params"]["modulation"]["kernel"]).max() > 1e-3


@pytest.mark.parametrize("make,args,error,match", [
    (njnn.AdaptiveLayerNorm, ((2, 3, 4), (2, 3, 5)), ValueError, r"cond must have shape"),
    (njnn.AdaptiveLayerNorm, ((2, 3, 4), (3, 5)), ValueError, r"\(2, cond_features\).*\(3, 5\)"),
    (njnn.AdaptiveLayerNorm, ((4,), (1, 5)), ValueError, "x must have a batch axis"),
    (njnn.AdaptiveGroupNorm, ((2, 3, 8), (2,)), ValueError, "cond must have shape"),
    (lambda: njnn.AdaptiveLayerNorm(use_gate="yes"), ((2, 4), (2, 5)), TypeError, "use_gate"),
    (lambda: njnn.AdaptiveGroupNorm(num_groups=3), ((2, 3, 8), (2, 5)), ValueError,
     "num_groups=3 must divide"),
    (lambda: njnn.RMSNorm(scale_offset=1.0, use_scale=False), ((2, 4),), ValueError,
     "scale_offset=1.0 needs a scale"),
    (lambda: njnn.LayerNorm(scale_offset=float("nan")), ((2, 4),), TypeError, "scale_offset"),
])
def test_bad_inputs_of_the_new_modules_raise_named_errors(make, args, error, match):
  module = make()
  arrays = [jnp.ones(s) for s in args]
  with pytest.raises(error, match=match):
    module.init(jax.random.key(0), *arrays)


def test_adaptive_layer_norm_rejects_an_integer_cond():
  module = njnn.AdaptiveLayerNorm()
  with pytest.raises(TypeError, match="cond must have a floating dtype"):
    module.init(jax.random.key(0), jnp.ones((2, 4)), jnp.ones((2, 5), jnp.int32))
