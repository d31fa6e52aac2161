"""`jax.export` of programs using normjax: default checks, serialization, and reloading in a
process that has never imported normjax (normjax/_src/kernels/primitives.py: the native lowering
steps aside for the reference when lowering for export; normjax/_state.py: BatchStats is
registered for serialization)."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import normjax as nj
from tests import reference as ref
from tests.helpers import rand, slow_except

pytest.importorskip("flatbuffers")


def _program(x, stats, scale):
  """Every variant, both layouts, and the batch-statistics state."""
  y, stats = nj.batch_norm(x, scale, scale, stats, train=True)
  nchw = jnp.moveaxis(y, -1, 1)
  y2, _ = nj.batch_norm(nchw, scale, None, stats, train=True, channel_axis=1)
  out = (nj.layer_norm(y, scale, scale) + nj.rms_norm(y, scale)
         + nj.group_norm(y, scale, scale, num_groups=2) + nj.instance_norm(y)
         + jnp.moveaxis(nj.instance_norm(nchw, scale, scale, channel_axis=1) + y2, 1, -1))
  return out, stats


def _args(dtype=jnp.float32):
  x = jnp.asarray(rand((4, 5, 6, 4), seed=1) + 100.0, dtype)
  return x, nj.init_batch_stats(4), jnp.linspace(0.5, 1.5, 4)


_LOAD = """
import collections, sys
import jax, jax.numpy as jnp, numpy as np
BatchStats = collections.namedtuple("BatchStats", "mean var count")
jax.export.register_namedtuple_serialization(BatchStats, serialized_name="normjax.BatchStats")
forward = jax.export.deserialize(open(sys.argv[1], "rb").read())
grad = jax.export.deserialize(open(sys.argv[2], "rb").read())
data = np.load(sys.argv[3])
stats = BatchStats(jnp.zeros(4), jnp.ones(4), jnp.zeros((), jnp.int32))
y, new = forward.call(jnp.asarray(data["x"]), stats, jnp.asarray(data["scale"]))
g = grad.call(jnp.asarray(data["x"]), stats, jnp.asarray(data["scale"]))
assert type(new).__name__ == "BatchStats"
assert "normjax" not in sys.modules
np.savez(sys.argv[4], y=np.asarray(y), mean=np.asarray(new.mean), count=np.asarray(new.count),
         g=np.asarray(g))
"""


@pytest.mark.slow
def test_export_runs_without_normjax(tmp_path):
  x, stats, scale = _args()
  forward = jax.export.export(jax.jit(_program))(x, stats, scale)   # default checks
  loss = lambda x, stats, scale: jnp.sum(jnp.sin(_program(x, stats, scale)[0]))
  grad = jax.export.export(jax.jit(jax.grad(loss)))(x, stats, scale)
  for exported in (forward, grad):
    assert "custom_call" not in exported.mlir_module()
  paths = [tmp_path / name for name in ("forward.bin", "grad.bin", "data.npz", "out.npz")]
  paths[0].write_bytes(forward.serialize())
  paths[1].write_bytes(grad.serialize())
  np.savez(paths[2], x=np.asarray(x), scale=np.asarray(scale))
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  subprocess.run([sys.executable, "-c", _LOAD, *map(str, paths)], check=True, env=env,
                 cwd=str(tmp_path))
  out = np.load(paths[3])
  y, new = jax.jit(_program)(x, stats, scale)
  np.testing.assert_allclose(out["y"], y, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out["mean"], new.mean, rtol=1e-6)
  assert int(out["count"]) == 1
  np.testing.assert_allclose(out["g"], jax.grad(loss)(x, stats, scale), rtol=1e-4, atol=1e-4)


def test_export_bfloat16_and_vmap():
  x, stats, scale = _args(jnp.bfloat16)
  fn = jax.vmap(lambda x: nj.layer_norm(x, scale, scale))
  exported = jax.export.export(jax.jit(fn))(x)
  assert "custom_call" not in exported.mlir_module()
  restored = jax.export.deserialize(exported.serialize())
  np.testing.assert_allclose(np.asarray(restored.call(x), np.float32),
                             np.asarray(fn(x), np.float32), rtol=2e-2, atol=2e-2)


@pytest.mark.slow
@pytest.mark.parametrize("masked", [False, True])
def test_export_with_a_symbolic_batch(masked):
  """Shape-polymorphic export (`b` symbolic), with and without a mask, called at two sizes."""
  _, stats, scale = _args()

  def fn(x):
    mask = (x > -1.0) if masked else None
    y, new = nj.batch_norm(x, scale, scale, stats, train=True, mask=mask)
    return (nj.layer_norm(y, scale, scale, mask=mask) + nj.rms_norm(y, scale, mask=mask)
            + nj.group_norm(y, scale, scale, num_groups=2, mask=mask)
            + nj.instance_norm(y, mask=mask)), new
  spec = jax.ShapeDtypeStruct(jax.export.symbolic_shape("b, 5, 6, 4"), jnp.float32)
  exported = jax.export.deserialize(jax.export.export(jax.jit(fn))(spec).serialize())
  for b in (2, 3):
    x = jnp.asarray(rand((b, 5, 6, 4), seed=b))
    for got, want in zip(jax.tree.leaves(exported.call(x)), jax.tree.leaves(fn(x))):
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def _export_at_two_fan_ins(fn, make_args, spec, expected, serialize=True):
  """Exports `fn` at the symbolic shapes `spec` (and round-trips it through bytes), and checks
  it against `expected` at fan-ins 3 and 7."""
  exported = jax.export.export(jax.jit(fn))(*spec)
  if serialize:
    exported = jax.export.deserialize(exported.serialize())
  for k in (3, 7):
    args = make_args(k)
    for got, want in zip(jax.tree.leaves(exported.call(*args)),
                         jax.tree.leaves(expected(*args))):
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_export_weight_norm_with_a_symbolic_fan_in():
  """`weight_norm` of a `[k, 4]` and a `[3, k, 4]` kernel with `k` symbolic, against float64
  (it took `math.sqrt` of the fan-in: `TypeError: must be real number, not _DimExpr`)."""
  g = jnp.linspace(0.5, 2.0, 4)
  fn = lambda v, w: (nj.weight_norm(v, g), nj.weight_norm(w, eps=1e-3))
  k = jax.export.symbolic_shape("k")[0]
  spec = [jax.ShapeDtypeStruct(s, jnp.float32) for s in ((k, 4), (3, k, 4))]
  _export_at_two_fan_ins(
      fn, lambda k: (jnp.asarray(rand((k, 4), k)), jnp.asarray(rand((3, k, 4), k + 1))), spec,
      lambda v, w: (ref.weight_norm(v, g), ref.weight_norm(w, eps=1e-3)))


def _named(path, name):
  """Whether a key of the pytree `path` is `name` (a dict key or an nnx attribute)."""
  return any(getattr(key, "key", getattr(key, "name", None)) == name for key in path)


def _with_symbolic_fan_in(tree, k):
  """ShapeDtypeStructs of `tree`'s leaves, the `kernel`'s axis 0 (and `x`'s last) `k`."""
  def spec(path, leaf):
    shape = tuple(leaf.shape)
    if _named(path, "kernel") or _named(path, "x"):
      axis = 0 if _named(path, "kernel") else len(shape) - 1
      dims = jax.export.symbolic_shape(", ".join(
          "k" if a == axis else str(n) for a, n in enumerate(shape)), scope=k.scope)
      return jax.ShapeDtypeStruct(dims, leaf.dtype)
    return jax.ShapeDtypeStruct(shape, leaf.dtype)
  return jax.tree_util.tree_map_with_path(spec, tree)


def test_export_flax_weight_norm_with_a_symbolic_fan_in():
  """The linen and nnx `WeightNorm(Dense/Linear)` exported with the input features symbolic."""
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel

  import normjax.linen as njnn  # pylint: disable=import-outside-toplevel
  import normjax.nnx as njnnx  # pylint: disable=import-outside-toplevel
  k = jax.export.symbolic_shape("k")[0]
  linen = njnn.WeightNorm(nn.Dense(3))
  variables = linen.init(jax.random.key(0), jnp.ones((2, 5)))
  graph, state = nnx.split(njnnx.WeightNorm(nnx.Linear(5, 3, rngs=nnx.Rngs(0)),
                                            rngs=nnx.Rngs(1)))

  def make_args(n):
    grow = lambda path, a: (jnp.asarray(rand((n,) + a.shape[1:], n)) if _named(path, "kernel")
                            else a)
    return (jax.tree_util.tree_map_with_path(grow, variables),
            jax.tree_util.tree_map_with_path(grow, state), {"x": jnp.asarray(rand((2, n), 9))})

  def fn(variables, state, x):
    return linen.apply(variables, x["x"]), nnx.merge(graph, state)(x["x"])
  spec = _with_symbolic_fan_in((variables, state, {"x": jnp.ones((2, 5))}), k)
  # Exported, not serialized: nnx's WeightNorm keys its scales by tuple paths, which
  # jax.export's serialization does not take.
  _export_at_two_fan_ins(fn, make_args, spec, fn, serialize=False)


# ------------------------------------------------- the layers of today's models (issue 28)

_B, _T, _D = 2, 3, 8
_NEW = {   # name -> function of (x, z, cond) of x's shape [B, T, D] (cond [B, 1, D])
    "adaptive_layer_norm": lambda x, z, c: nj.adaptive_layer_norm(x, c, c * 0.5),
    "adaptive_rms_norm": lambda x, z, c: nj.adaptive_rms_norm(x, c),
    "adaptive_group_norm": lambda x, z, c: nj.adaptive_group_norm(x, c, c, num_groups=2),
    "gated_rms_norm": lambda x, z, c: nj.gated_rms_norm(x, z, c[0, 0], group_size=4),
    "dynamic_tanh": lambda x, z, c: nj.dynamic_tanh(x, jnp.sum(c) * 0.1, c[0, 0], c[1, 0]),
    "l2_normalize": lambda x, z, c: nj.l2_normalize(x, axis=(1, 2)),
    "rms_norm_scale_offset": lambda x, z, c: nj.rms_norm(x, c[0, 0], scale_offset=1.0),
    "add_rms_norm_residual_dtype": lambda x, z, c: nj.add_rms_norm(
        x.astype(jnp.bfloat16), z, c[0, 0], scale_offset=1.0, residual_dtype=jnp.float32)[1],
}


def _new_args(b=_B):
  return tuple(jnp.asarray(rand(shape, seed)) for seed, shape in
               enumerate(((b, _T, _D), (b, _T, _D), (b, 1, _D))))


@pytest.mark.parametrize("name", slow_except(sorted(_NEW), "adaptive_group_norm",
                                              "add_rms_norm_residual_dtype"))
def test_export_new_functions_and_their_gradients(name):
  """Forward and gradient (in every argument) exported without native calls, serialized,
  reloaded, and equal to the jitted program."""
  fn = _NEW[name]
  args = _new_args()
  grad = jax.grad(lambda *a: jnp.sum(jnp.sin(fn(*a).astype(jnp.float32))), argnums=(0, 1, 2))
  for f in (fn, grad):
    exported = jax.export.export(jax.jit(f))(*args)
    assert "custom_call" not in exported.mlir_module()
    restored = jax.export.deserialize(exported.serialize())
    for got, want in zip(jax.tree.leaves(restored.call(*args)), jax.tree.leaves(
        jax.jit(f)(*args))):
      np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                                 rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_export_norm_health_and_a_symbolic_batch():
  """norm_health's NamedTuple survives serialization (registered as normjax.NormHealth); the
  adaptive layer norm and the health exported with the batch symbolic, called at two sizes."""
  def fn(x, z, c):
    return nj.adaptive_layer_norm(x, c, c, mask=x > -1.0), nj.norm_health(x, mask=x > -1.0)
  b = jax.export.symbolic_shape("b")[0]
  spec = [jax.ShapeDtypeStruct(s, jnp.float32) for s in ((b, _T, _D), (b, _T, _D), (b, 1, _D))]
  exported = jax.export.deserialize(jax.export.export(jax.jit(fn))(*spec).serialize())
  for b in (2, 5):
    args = _new_args(b)
    (y, health), (y_want, health_want) = exported.call(*args), fn(*args)
    assert type(health) is nj.NormHealth
    np.testing.assert_allclose(y, y_want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(health), np.asarray(health_want), rtol=1e-6)
