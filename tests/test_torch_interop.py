"""state_dict conversion: exact round trips, errors, and PyTorch's running-statistics rule."""

import jax.numpy as jnp
import numpy as np
import pytest

import normjax as nj


def _sd(prefix="bn."):
  rng = np.random.default_rng(0)
  return {prefix + "weight": rng.normal(size=3).astype(np.float32),
          prefix + "bias": rng.normal(size=3).astype(np.float32),
          prefix + "running_mean": rng.normal(size=3).astype(np.float32),
          prefix + "running_var": rng.random(3).astype(np.float32) + 0.5,
          prefix + "num_batches_tracked": np.asarray(7, np.int64)}


def test_round_trip_is_exact():
  sd = _sd()
  out = nj.from_torch_state_dict(sd, prefix="bn.")
  back = nj.to_torch_state_dict(scale=out["scale"], bias=out["bias"], stats=out["stats"],
                                prefix="bn.")
  assert set(back) == set(sd)
  for k, v in sd.items():
    np.testing.assert_array_equal(back[k], v)
    assert back[k].dtype == v.dtype
  assert int(out["stats"].count) == 7


@pytest.mark.parametrize("change,match", [
    (lambda sd: sd.pop("bn.running_var"), "missing the key 'bn.running_var'"),
    (lambda sd: sd.__setitem__("bn.bias", np.zeros(4, np.float32)), r"'bn.bias'.*\(3,\).*\(4,\)"),
    (lambda sd: sd.clear(), "none of the keys"),
    (lambda sd: sd.update({"bn.running_mean": np.zeros((3, 1), np.float32)}),
     r"'bn.running_mean'\] must be a 1-D.*\(3, 1\)"),
    (lambda sd: sd.update({"bn.num_batches_tracked": np.array(2.7)}), "value 2.7"),
    (lambda sd: sd.update({"bn.num_batches_tracked": np.array(-1)}), "value -1"),
    (lambda sd: sd.update({"bn.weight": np.ones(3, np.complex64)}), "'bn.weight'.*complex64"),
    (lambda sd: sd.update({"bn.weight": np.ones((3, 2), np.float32)}),
     r"'bn.weight'\] must have shape \(3,\) \(that of state_dict\['bn.running_mean'\]\)"),
])
def test_errors_name_the_key(change, match):
  sd = _sd()
  change(sd)
  with pytest.raises(ValueError, match=match):
    nj.from_torch_state_dict(sd, prefix="bn.")


def test_torch_batch_norm_round_trip_and_training_rule():
  torch = pytest.importorskip("torch")
  torch.manual_seed(0)
  bn = torch.nn.BatchNorm2d(3, momentum=0.1, eps=1e-5)
  with torch.no_grad():
    bn.weight.normal_(), bn.bias.normal_(), bn.running_mean.normal_()
  out = nj.from_torch_state_dict(bn.state_dict())   # tensors, no prefix
  x = torch.randn(4, 3, 5, 5) * 2 + 1
  y_torch = bn.train()(x).detach().numpy()
  y, stats = nj.batch_norm(jnp.asarray(x.numpy()), out["scale"], out["bias"], out["stats"],
                           train=True, channel_axis=1, momentum=0.9, unbiased_running_var=True)
  np.testing.assert_allclose(y, y_torch, 1e-5, 1e-5)
  sd = nj.to_torch_state_dict(scale=out["scale"], bias=out["bias"], stats=stats)
  for k, v in bn.state_dict().items():
    np.testing.assert_allclose(sd[k], v.numpy(), 1e-6, 1e-6)
  bn2 = torch.nn.BatchNorm2d(3)
  bn2.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()})
  assert int(bn2.num_batches_tracked) == 1


def test_from_pytorch_example():
  pytest.importorskip("torch")
  import sys, os
  sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
  try:
    import from_pytorch
  finally:
    sys.path.pop(0)
  assert from_pytorch.main() < 1e-5


def test_layer_norm_of_several_axes_bfloat16_and_a_missing_count():
  """A LayerNorm's `[*normalized_shape]` weight; torch bfloat16 tensors (no `.numpy()`); and
  `stats.count` None (linen's batch_stats) written as 0."""
  torch = pytest.importorskip("torch")
  ln = torch.nn.LayerNorm((4, 5))
  with torch.no_grad():
    ln.weight.normal_(), ln.bias.normal_()
  out = nj.from_torch_state_dict(ln.state_dict())
  x = torch.randn(2, 3, 4, 5)
  np.testing.assert_allclose(nj.layer_norm(jnp.asarray(x.numpy()), out["scale"], out["bias"],
                                           axis=(-2, -1)),
                             ln(x).detach().numpy(), rtol=1e-5, atol=1e-5)
  back = nj.to_torch_state_dict(scale=out["scale"], bias=out["bias"])
  ln.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()})

  bn = torch.nn.BatchNorm2d(3).bfloat16()
  with torch.no_grad():
    bn.running_mean.normal_()
  out = nj.from_torch_state_dict(bn.state_dict())
  np.testing.assert_array_equal(out["stats"].mean, bn.running_mean.float().numpy())

  out = nj.from_torch_state_dict({"weight": jnp.ones(3, jnp.bfloat16)})   # a JAX bfloat16 array
  assert out["scale"].dtype == jnp.float32

  stats = nj.BatchStats(jnp.zeros(3), jnp.ones(3), None)
  sd = nj.to_torch_state_dict(stats=stats, prefix="bn.")
  assert int(sd["bn.num_batches_tracked"]) == 0
  with pytest.raises(ValueError, match="stats.count"):
    nj.to_torch_state_dict(stats=nj.BatchStats(jnp.zeros(3), jnp.ones(3), jnp.zeros(2)))
  with pytest.raises(ValueError, match=r"stats.mean.*1-D"):
    nj.to_torch_state_dict(stats=nj.BatchStats(jnp.zeros((3, 2)), jnp.ones((3, 2)), 0))


def test_checkpoints_cast_wholesale_and_prefixes_naming_statistics():
  """A state dict cast as a whole (`num_batches_tracked` a float, weights integer) still
  loads, and a prefix containing "running_" or "stats." does not make a weight a statistic."""
  sd = {k: v.astype(np.float16) for k, v in _sd().items()}
  out = nj.from_torch_state_dict(sd, prefix="bn.")
  assert int(out["stats"].count) == 7
  out = nj.from_torch_state_dict({"weight": np.array([1, 2, 3])})
  np.testing.assert_array_equal(out["scale"], [1.0, 2.0, 3.0])
  ln = {"stats.ln.weight": np.ones((2, 3), np.float32), "stats.ln.bias": np.zeros((2, 3))}
  assert nj.from_torch_state_dict(ln, prefix="stats.ln.")["scale"].shape == (2, 3)
  assert set(nj.to_torch_state_dict(scale=jnp.ones((2, 3)), prefix="running_ln.")) == {
      "running_ln.weight"}
  stats = nj.BatchStats(jnp.zeros(3), jnp.ones(3), jnp.float32(4))
  assert int(nj.to_torch_state_dict(stats=stats)["num_batches_tracked"]) == 4
