"""`jax.export` of programs using normjax: default checks, serialization, and reloading in a
process that has never imported normjax (normjax/_kernels/primitives.py: the native lowering
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
from tests.helpers import rand

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
