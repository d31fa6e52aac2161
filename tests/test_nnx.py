"""normjax.nnx against flax.nnx's modules (the same state loaded with nnx.update gives the same
outputs and BatchStats), under nnx.jit / nnx.vmap / nnx.value_and_grad, and float64 references
for the extras."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from flax_helpers import SHAPE, assert_close, data, permissive, random_init, randomize
from flax_helpers import fast_compiles  # noqa: F401  (module-scoped autouse fixture)

import normjax.nnx as njnnx
from tests.helpers import slow_except

CASES = [  # (module, num_features, options, masked)
    ("BatchNorm", 8, {}, True),
    ("BatchNorm", 5, dict(axis=1), False),                  # channels-first
    ("BatchNorm", 8, dict(momentum=0.9, epsilon=1e-3, use_bias=False), False),
    ("LayerNorm", 8, {}, True),
    ("LayerNorm", 8, dict(reduction_axes=(1, 2), feature_axes=-1), True),  # features not reduced
    ("LayerNorm", 32, dict(reduction_axes=(-2, -1), feature_axes=(-2, -1)), False),
    ("RMSNorm", 8, {}, True),
    ("RMSNorm", 32, dict(reduction_axes=(1, 2, 3), feature_axes=(2, 3)), False),
    ("InstanceNorm", 8, {}, True),
    ("InstanceNorm", 5, dict(feature_axes=1, use_scale=False), False),
    ("GroupNorm", 8, dict(num_groups=4), True),
    ("GroupNorm", 8, dict(num_groups=None, group_size=2, use_bias=False), False),
]


def make(ns, name, num_features, options, seed=0, random_inits=False):
  if random_inits:
    options = dict(options, scale_init=random_init(1.0))
    options.update({} if name == "RMSNorm" else dict(bias_init=random_init(0.0)))
  return getattr(ns, name)(num_features, **options, rngs=nnx.Rngs(seed))


def load(module, pure_dict):
  state = nnx.state(module)
  nnx.replace_by_pure_dict(state, pure_dict)
  nnx.update(module, state)


def randomize_state(module, key):
  load(module, randomize(pure(module), key))


def pure(module):
  return nnx.to_pure_dict(nnx.state(module))


@pytest.mark.parametrize("name,num_features,options,masked",
                         slow_except(CASES, CASES[0], CASES[-2], unpack=True),
                         ids=[f"{c[0]}-{c[2]}{'-mask' * c[3]}" for c in CASES])
def test_matches_flax_nnx(name, num_features, options, masked):
  # Construction: the same Params and BatchStats, value for value, with random initializers.
  theirs = make(nnx, name, num_features, options, random_inits=True)
  ours = make(njnnx, name, num_features, options, random_inits=True)
  assert jax.tree.structure(nnx.state(ours)) == jax.tree.structure(nnx.state(theirs))
  jax.tree.map(np.testing.assert_array_equal, pure(ours), pure(theirs))

  # A flax module's (random) state loads into ours with nnx.update.
  randomize_state(theirs, jax.random.key(1))
  ours = make(njnnx, name, num_features, options, seed=99)
  nnx.update(ours, nnx.state(theirs))
  for key in jax.random.split(jax.random.key(2), 3):    # three training steps
    x, mask = data(key)
    mask = mask if masked else None
    with permissive():
      y_theirs = theirs(x, mask=mask)
    y_ours = ours(x, mask=mask)
    assert y_ours.dtype == y_theirs.dtype
    assert_close(y_ours, y_theirs)
    assert_close(pure(ours), pure(theirs))
  theirs.eval()
  ours.eval()
  before = pure(ours)
  x, mask = data(jax.random.key(3))
  with permissive():
    y_theirs = theirs(x, mask=mask if masked else None)
  assert_close(ours(x, mask=mask if masked else None), y_theirs)
  assert_close(pure(ours), before, tol=0)    # evaluation leaves the statistics alone


class Block(nnx.Module):
  """Linear -> BatchNorm -> relu -> GroupNorm -> LayerNorm, from either namespace."""

  def __init__(self, ns, rngs):
    self.linear = nnx.Linear(6, 8, rngs=rngs)
    self.bn = ns.BatchNorm(8, momentum=0.9, rngs=rngs)
    self.gn = ns.GroupNorm(8, num_groups=2, rngs=rngs)
    self.ln = ns.LayerNorm(8, rngs=rngs)

  def __call__(self, x):
    return self.ln(self.gn(nnx.relu(self.bn(self.linear(x)))))


@pytest.mark.slow
def test_jit_and_value_and_grad_match_flax():
  x = 1.0 + 2.0 * jax.random.normal(jax.random.key(4), (16, 6))
  w = jax.random.normal(jax.random.key(5), (16, 8))
  theirs, ours = Block(nnx, nnx.Rngs(0)), Block(njnnx, nnx.Rngs(1))
  randomize_state(theirs, jax.random.key(6))
  nnx.update(ours, nnx.state(theirs))

  @nnx.jit
  def step(model, x):
    with permissive():
      return nnx.value_and_grad(lambda m: jnp.mean(m(x) * w))(model)

  for t in range(2):
    loss_theirs, grads_theirs = step(theirs, x + t)
    loss_ours, grads_ours = step(ours, x + t)
    assert_close(loss_ours, loss_theirs)
    assert_close(nnx.to_pure_dict(grads_ours), nnx.to_pure_dict(grads_theirs), tol=1e-4)
    assert_close(pure(ours), pure(theirs))          # BatchStats updated through nnx.jit


def test_train_eval_switching_as_flax():
  x, _ = data(jax.random.key(7))
  model = Block(njnnx, nnx.Rngs(0))
  model.eval()
  assert model.bn.use_running_average is True
  y_eval = model.bn(x[:, 0, 0, :6] @ jnp.ones((6, 8)))
  np.testing.assert_allclose(y_eval, x[:, 0, 0, :6] @ jnp.ones((6, 8)) / np.sqrt(1 + 1e-5),
                             rtol=1e-5)   # fresh statistics: mean 0, var 1
  model.train()
  assert model.bn.use_running_average is False
  viewed = nnx.view(model, use_running_average=True)
  assert viewed.bn.use_running_average is True
  bn = njnnx.BatchNorm(8, use_running_average=None, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="use_running_average"):
    bn(x)
  before = pure(bn)
  bn(x, use_running_average=True)                 # the call argument decides
  assert_close(pure(bn), before, tol=0)
  bn(x, use_running_average=False)
  assert not np.allclose(pure(bn)["mean"], before["mean"])


@pytest.mark.parametrize("ensemble", [True, False], ids=["ensemble", "axis_name"])
@pytest.mark.slow
def test_vmap_matches_flax(ensemble):
  x, _ = data(jax.random.key(8), (4, 6, 3))
  outs = []
  for ns in (nnx, njnnx):
    if ensemble:   # four independent BatchNorms, one per slice of x
      create = nnx.vmap(lambda rngs: ns.BatchNorm(3, scale_init=random_init(1.0), rngs=rngs))
      model = create(nnx.Rngs(0).split(4))
      forward = nnx.vmap(lambda m, x: m(x), in_axes=(0, 0))
    else:          # one BatchNorm, statistics over the vmapped axis as well
      model = ns.BatchNorm(3, axis_name="b", scale_init=random_init(1.0), rngs=nnx.Rngs(0))
      forward = nnx.vmap(lambda m, x: m(x), in_axes=(None, 0), axis_name="b")
    with permissive():
      y = forward(model, x)
    outs.append((y, pure(model)))
  assert_close(outs[1], outs[0])


def test_momentum_none_skips_a_fully_masked_batch():
  """A batch whose mask keeps nothing is not counted: the next batch is the first average."""
  x0, x1 = (data(k)[0] for k in jax.random.split(jax.random.key(12)))
  bn = njnnx.BatchNorm(8, momentum=None, rngs=nnx.Rngs(0))
  bn(x0, mask=jnp.zeros(SHAPE, bool))
  assert int(bn.count[...]) == 0
  bn(x1)
  x64 = np.asarray(x1, np.float64)
  assert int(bn.count[...]) == 1
  np.testing.assert_allclose(bn.mean[...], x64.mean((0, 1, 2)), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(bn.var[...], x64.var((0, 1, 2)), rtol=1e-5)


def test_momentum_none_count_and_unbiased_running_var():
  xs = [data(k)[0] * (i + 1) for i, k in enumerate(jax.random.split(jax.random.key(9), 3))]
  bn = njnnx.BatchNorm(8, momentum=None, unbiased_running_var=True, rngs=nnx.Rngs(0))
  assert isinstance(bn.count, nnx.BatchStat) and bn.count[...].dtype == jnp.int32
  for x in xs:
    bn(x)
  xs64 = [np.asarray(x, np.float64) for x in xs]
  assert int(bn.count[...]) == 3
  np.testing.assert_allclose(bn.mean[...], np.mean([x.mean((0, 1, 2)) for x in xs64], 0),
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(bn.var[...], np.mean([x.var((0, 1, 2), ddof=1) for x in xs64], 0),
                             rtol=1e-5)
  assert "count" not in pure(njnnx.BatchNorm(8, rngs=nnx.Rngs(0)))


def test_extensions_match_flax_linen():
  """Two configurations flax.nnx gets wrong, compared with flax.linen's modules instead:
  BatchNorm over a tuple of axes (flax.nnx fails to update its statistics) and GroupNorm with
  custom reduction_axes (flax.nnx repeats the group statistics along axis 1)."""
  import flax.linen as nn
  x, mask = data(jax.random.key(10))
  with permissive():
    bn = nn.BatchNorm(axis=(1, 3), use_running_average=False)
    variables = randomize(bn.init(jax.random.key(0), x), jax.random.key(1))
    y_bn, upd = bn.apply(variables, x, mask=mask, mutable=["batch_stats"])
    gn = nn.GroupNorm(num_groups=2, reduction_axes=(2, 3))
    gn_variables = randomize(gn.init(jax.random.key(0), x), jax.random.key(2))
    y_gn = gn.apply(gn_variables, x)
  ours_bn = njnnx.BatchNorm(40, axis=(1, 3), rngs=nnx.Rngs(0))
  flat = lambda tree: jax.tree.map(lambda a: a.reshape(-1), tree)
  load(ours_bn, flat({**variables["params"], **variables["batch_stats"]}))
  assert_close(ours_bn(x, mask=mask), y_bn)
  assert_close({k: pure(ours_bn)[k] for k in ("mean", "var")}, flat(upd["batch_stats"]))
  ours_gn = njnnx.GroupNorm(8, num_groups=2, reduction_axes=(2, 3), rngs=nnx.Rngs(0))
  load(ours_gn, gn_variables["params"])
  assert_close(ours_gn(x), y_gn)


def test_group_norm_channels_first_equals_flax_channels_last():
  x, mask = data(jax.random.key(11))
  theirs = make(nnx, "GroupNorm", 8, dict(num_groups=4), random_inits=True)
  ours = make(njnnx, "GroupNorm", 8, dict(num_groups=4, feature_axis=1), seed=5)
  nnx.update(ours, nnx.state(theirs))
  to_nchw = lambda a: jnp.transpose(a, (0, 3, 1, 2))
  with permissive():
    expected = theirs(x, mask=mask)
  assert_close(ours(to_nchw(x), mask=to_nchw(mask)), to_nchw(expected))


@pytest.mark.parametrize("x_dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("name,options", [("BatchNorm", dict(dtype=jnp.bfloat16)),
                                          ("LayerNorm", {}), ("GroupNorm", dict(num_groups=2))])
def test_dtypes_match_flax(name, options, x_dtype):
  x, _ = data(jax.random.key(12), dtype=x_dtype)
  theirs = make(nnx, name, 8, options, random_inits=True)
  ours = make(njnnx, name, 8, options, random_inits=True)
  with permissive():
    y_theirs = theirs(x)
  y_ours = ours(x)
  assert y_ours.dtype == y_theirs.dtype
  assert_close(y_ours, y_theirs, tol=1e-5 if y_ours.dtype == jnp.float32 else 2e-2)
  assert_close(pure(ours), pure(theirs))


@pytest.mark.parametrize("build,x_shape,match", [
    (lambda: njnnx.GroupNorm(8, num_groups=3, rngs=nnx.Rngs(0)), None, "num_groups=3 must divide"),
    (lambda: njnnx.GroupNorm(8, group_size=2, rngs=nnx.Rngs(0)), None, "exactly one of"),
    (lambda: njnnx.LayerNorm(8, axis_index_groups=[[0]], rngs=nnx.Rngs(0)), None,
     "axis_index_groups"),
    (lambda: njnnx.BatchNorm(5, rngs=nnx.Rngs(0)), SHAPE, r"scale must have shape \(8,\)"),
    (lambda: njnnx.BatchNorm(5, use_scale=False, use_bias=False, rngs=nnx.Rngs(0)), SHAPE,
     r"stats.mean must have shape \(8,\)"),
    (lambda: njnnx.BatchNorm(8, axis=(1, 3), rngs=nnx.Rngs(0)), SHAPE, "must have 40 values"),
    (lambda: njnnx.GroupNorm(8, num_groups=2, reduction_axes=(1, 2), rngs=nnx.Rngs(0)), SHAPE,
     "must include the channel axis"),
    (lambda: njnnx.InstanceNorm(8, epsilon=-1.0, rngs=nnx.Rngs(0)), SHAPE, "eps must be a non-neg"),
    (lambda: njnnx.LayerNorm(8, dtype=jnp.int32, rngs=nnx.Rngs(0)), SHAPE,
     "dtype must be a floating dtype"),
    # Without scale and bias nothing else has the channel count: checked as flax's reshape does.
    (lambda: njnnx.GroupNorm(6, num_groups=2, use_scale=False, use_bias=False,
                             rngs=nnx.Rngs(0)), SHAPE, "num_features=6 channels"),
])
def test_bad_configurations_raise_the_functional_errors(build, x_shape, match):
  with pytest.raises(ValueError, match=match):
    module = build()
    module(jnp.ones(x_shape))


@pytest.mark.parametrize("name,num_features,shape", [
    ("BatchNorm", 8, (1, 8)),         # training on a batch of one (nnx.tabulate's (1, din))
    pytest.param("InstanceNorm", 6, (10, 6), marks=pytest.mark.slow),   # nothing left to reduce
    pytest.param("GroupNorm", 6, (10, 6), marks=pytest.mark.slow),   # group_size=1 on [N, C]
], ids=["BatchNorm-batch-of-one", "InstanceNorm-NC", "GroupNorm-size-1-NC"])
def test_single_element_statistics_give_the_bias_as_flax(name, num_features, shape):
  options = dict(num_groups=None, group_size=1) if name == "GroupNorm" else {}
  theirs = make(nnx, name, num_features, options, random_inits=True)
  ours = make(njnnx, name, num_features, options, seed=3)
  nnx.update(ours, nnx.state(theirs))
  x = 2.0 + jax.random.normal(jax.random.key(13), shape)
  with permissive():
    y_theirs = theirs(x)
  y = ours(x)
  assert_close(y, y_theirs)
  assert_close(pure(ours), pure(theirs))          # BatchNorm: batch variance 0 folded in
  np.testing.assert_allclose(y, jnp.broadcast_to(ours.bias[...], shape), atol=1e-6)
  grads = nnx.grad(lambda m: (m(x) ** 2).sum())(ours)
  assert all(np.isfinite(g).all() for g in jax.tree.leaves(nnx.to_pure_dict(grads)))


def test_view_info_describes_use_running_average():
  model = Block(njnnx, nnx.Rngs(0))
  info = nnx.view_info(model)
  assert "BatchNorm:" in info and "use_running_average: bool | None = None" in info
  assert "stored batch statistics" in info
  assert nnx.view(model, use_running_average=True).bn.use_running_average is True


def test_momentum_none_loaded_from_flax_needs_its_count_set():
  """The documented rule: a flax state has no count, so after nnx.update the count stays 0
  and the first batch would replace the loaded statistics; setting the count continues them."""
  theirs = make(nnx, "BatchNorm", 8, {}, random_inits=True)
  randomize_state(theirs, jax.random.key(14))
  ours = njnnx.BatchNorm(8, momentum=None, rngs=nnx.Rngs(0))
  nnx.update(ours, nnx.state(theirs))
  loaded = pure(ours)
  assert int(loaded["count"]) == 0
  ours.count[...] = jnp.asarray(3, jnp.int32)
  x, _ = data(jax.random.key(15))
  ours(x)
  x64 = np.asarray(x, np.float64)
  np.testing.assert_allclose(ours.mean[...], (3 * loaded["mean"] + x64.mean((0, 1, 2))) / 4,
                             rtol=1e-5, atol=1e-6)
  assert int(ours.count[...]) == 4


# --- BatchRenorm and ghost batch norm (issue 12) ---

def test_batch_renorm_module_matches_the_function():
  import normjax as nj
  xs = [jnp.asarray(np.random.default_rng(i).normal(i, 1 + i, (6, 4)), jnp.float32)
        for i in range(4)]
  brn = njnnx.BatchRenorm(4, momentum=0.8, r_max=1.5, d_max=0.5, warmup_steps=1,
                          rngs=nnx.Rngs(0))
  stats = nj.init_batch_stats(4)
  for x in xs:
    y = brn(x)
    y_ref, stats = nj.batch_renorm(x, jnp.ones(4), jnp.zeros(4), stats, train=True,
                                   momentum=0.8, r_max=1.5, d_max=0.5, warmup_steps=1)
    np.testing.assert_array_equal(y, y_ref)
  np.testing.assert_array_equal(brn.var[...], stats.var)
  assert int(brn.count[...]) == 4
  brn.eval()
  np.testing.assert_array_equal(
      brn(xs[0]), nj.batch_norm(xs[0], jnp.ones(4), jnp.zeros(4), stats, train=False)[0])


def test_batch_norm_virtual_batch_size():
  import normjax as nj
  x = jnp.asarray(np.random.default_rng(1).normal(2.0, 3.0, (8, 3)), jnp.float32)
  bn = njnnx.BatchNorm(3, momentum=0.9, virtual_batch_size=2, rngs=nnx.Rngs(0))
  y = bn(x)
  y_ref, new = nj.batch_norm(x, jnp.ones(3), jnp.zeros(3), nj.init_batch_stats(3), train=True,
                             momentum=0.9, virtual_batch_size=2)
  np.testing.assert_array_equal(y, y_ref)
  np.testing.assert_array_equal(bn.var[...], new.var)


# --- Layers of today's models (issue 28): scale_offset, adaLN-Zero, AdaGN, DynamicTanh,
# --- record_health ---

def _cond_inputs(seed, shape, cond_features):
  kx, kc = jax.random.split(jax.random.key(seed))
  return (1.0 + 2.0 * jax.random.normal(kx, shape),
          jax.random.normal(kc, (shape[0], cond_features)))


@pytest.mark.parametrize("use_gate", [True, False])
def test_adaptive_layer_norm_at_init_is_the_plain_layer_norm_with_a_zero_gate(use_gate):
  x, cond = _cond_inputs(30, (3, 5, 8), 6)
  module = njnnx.AdaptiveLayerNorm(8, 6, use_gate=use_gate, rngs=nnx.Rngs(0))
  n = 3 if use_gate else 2
  params = nnx.to_pure_dict(nnx.state(module, nnx.Param))
  assert jax.tree.map(jnp.shape, params) == {"modulation": {"kernel": (6, n * 8),
                                                            "bias": (n * 8,)}}
  assert all(not np.any(v) for v in jax.tree.leaves(params))         # adaLN-Zero
  out = module(x, cond)
  y, gate = out if use_gate else (out, None)
  x64 = np.asarray(x, np.float64)
  expected = (x64 - x64.mean(-1, keepdims=True)) / np.sqrt(x64.var(-1, keepdims=True) + 1e-6)
  np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
  if use_gate:
    np.testing.assert_array_equal(gate, np.zeros((3, 1, 8)))


def _linen_twin(name, linen_options, nnx_args, x, cond):
  """A linen module with random variables and the nnx module of the same name loaded with
  them (the nnx Linear's `kernel`/`bias` are the linen Dense's)."""
  import normjax.linen as njnn
  linen = getattr(njnn, name)(**linen_options)
  args = (x,) if cond is None else (x, cond)
  variables = randomize(linen.init(jax.random.key(0), *args), jax.random.key(1))
  module = getattr(njnnx, name)(*nnx_args, **linen_options, rngs=nnx.Rngs(2))
  load(module, variables["params"])
  return linen.apply(variables, *args), module(*args)


@pytest.mark.parametrize("name,options,nnx_args,shape,cond_features", [
    ("AdaptiveLayerNorm", {}, (8, 6), (3, 5, 8), 6),
    ("AdaptiveLayerNorm", dict(use_gate=False, epsilon=1e-3), (8, 6), (3, 2, 4, 8), 6),
    ("AdaptiveGroupNorm", dict(num_groups=4), (8, 5), (2, 3, 3, 8), 5),
    ("DynamicTanh", dict(alpha_init=0.25), (8,), (4, 8), None),
])
def test_linen_and_nnx_give_the_same_output_for_the_same_variables(name, options, nnx_args,
                                                                   shape, cond_features):
  x, cond = _cond_inputs(31, shape, cond_features or 1)
  y_linen, y_nnx = _linen_twin(name, options, nnx_args, x,
                               None if cond_features is None else cond)
  assert jax.tree.structure(y_linen) == jax.tree.structure(y_nnx)
  jax.tree.map(np.testing.assert_array_equal, y_nnx, y_linen)


def test_dynamic_tanh_parameters_and_output_in_float64():
  module = njnnx.DynamicTanh(8, alpha_init=0.25, rngs=nnx.Rngs(0))
  params = nnx.to_pure_dict(nnx.state(module, nnx.Param))
  assert jax.tree.map(jnp.shape, params) == {"alpha": (), "scale": (8,), "bias": (8,)}
  assert float(params["alpha"]) == 0.25
  np.testing.assert_array_equal(params["scale"], np.ones(8))
  np.testing.assert_array_equal(params["bias"], np.zeros(8))
  params = randomize(params, jax.random.key(1))
  load(module, params)
  x, _ = data(jax.random.key(32), (4, 8))
  p64 = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  np.testing.assert_allclose(module(x), np.tanh(p64["alpha"] * np.asarray(x, np.float64))
                             * p64["scale"] + p64["bias"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["LayerNorm", "RMSNorm", "AddLayerNorm", "AddRMSNorm"])
def test_scale_offset_is_the_functional_zero_centered_scale(name):
  import normjax as nj
  x, _ = data(jax.random.key(33), (4, 8))
  r, _ = data(jax.random.key(34), (4, 8))
  args = (x, r) if name.startswith("Add") else (x,)
  assert np.all(getattr(njnnx, name)(8, scale_offset=1.0, rngs=nnx.Rngs(0)).scale[...] == 1)
  module = getattr(njnnx, name)(8, scale_offset=1.0, scale_init=nnx.initializers.zeros,
                                rngs=nnx.Rngs(0))
  np.testing.assert_array_equal(module.scale[...], np.zeros(8))
  w = 0.1 * jax.random.normal(jax.random.key(35), (8,))
  b = jax.random.normal(jax.random.key(36), (8,))
  module.scale[...] = w
  if hasattr(module, "bias"):
    module.bias[...] = b
  expected = {"LayerNorm": lambda: nj.layer_norm(x, w, b, eps=1e-6, scale_offset=1.0),
              "RMSNorm": lambda: nj.rms_norm(x, w, scale_offset=1.0),
              "AddLayerNorm": lambda: nj.add_layer_norm(x, r, w, b, eps=1e-6, scale_offset=1.0),
              "AddRMSNorm": lambda: nj.add_rms_norm(x, r, w, scale_offset=1.0)}[name]()
  assert_close(module(*args), expected, tol=0)


@pytest.mark.parametrize("name,axes", [("LayerNorm", (-1,)), ("RMSNorm", (-1,)),
                                       ("BatchNorm", (0, 1))])
def test_record_health_sows_a_norm_health_as_an_intermediate(name, axes):
  import normjax as nj
  x = jax.random.normal(jax.random.key(37), (3, 4, 5))
  x = x.at[..., 2].set(3.0).at[1, 0].set(3.0)        # a constant channel and a constant row
  quiet = getattr(njnnx, name)(5, rngs=nnx.Rngs(0))
  _, intermediates = nnx.capture(quiet, nnx.Intermediate)(x)
  assert not intermediates                             # default: nothing sown
  module = getattr(njnnx, name)(5, record_health=True, rngs=nnx.Rngs(0))
  _, intermediates = nnx.capture(module, nnx.Intermediate)(x)
  (health,) = intermediates["norm_health"].get_value()      # one call, one NormHealth
  assert isinstance(health, nj.NormHealth)
  assert_close(health, nj.norm_health(x, axis=axes, eps=module.epsilon), tol=0)
  assert float(health.constant) == pytest.approx(1 / 5 if name == "BatchNorm" else 1 / 12)


def test_adaptive_layer_norm_under_nnx_jit_and_grad():
  x, cond = _cond_inputs(38, (3, 5, 8), 6)
  module = njnnx.AdaptiveLayerNorm(8, 6, rngs=nnx.Rngs(0))
  weights = jnp.asarray(np.random.default_rng(0).normal(size=(3, 5, 8)), jnp.float32)

  @nnx.jit
  def step(module, x, cond):
    def loss(module, x, cond):
      y, gate = module(x, cond)
      return jnp.sum(weights * y * (1 + gate))
    return nnx.grad(loss, argnums=(0, 1, 2))(module, x, cond)

  grads, gx, gc = step(module, x, cond)
  kernel = grads["modulation"]["kernel"][...]
  assert kernel.shape == (6, 24)
  for part in (kernel[:, :8], kernel[:, 8:16], kernel[:, 16:]):   # shift, scale, gate all learn
    assert np.abs(part).max() > 1e-3                               # from adaLN-Zero's zeros
  assert np.all(np.isfinite(gx)) and np.all(gc == 0)   # zero kernel: no gradient to cond yet
  # The same gradient as linen's module, whose derivatives test_linen checks against DiT.
  import normjax.linen as njnn
  linen = njnn.AdaptiveLayerNorm()
  variables = {"params": {"modulation": nnx.to_pure_dict(nnx.state(module.modulation))}}
  g_linen = jax.grad(lambda v, x: jnp.sum(weights * linen.apply(v, x, cond)[0]
                                          * (1 + linen.apply(v, x, cond)[1])),
                     argnums=(0, 1))(variables, x)
  assert_close((nnx.to_pure_dict(grads)["modulation"], gx),
               (g_linen[0]["params"]["modulation"], g_linen[1]), tol=1e-5)


@pytest.mark.parametrize("build,args,error,match", [
    (lambda: njnnx.AdaptiveLayerNorm(8, 6, rngs=nnx.Rngs(0)), ((2, 3, 8), (2, 5)), ValueError,
     r"cond must have shape \(B, cond_features\) = \(2, 6\).*got cond of shape \(2, 5\)"),
    (lambda: njnnx.AdaptiveLayerNorm(8, 6, rngs=nnx.Rngs(0)), ((2, 3, 8), (3, 6)), ValueError,
     "cond must have shape"),
    (lambda: njnnx.AdaptiveLayerNorm(8, 6, rngs=nnx.Rngs(0)), ((2, 3, 4), (2, 6)), ValueError,
     "num_features=8"),
    (lambda: njnnx.AdaptiveGroupNorm(8, 6, num_groups=4, rngs=nnx.Rngs(0)), ((2, 8), (2, 6, 1)),
     ValueError, "cond must have shape"),
    (lambda: njnnx.AdaptiveLayerNorm(8, 0, rngs=nnx.Rngs(0)), None, ValueError, "cond_features"),
    (lambda: njnnx.AdaptiveLayerNorm(8, 6, use_gate=1, rngs=nnx.Rngs(0)), None, TypeError,
     "use_gate"),
    (lambda: njnnx.AdaptiveGroupNorm(8, 6, num_groups=3, rngs=nnx.Rngs(0)), None, ValueError,
     "num_groups=3 must divide"),
    (lambda: njnnx.DynamicTanh(0, rngs=nnx.Rngs(0)), None, ValueError, "num_features"),
    (lambda: njnnx.LayerNorm(4, scale_offset=1.0, use_scale=False, rngs=nnx.Rngs(0)), ((2, 4),),
     ValueError, "scale_offset=1.0 needs a scale"),
])
def test_bad_inputs_of_the_new_modules_raise_named_errors(build, args, error, match):
  with pytest.raises(error, match=match):
    module = build()
    module(*[jnp.ones(s) for s in args])
