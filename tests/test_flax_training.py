"""Small CNNs built from normjax.linen / normjax.nnx train like the same CNNs built from flax's
modules (20 optax steps on a fixed batch), and their variables round-trip through orbax."""

import contextlib
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from flax_helpers import assert_close, permissive
from flax_helpers import fast_compiles  # noqa: F401  (module-scoped autouse fixture)

import normjax.linen as njnn
import normjax.nnx as njnnx

STEPS = 20


def batch():
  """A fixed batch: 16 images 8x8x3 with mean 1 and std 2, 4 classes."""
  kx, ky = jax.random.split(jax.random.key(0))
  return 1.0 + 2.0 * jax.random.normal(kx, (16, 8, 8, 3)), jax.random.randint(ky, (16,), 0, 4)


def linen_cnn(ns):
  """Conv-BatchNorm-Conv-GroupNorm-Conv-InstanceNorm-flatten-LayerNorm-Dense-RMSNorm-Dense, the
  norms from `ns`. The convolutions have no bias: the norm after each would remove it, and Adam
  would amplify the rounding noise of its zero gradient."""

  class CNN(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
      x = nn.Conv(8, (3, 3), use_bias=False)(x)
      x = nn.relu(ns.BatchNorm(use_running_average=not train, momentum=0.9)(x))
      x = nn.relu(ns.GroupNorm(num_groups=4)(nn.Conv(8, (3, 3), use_bias=False)(x)))
      x = nn.relu(ns.InstanceNorm()(nn.Conv(8, (3, 3), use_bias=False)(x)))
      x = ns.RMSNorm()(nn.Dense(16)(ns.LayerNorm()(x.reshape(x.shape[0], -1))))
      return nn.Dense(4)(x)

  return CNN()


def train_linen(ns, variables, ctx):
  model, tx = linen_cnn(ns), optax.adam(1e-2)
  x, labels = batch()

  @jax.jit
  def step(params, batch_stats, opt_state):
    def loss_fn(params):
      with ctx():
        logits, upd = model.apply({"params": params, "batch_stats": batch_stats}, x, train=True,
                                  mutable=["batch_stats"])
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), upd
    (loss, upd), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    with permissive():    # optax's adam is not written for strict promotion either
      updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), upd["batch_stats"], opt_state, loss

  params, batch_stats = variables["params"], variables["batch_stats"]
  opt_state, losses = tx.init(params), []
  for _ in range(STEPS):
    params, batch_stats, opt_state, loss = step(params, batch_stats, opt_state)
    losses.append(float(loss))
  with ctx():
    eval_logits = jax.jit(functools.partial(model.apply, train=False))(
        {"params": params, "batch_stats": batch_stats}, x)
  return np.array(losses), {"params": params, "batch_stats": batch_stats}, eval_logits


@pytest.mark.slow
def test_linen_cnn_trains_like_flax():
  x, _ = batch()
  init = lambda ns: jax.jit(functools.partial(linen_cnn(ns).init, train=False))
  with permissive():
    variables = init(nn)(jax.random.key(1), x)
  ours_init = init(njnn)(jax.random.key(1), x)
  assert_close(ours_init, variables, tol=0)       # the same initial tree and values
  losses_theirs, vars_theirs, logits_theirs = train_linen(nn, variables, permissive)
  losses_ours, vars_ours, logits_ours = train_linen(njnn, variables, contextlib.nullcontext)
  assert losses_ours[-1] < 0.5 * losses_ours[0]
  np.testing.assert_allclose(losses_ours, losses_theirs, rtol=1e-4, atol=1e-4)
  # After 20 Adam steps (which amplify last-bit differences: normjax sums its statistics in
  # another order than flax, shifted by a sample, in its CPU kernels) parameters and logits
  # agree to 1e-3; any difference in the maths (eps, momentum, axes) is orders larger.
  assert_close(vars_ours, vars_theirs, tol=1e-3)
  assert_close(logits_ours, logits_theirs, tol=1e-3)    # evaluation mode


class NnxCNN(nnx.Module):
  """The same CNN in NNX, its norms from `ns`."""

  def __init__(self, ns, rngs):
    self.conv1 = nnx.Conv(3, 8, (3, 3), use_bias=False, rngs=rngs)
    self.bn = ns.BatchNorm(8, momentum=0.9, rngs=rngs)
    self.conv2 = nnx.Conv(8, 8, (3, 3), use_bias=False, rngs=rngs)
    self.gn = ns.GroupNorm(8, num_groups=4, rngs=rngs)
    self.conv3 = nnx.Conv(8, 8, (3, 3), use_bias=False, rngs=rngs)
    self.inorm = ns.InstanceNorm(8, rngs=rngs)
    self.ln = ns.LayerNorm(512, rngs=rngs)
    self.dense1 = nnx.Linear(512, 16, rngs=rngs)
    self.rms = ns.RMSNorm(16, rngs=rngs)
    self.dense2 = nnx.Linear(16, 4, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.bn(self.conv1(x)))
    x = nnx.relu(self.gn(self.conv2(x)))
    x = nnx.relu(self.inorm(self.conv3(x)))
    return self.dense2(self.rms(self.dense1(self.ln(x.reshape(x.shape[0], -1)))))


def train_nnx(model, ctx):
  x, labels = batch()
  optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer):
    def loss_fn(model):
      with ctx():
        logits = model(x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    with permissive():    # optax's adam is not written for strict promotion
      optimizer.update(model, grads)
    return loss

  losses = [float(step(model, optimizer)) for _ in range(STEPS)]
  model.eval()
  with ctx():
    return np.array(losses), model(x)


@pytest.mark.slow
def test_nnx_cnn_trains_like_flax():
  theirs, ours = NnxCNN(nnx, nnx.Rngs(0)), NnxCNN(njnnx, nnx.Rngs(0))
  assert_close(nnx.to_pure_dict(nnx.state(ours)), nnx.to_pure_dict(nnx.state(theirs)), tol=0)
  losses_theirs, logits_theirs = train_nnx(theirs, permissive)
  losses_ours, logits_ours = train_nnx(ours, contextlib.nullcontext)
  assert losses_ours[-1] < 0.5 * losses_ours[0]
  np.testing.assert_allclose(losses_ours, losses_theirs, rtol=1e-4, atol=1e-4)
  assert_close(logits_ours, logits_theirs, tol=1e-3)      # evaluation mode (see above)
  assert_close(nnx.to_pure_dict(nnx.state(ours)), nnx.to_pure_dict(nnx.state(theirs)), tol=1e-3)


@pytest.mark.slow
def test_linen_variables_round_trip_through_orbax(tmp_path):
  x, _ = batch()
  model = linen_cnn(njnn)
  variables = model.init(jax.random.key(2), x, train=False)
  variables = {**variables, **model.apply(variables, x, train=True, mutable=["batch_stats"])[1]}
  bn = njnn.BatchNorm(momentum=None, use_running_average=False)    # an int32 count as well
  bn_vars = bn.init(jax.random.key(3), x)
  bn_vars = {**bn_vars, **bn.apply(bn_vars, x, mutable=["batch_stats"])[1]}
  tree = {"cnn": variables, "bn": bn_vars}
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(tmp_path / "ckpt", tree)
  checkpointer.wait_until_finished()
  restored = checkpointer.restore(tmp_path / "ckpt", jax.tree.map(ocp.utils.to_shape_dtype_struct,
                                                                  tree))
  jax.tree.map(lambda a, b: a.dtype == b.dtype or pytest.fail(f"{a.dtype} != {b.dtype}"),
               restored, tree)
  assert_close(restored, tree, tol=0)
  assert int(restored["bn"]["batch_stats"]["count"]) == 1
  assert_close(model.apply(restored["cnn"], x, train=False), model.apply(variables, x, train=False),
               tol=0)
  assert_close(bn.apply(restored["bn"], x, mutable=["batch_stats"]),
               bn.apply(bn_vars, x, mutable=["batch_stats"]), tol=0)


def test_nnx_state_round_trips_through_orbax(tmp_path):
  x, _ = batch()
  model = NnxCNN(njnnx, nnx.Rngs(4))
  model(x)                                   # training mode: BatchStats move off their init
  model.eval()
  expected = model(x)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(tmp_path / "ckpt", nnx.state(model))
  checkpointer.wait_until_finished()
  fresh = NnxCNN(njnnx, nnx.Rngs(5))
  fresh.eval()
  assert not np.allclose(fresh(x), expected)
  abstract = nnx.state(nnx.eval_shape(lambda: NnxCNN(njnnx, nnx.Rngs(5))))
  nnx.update(fresh, checkpointer.restore(tmp_path / "ckpt", abstract))
  assert_close(fresh(x), expected, tol=0)
