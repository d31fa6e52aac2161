"""normjax/_src/interop.py: `fold_batch_norm` against batch_norm evaluation after a convolution
and PyTorch's fusion; `from_torch_state_dict`/`to_torch_state_dict`: exact round trips,
errors, and PyTorch's running-statistics rule."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import normjax as nj
import normjax.linen as njnn
from tests import reference as ref
from tests.helpers import rand


def _conv(x, kernel, bias):  # NHWC, HWIO
  y = jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME",
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                   precision=jax.lax.Precision.HIGHEST)
  return y if bias is None else y + jnp.asarray(bias).reshape(1, 1, 1, -1)


@pytest.mark.parametrize("with_bias,with_affine", [(True, True), (False, True), (True, False)])
def test_fold_conv_matches_batch_norm_eval(with_bias, with_affine):
  x = rand((2, 5, 5, 3), 1)
  kernel, c = rand((3, 3, 3, 4), 2), 4
  bias = rand((c,), 3) if with_bias else None
  scale, bn_bias = (rand((c,), 4), rand((c,), 5)) if with_affine else (None, None)
  mean, var = rand((c,), 6), np.abs(rand((c,), 7)) + 0.1
  stats = nj.BatchStats(jnp.asarray(mean), jnp.asarray(var), jnp.zeros((), jnp.int32))
  k2, b2 = nj.fold_batch_norm(kernel, bias, scale, bn_bias, stats, eps=1e-3)
  y = _conv(jnp.asarray(x), k2, b2)
  # float64 reference: the (float64) conv output through the NumPy batch norm.
  conv64 = np.asarray(_conv(jnp.asarray(x), jnp.asarray(kernel), bias), np.float64)
  y_ref, _, _ = ref.batch_norm(conv64, scale, bn_bias, mean, var, train=False, eps=1e-3)
  np.testing.assert_allclose(y, y_ref, 1e-4, 1e-4)
  assert k2.shape == kernel.shape and b2.shape == (c,)


def test_fold_other_out_axis_dense():
  x, kernel = rand((4, 3), 1), rand((5, 3), 2)   # kernel [C, in]: out_axis=0 (PyTorch's Linear)
  mean, var, scale = rand((5,), 3), np.abs(rand((5,), 4)) + 0.5, rand((5,), 5)
  stats = nj.BatchStats(jnp.asarray(mean), jnp.asarray(var), None)
  k2, b2 = nj.fold_batch_norm(kernel, None, scale, None, stats, out_axis=0)
  y_ref, _, _ = ref.batch_norm(x.astype(np.float64) @ kernel.T.astype(np.float64), scale, None,
                               mean, var, train=False)
  np.testing.assert_allclose(np.asarray(x, np.float64) @ np.asarray(k2, np.float64).T
                             + np.asarray(b2, np.float64)[None],
                             y_ref, 1e-5, 1e-5)


def test_fold_wrong_channels():
  with pytest.raises(ValueError, match="along out_axis=-1"):
    nj.fold_batch_norm(jnp.ones((3, 5)), None, None, None, nj.init_batch_stats(4))


def test_fold_matches_torch_fuse_conv_bn_eval():
  torch = pytest.importorskip("torch")
  from torch.nn.utils.fusion import fuse_conv_bn_eval
  torch.manual_seed(0)
  conv, bn = torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4, eps=1e-3)
  with torch.no_grad():
    bn.running_mean.normal_(), bn.running_var.uniform_(0.5, 2.0)
    bn.weight.normal_(), bn.bias.normal_()
  conv.eval(), bn.eval()
  fused = fuse_conv_bn_eval(conv, bn)
  stats = nj.BatchStats(bn.running_mean.numpy(), bn.running_var.numpy(), None)
  k2, b2 = nj.fold_batch_norm(conv.weight.detach().numpy(), conv.bias.detach().numpy(),
                              bn.weight.detach().numpy(), bn.bias.detach().numpy(), stats,
                              eps=1e-3, out_axis=0)
  np.testing.assert_allclose(k2, fused.weight.detach().numpy(), 1e-6, 1e-6)
  np.testing.assert_allclose(b2, fused.bias.detach().numpy(), 1e-6, 1e-6)


class _Net(nn.Module):
  fold: bool = False
  epsilons: tuple = (1e-5, 1e-5)

  @nn.compact
  def __call__(self, x, train=False):
    for i in range(2):
      x = nn.Conv(4, (3, 3), use_bias=self.fold, name=f"conv{i}")(x)
      if not self.fold:
        x = njnn.BatchNorm(use_running_average=not train, epsilon=self.epsilons[i],
                           name=f"bn{i}")(x)
      x = nn.relu(x)
    return x


@pytest.mark.slow
def test_fold_linen_params_recipe():
  x = jnp.asarray(rand((2, 6, 6, 3), 8))
  model = _Net()
  variables = model.init(jax.random.key(0), x)
  # Non-trivial statistics and affine parameters.
  variables = jax.tree.map(lambda v: v + 0.3 * jax.random.uniform(jax.random.key(1), v.shape),
                           variables)
  y = model.apply(variables, x)
  params = nj.fold_linen_params(variables["params"], variables["batch_stats"],
                                [("conv0", "bn0"), ("conv1", "bn1")])
  assert set(params) == {"conv0", "conv1"}
  y_folded = _Net(fold=True).apply({"params": params}, x)
  np.testing.assert_allclose(y_folded, y, 1e-5, 1e-5)
  assert "bn0" in variables["params"]   # the input is not modified


def test_fold_linen_params_eps_per_batch_norm():
  x = jnp.asarray(rand((2, 6, 6, 3), 8))
  model = _Net(epsilons=(1e-5, 0.5))
  variables = model.init(jax.random.key(0), x)
  variables = jax.tree.map(lambda v: v + 0.3 * jax.random.uniform(jax.random.key(1), v.shape),
                           variables)
  y = model.apply(variables, x)
  pairs = [("conv0", "bn0"), ("conv1", "bn1")]
  params = nj.fold_linen_params(variables["params"], variables["batch_stats"], pairs,
                                eps={"bn0": 1e-5, "bn1": 0.5})
  np.testing.assert_allclose(_Net(fold=True).apply({"params": params}, x), y, 1e-5, 1e-5)
  # One eps for both is not the model (the test can fail).
  params = nj.fold_linen_params(variables["params"], variables["batch_stats"], pairs)
  assert np.abs(_Net(fold=True).apply({"params": params}, x) - y).max() > 1e-3
  with pytest.raises(ValueError, match=r"missing \['bn1'\]"):
    nj.fold_linen_params(variables["params"], variables["batch_stats"], pairs,
                         eps={"bn0": 1e-5})


class _Folding(nn.Module):
  """A conv (plain or `ConvTranspose(transpose_kernel=True)`) + BatchNorm, or the folded conv."""
  transpose_kernel: bool = False
  affine: bool = True
  fold: bool = False

  @nn.compact
  def __call__(self, x, train=False):
    if self.transpose_kernel:
      x = nn.ConvTranspose(4, (3, 3), transpose_kernel=True, use_bias=self.fold, name="conv")(x)
    else:
      x = nn.Conv(4, (3, 3), use_bias=self.fold, name="conv")(x)
    if not self.fold:
      x = nn.BatchNorm(use_running_average=not train, use_scale=self.affine,
                       use_bias=self.affine, name="bn")(x)
    return x


@pytest.mark.parametrize("transpose_kernel,affine,out_axis", [
    (True, True, {"conv": -2}), (True, True, -2), (False, False, -1)])
def test_fold_linen_params_transposed_kernels_and_no_affine(transpose_kernel, affine, out_axis):
  """`ConvTranspose(transpose_kernel=True)` keeps its output channels on axis -2 (`out_axis`),
  and a BatchNorm without scale and bias has no params entry."""
  x = jnp.asarray(rand((2, 5, 5, 4), 1) * 2 + 1)
  model = _Folding(transpose_kernel, affine)
  variables = model.init(jax.random.key(1), x)
  _, upd = model.apply(variables, x, train=True, mutable=["batch_stats"])
  params = variables["params"]
  if affine:
    params = {**params, "bn": {"scale": jnp.arange(1.0, 5.0), "bias": jnp.arange(4.0)}}
  want = model.apply({"params": params, "batch_stats": upd["batch_stats"]}, x)
  folded = nj.fold_linen_params(params, upd["batch_stats"], [("conv", "bn")], out_axis=out_axis)
  got = _Folding(transpose_kernel, affine, fold=True).apply({"params": folded}, x)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_fold_linen_params_names_a_missing_layer():
  params = {"conv": {"kernel": jnp.ones((1, 2))}}
  stats = {"bn": {"mean": jnp.zeros(2), "var": jnp.ones(2)}}
  with pytest.raises(ValueError, match="'conv2' is not in params"):
    nj.fold_linen_params(params, stats, [("conv2", "bn")])
  with pytest.raises(ValueError, match="'bn2' is not in batch_stats"):
    nj.fold_linen_params(params, stats, [("conv", "bn2")])
  with pytest.raises(ValueError, match=r"out_axis.*\['cnv'\]"):
    nj.fold_linen_params(params, stats, [("conv", "bn")], out_axis={"cnv": -2})
  assert nj.fold_linen_params(params, stats, [("conv", "bn")], out_axis={})["conv"]["bias"].shape \
      == (2,)


def test_fold_batch_norm_names_bad_statistics():
  kernel = jnp.ones((2, 3))
  with pytest.raises(ValueError, match=r"stats.mean must be a 1-D \[C\] array.*\(1, 3\)"):
    nj.fold_batch_norm(kernel, None, None, None,
                       nj.BatchStats(jnp.zeros((1, 3)), jnp.ones(3), None))
  with pytest.raises(TypeError, match="stats must be a BatchStats.*dict"):
    nj.fold_batch_norm(kernel, None, None, None, {"mean": jnp.zeros(3), "var": jnp.ones(3)})


# ----------------------------------------------------------------- PyTorch state dicts

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
