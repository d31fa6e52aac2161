"""PyTorch and flax define the semantics: match them (PyTorch tests skip without torch)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import normjax as nj
from tests.helpers import rand

torch = pytest.importorskip("torch")
F = torch.nn.functional


def _t(a):
  return torch.from_numpy(np.asarray(a, np.float32).copy())


@pytest.mark.parametrize("torch_momentum", [0.1, 0.3, None])
def test_batch_norm_2d_training_run_matches_torch(torch_momentum):
  """Several training steps then eval: outputs and running stats of BatchNorm2d to 1e-5."""
  torch.manual_seed(0)
  c = 5
  bn = torch.nn.BatchNorm2d(c, momentum=torch_momentum, eps=1e-5)
  with torch.no_grad():
    bn.weight.copy_(torch.randn(c))
    bn.bias.copy_(torch.randn(c))
  scale, bias = jnp.asarray(bn.weight.detach().numpy()), jnp.asarray(bn.bias.detach().numpy())
  stats = nj.init_batch_stats(c)
  ours_momentum = None if torch_momentum is None else 1.0 - torch_momentum
  step = jax.jit(lambda x, s: nj.batch_norm(x, scale, bias, s, train=True, channel_axis=1,
                                            momentum=ours_momentum, unbiased_running_var=True))
  bn.train()
  for i in range(6):
    x = rand((4, c, 3, 5), 100 + i, loc=float(i), spread=1.0 + i)   # NCHW
    y, stats = step(jnp.asarray(x), stats)
    y_torch = bn(_t(x)).detach().numpy()
    np.testing.assert_allclose(y, y_torch, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(stats.mean, bn.running_mean.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(stats.var, bn.running_var.numpy(), rtol=1e-5, atol=1e-5)
  assert int(stats.count) == int(bn.num_batches_tracked)
  bn.eval()
  x = rand((3, c, 4, 4), 200)
  y, same = nj.batch_norm(jnp.asarray(x), scale, bias, stats, train=False, channel_axis=1)
  np.testing.assert_allclose(y, bn(_t(x)).detach().numpy(), rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(same.mean, stats.mean)


@pytest.mark.parametrize("groups", [1, 2, 8])
def test_group_norm_matches_torch_nchw(groups):
  x, w, b = rand((3, 8, 5, 7), 1, loc=2.0), rand((8,), 2), rand((8,), 3)
  y = nj.group_norm(jnp.asarray(x), jnp.asarray(w), jnp.asarray(b), num_groups=groups,
                    channel_axis=1)
  y_torch = F.group_norm(_t(x), groups, _t(w), _t(b), eps=1e-5).numpy()
  np.testing.assert_allclose(y, y_torch, rtol=1e-5, atol=1e-5)


def test_instance_norm_matches_torch_nchw():
  x, w, b = rand((3, 4, 6, 5), 4, loc=-1.0), rand((4,), 5), rand((4,), 6)
  y = nj.instance_norm(jnp.asarray(x), jnp.asarray(w), jnp.asarray(b), channel_axis=1)
  y_torch = F.instance_norm(_t(x), weight=_t(w), bias=_t(b), eps=1e-5).numpy()
  np.testing.assert_allclose(y, y_torch, rtol=1e-5, atol=1e-5)


def test_instance_norm_with_running_stats_evaluates_as_batch_norm():
  """`InstanceNorm2d(track_running_stats=True)` in eval mode normalizes with its running
  statistics: `batch_norm(..., train=False)` on the state read by `from_torch_state_dict`."""
  inorm = torch.nn.InstanceNorm2d(4, affine=True, track_running_stats=True)
  inorm.train()(_t(rand((3, 4, 6, 5), 7, loc=2.0)))   # moves the running statistics
  with torch.no_grad():
    inorm.weight.normal_(), inorm.bias.normal_()
  state = nj.from_torch_state_dict(inorm.state_dict())
  x = rand((2, 4, 6, 5), 8)
  y, _ = nj.batch_norm(jnp.asarray(x), state["scale"], state["bias"], state["stats"],
                       train=False, channel_axis=1)
  np.testing.assert_allclose(y, inorm.eval()(_t(x)).detach().numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("normalized_shape", [(16,), (6, 16)])
def test_layer_norm_matches_torch(normalized_shape):
  x = rand((4, 6, 16), 7, loc=0.5)
  w, b = rand(normalized_shape, 8), rand(normalized_shape, 9)
  axis = tuple(range(-len(normalized_shape), 0))
  y = nj.layer_norm(jnp.asarray(x), jnp.asarray(w), jnp.asarray(b), axis=axis)
  y_torch = F.layer_norm(_t(x), normalized_shape, _t(w), _t(b), eps=1e-5).numpy()
  np.testing.assert_allclose(y, y_torch, rtol=1e-5, atol=1e-5)


def test_layer_norm_gradients_match_torch():
  x, w, b, g = rand((4, 16), 10), rand((16,), 11), rand((16,), 12), rand((4, 16), 13)
  tx, tw, tb = (_t(a).requires_grad_() for a in (x, w, b))
  (F.layer_norm(tx, (16,), tw, tb) * _t(g)).sum().backward()
  grads = jax.grad(lambda x, w, b: jnp.sum(nj.layer_norm(x, w, b) * jnp.asarray(g)),
                   argnums=(0, 1, 2))(jnp.asarray(x), jnp.asarray(w), jnp.asarray(b))
  for ours, theirs in zip(grads, (tx.grad, tw.grad, tb.grad)):
    np.testing.assert_allclose(ours, theirs.numpy(), rtol=1e-4, atol=1e-5)


def test_rms_norm_matches_torch():
  x, w = rand((4, 6, 16), 14, loc=0.5), rand((16,), 15)
  y = nj.rms_norm(jnp.asarray(x), jnp.asarray(w), eps=1e-6)
  y_torch = F.rms_norm(_t(x), (16,), _t(w), eps=1e-6).numpy()
  np.testing.assert_allclose(y, y_torch, rtol=1e-5, atol=1e-5)


def test_torch_loses_digits_where_we_do_not():
  """The large-mean case: PyTorch's float32 layer norm is far off, ours is not."""
  x = rand((8, 512), 16, loc=1e5)
  x64 = x.astype(np.float64)
  expected = (x64 - x64.mean(-1, keepdims=True)) / np.sqrt(x64.var(-1, keepdims=True) + 1e-5)
  ours = np.abs(np.asarray(nj.layer_norm(jnp.asarray(x)), np.float64) - expected).max()
  theirs = np.abs(F.layer_norm(_t(x), (512,)).numpy().astype(np.float64) - expected).max()
  assert ours < 1e-4 < theirs


def test_spectral_norm_matches_torch_over_training():
  """`spectral_normalize` against `torch.nn.utils.parametrizations.spectral_norm` (one power
  iteration per step, eps 1e-12) over 25 steps each of a 1e-7, an ordinary, a 1e15 and a
  1e-7 kernel on one state, and after a zero kernel: from the fifth step of each (the two
  orders of the iteration are half a step apart) the normalized kernels agree. On the zero
  kernel PyTorch's u and v become 0 and its output NaN for good, so it restarts there; ours
  returns the zero kernel and keeps u (tests/test_weights.py checks that against float64)."""
  from tests.test_weights import _kernels_with_a_gap   # pylint: disable=import-outside-toplevel
  torch.manual_seed(0)
  phases = _kernels_with_a_gap((1e-7, 1.0, 1e15, 1e-7, 0.0, 1.0, 1e-7), seed=21)
  layer = torch.nn.utils.parametrizations.spectral_norm(torch.nn.Linear(8, 4, bias=False))
  state = nj.init_spectral_state(jnp.asarray(phases[0]), jax.random.key(5))
  step = jax.jit(lambda w, s: nj.spectral_normalize(w, s, train=True))
  for w in phases:
    if not w.any():
      w_sn, state = step(jnp.asarray(w), state)
      assert not np.asarray(w_sn).any() and np.isclose(np.linalg.norm(state.u), 1.0)
      layer = torch.nn.utils.parametrizations.spectral_norm(torch.nn.Linear(8, 4, bias=False))
      continue
    with torch.no_grad():
      layer.parametrizations.weight.original.copy_(_t(w.T))   # torch's weight is [out, in]
    layer.train()
    for i in range(25):
      w_sn, state = step(jnp.asarray(w), state)
      theirs = layer.weight.detach().numpy().T
      if i >= 5:
        np.testing.assert_allclose(w_sn, theirs, rtol=1e-5, atol=1e-6)
        top = np.linalg.svd(np.asarray(w_sn, np.float64), compute_uv=False)[0]
        np.testing.assert_allclose(top, 1.0, rtol=1e-5)


# ------------------------------------------- the formulas users port (issue 28), in PyTorch


def _bf16_bits(a):
  """The bfloat16 bit patterns of a torch or jax bfloat16 array, as int32."""
  if isinstance(a, torch.Tensor):
    return a.view(torch.int16).numpy().astype(np.int32)
  return np.asarray(a).view(np.int16).astype(np.int32)


def _assert_within_one_ulp(ours, theirs):
  """Equal, or one bfloat16 ulp apart (same sign); and mostly equal."""
  a, b = _bf16_bits(ours), _bf16_bits(theirs)
  assert np.abs(a - b).max() <= 1, np.abs(a - b).max()
  assert np.mean(a == b) > 0.9


def _gemma_rms_norm(x, w, eps=1e-6):
  """Hugging Face's GemmaRMSNorm.forward: float32, normalize, * (1 + w.float()), type_as(x)."""
  out = x.float()
  out = out * torch.rsqrt(out.pow(2).mean(-1, keepdim=True) + eps)
  return (out * (1.0 + w.float())).type_as(x)


def _llama_rms_norm(x, w, eps=1e-6):
  """Hugging Face's LlamaRMSNorm.forward: float32, normalize, back to x's dtype, then w * x."""
  h = x.to(torch.float32)
  h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
  return w * h.to(x.dtype)


def _bf16_inputs(seed):
  x = rand((4, 8, 64), seed, loc=0.3)
  w = rand((64,), seed + 1, spread=0.1)   # Gemma's w: zero-initialised, trained small
  xt, wt = (torch.from_numpy(a).to(torch.bfloat16) for a in (x, w))
  xj, wj = (jnp.asarray(a.float().numpy(), jnp.bfloat16) for a in (xt, wt))
  return xt, wt, xj, wj


@pytest.mark.parametrize("seed", [0, 1])
def test_gemma_rms_norm_is_scale_offset_one(seed):
  """`rms_norm(x, w, scale_offset=1.0)` is Gemma's RMSNorm: float32 equal to 1e-6, bfloat16
  within one ulp; the bfloat16 `1 + w` a user would otherwise precompute is not."""
  xt, wt, xj, wj = _bf16_inputs(seed)
  gemma = lambda x, w: nj.rms_norm(x, w, scale_offset=1.0)
  theirs = _gemma_rms_norm(xt, wt)
  # Eager too: under jit XLA:CPU may fuse a bfloat16 `1 + w` into the float32 use and keep w.
  for ours in (jax.jit(gemma)(xj, wj), gemma(xj, wj)):
    assert ours.dtype == jnp.bfloat16 and theirs.dtype == torch.bfloat16
    _assert_within_one_ulp(ours, theirs)
  precomputed = nj.rms_norm(xj, 1 + wj)   # rounds w's small values away
  agree = lambda a: np.mean(_bf16_bits(a) == _bf16_bits(theirs))
  assert agree(precomputed) < agree(ours) - 0.1
  x32, w32 = xt.float(), wt.float()
  np.testing.assert_allclose(nj.rms_norm(jnp.asarray(x32.numpy()), jnp.asarray(w32.numpy()),
                                         scale_offset=1.0),
                             _gemma_rms_norm(x32, w32).numpy(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("seed", [0, 1])
def test_llama_rms_norm_is_rounded_then_scaled(seed):
  """Llama's order (normalized x rounded to x.dtype, then `w * x`) is
  `nj.rms_norm(x).astype(x.dtype) * w`, as rms_norm's docstring says; `nj.rms_norm(x, w)`
  differs from it in bfloat16 (one rounding, Gemma's order)."""
  xt, _, xj, _ = _bf16_inputs(seed)
  wt = torch.from_numpy(rand((64,), seed + 2, loc=1.0, spread=0.3)).to(torch.bfloat16)
  wj = jnp.asarray(wt.float().numpy(), jnp.bfloat16)
  ours = jax.jit(lambda x, w: nj.rms_norm(x).astype(x.dtype) * w[None, None])(xj, wj)
  theirs = _llama_rms_norm(xt, wt)
  assert theirs.dtype == torch.bfloat16
  _assert_within_one_ulp(ours, theirs)
  assert not np.array_equal(_bf16_bits(nj.rms_norm(xj, wj)), _bf16_bits(theirs))


def _dit_modulate(x, shift, scale):
  """DiT's `modulate` after its `LayerNorm(elementwise_affine=False, eps=1e-6)`."""
  x = F.layer_norm(x, x.shape[-1:], eps=1e-6)
  return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def test_dit_modulate_is_adaptive_layer_norm():
  """Values and gradients in x, shift and scale against PyTorch autograd."""
  x, shift, scale, g = rand((3, 10, 32), 20, loc=1.0), rand((3, 32), 21), rand((3, 32), 22), \
      rand((3, 10, 32), 23)
  tx, ts, tc = (_t(a).requires_grad_() for a in (x, shift, scale))
  y_torch = _dit_modulate(tx, ts, tc)
  (y_torch * _t(g)).sum().backward()
  fn = lambda x, b, s: nj.adaptive_layer_norm(x, b[:, None], s[:, None])
  y = jax.jit(fn)(x, shift, scale)
  np.testing.assert_allclose(y, y_torch.detach().numpy(), rtol=1e-5, atol=1e-5)
  grads = jax.jit(jax.grad(lambda *a: jnp.sum(fn(*a) * jnp.asarray(g)), (0, 1, 2)))(
      x, shift, scale)
  for ours, theirs in zip(grads, (tx.grad, ts.grad, tc.grad)):
    np.testing.assert_allclose(ours, theirs.numpy(), rtol=1e-4, atol=1e-4)


def _mamba2_rms_norm_gated(x, weight, z, eps=1e-6, group_size=None, norm_before_gate=True):
  """mamba_ssm's `rms_norm_ref` (RMSNormGated's reference), with a reshape for einops'
  `rearrange(x, '... (g d) -> ... g d', d=group_size)`."""
  dtype = x.dtype
  x, weight, z = x.float(), weight.float(), z.float()
  if not norm_before_gate:
    x = x * F.silu(z)
  if group_size is None:
    rstd = 1 / torch.sqrt(x.square().mean(dim=-1, keepdim=True) + eps)
    out = x * rstd * weight
  else:
    x_group = x.reshape(*x.shape[:-1], -1, group_size)
    rstd = 1 / torch.sqrt(x_group.square().mean(dim=-1, keepdim=True) + eps)
    out = (x_group * rstd).reshape(x.shape) * weight
  if norm_before_gate:
    out = out * F.silu(z)
  return out.to(dtype)


@pytest.mark.parametrize("norm_before_gate", [False, True])
@pytest.mark.parametrize("group_size", [None, 16])
def test_mamba2_rms_norm_gated(norm_before_gate, group_size):
  """float32 values and gradients in x, z and weight; bfloat16 within one ulp."""
  x, z, w, g = rand((2, 6, 64), 30), rand((2, 6, 64), 31), rand((64,), 32, loc=1.0), \
      rand((2, 6, 64), 33)
  kw = dict(group_size=group_size, norm_before_gate=norm_before_gate)
  tx, tz, tw = (_t(a).requires_grad_() for a in (x, z, w))
  y_torch = _mamba2_rms_norm_gated(tx, tw, tz, **kw)
  (y_torch * _t(g)).sum().backward()
  fn = lambda x, z, w: nj.gated_rms_norm(x, z, w, **kw)
  np.testing.assert_allclose(jax.jit(fn)(x, z, w), y_torch.detach().numpy(), rtol=1e-5,
                             atol=1e-5)
  grads = jax.jit(jax.grad(lambda *a: jnp.sum(fn(*a) * jnp.asarray(g)), (0, 1, 2)))(x, z, w)
  for ours, theirs in zip(grads, (tx.grad, tz.grad, tw.grad)):
    np.testing.assert_allclose(ours, theirs.numpy(), rtol=1e-4, atol=1e-4)
  bf = [torch.from_numpy(a).to(torch.bfloat16) for a in (x, z, w)]
  ours = jax.jit(fn)(*(jnp.asarray(a.float().numpy(), jnp.bfloat16) for a in bf))
  _assert_within_one_ulp(ours, _mamba2_rms_norm_gated(bf[0], bf[2], bf[1], **kw))
