"""normjax.linen.BatchRenorm on sbx's variables, against sbx's arithmetic (tests/sbx_batch_renorm.py).

sbx's module and ours compute the same `r`, `d` and running statistics, but place `eps`
differently (see `normjax.linen.BatchRenorm`): sbx normalizes with `var_B / r**2 + eps`,
ours with `(var_B + eps)` and then `* r + d`. So the two agree to float32 rounding when `eps`
is negligible next to the batch variance (eps -> 0, or large inputs), during warmup (plain
batch norm) and in evaluation; otherwise they differ by exactly what the two formulas give
(checked against float64 NumPy).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import normjax.linen as njnn
from tests.sbx_batch_renorm import SbxBatchRenorm

C = 4


def _data(steps, loc, spread, seed=0):
  rng = np.random.default_rng(seed)
  # Batches whose mean and spread drift, so that r and d are far from 1 and 0 (and clip).
  return [(loc * (1 + 0.5 * i) + spread * (1 + 0.3 * i) * rng.standard_normal((16, 3, C)))
          .astype(np.float32) for i in range(steps)]


def _train(module, variables, w, batches, lr=0.05):
  """SGD steps on `mean((module(x @ w) - 1)**2)`; returns per-step outputs and the final state."""
  params, stats = {"w": w, "norm": variables["params"]}, variables["batch_stats"]

  @jax.jit
  def step(params, stats, x):
    def loss(params):
      y, upd = module.apply({"params": params["norm"], "batch_stats": stats}, x @ params["w"],
                            mutable=["batch_stats"])
      return jnp.mean((y - 1.0) ** 2), (y, upd["batch_stats"])
    (_, (y, stats)), grads = jax.value_and_grad(loss, has_aux=True)(params)
    return jax.tree.map(lambda p, g: p - lr * g, params, grads), stats, y

  ys = []
  for x in batches:
    params, stats, y = step(params, stats, jnp.asarray(x))
    ys.append(y)
  return np.stack(ys), params, stats


def _sbx_made_variables(eps, warmup, batches, w):
  """Variables as sbx's module leaves them: its `init`, then two of its training steps."""
  sbx = SbxBatchRenorm(use_running_average=False, momentum=0.9, epsilon=eps,
                       warm_up_steps=warmup)
  variables = sbx.init(jax.random.key(0), jnp.asarray(batches[0]) @ w)
  _, params, stats = _train(sbx, variables, w, batches[:2])
  return {"params": params["norm"], "batch_stats": stats}, params["w"]


def _both(eps, warmup, loc, spread, steps=6):
  batches = _data(steps + 2, loc, spread)
  w0 = jnp.asarray(np.random.default_rng(1).standard_normal((C, C)).astype(np.float32) / 2)
  variables, w = _sbx_made_variables(eps, warmup, batches, w0)
  assert set(variables["batch_stats"]) == {"mean", "var", "r_max", "d_max", "steps"}
  sbx = SbxBatchRenorm(use_running_average=False, momentum=0.9, epsilon=eps,
                       warm_up_steps=warmup)
  ours = njnn.BatchRenorm(use_running_average=False, momentum=0.9, epsilon=eps,
                          warmup_steps=warmup)
  out_sbx = _train(sbx, variables, w, batches[2:])
  out_ours = _train(ours, variables, w, batches[2:])
  return batches[2:], variables, w, out_sbx, out_ours


def _assert_same(out_sbx, out_ours, tol):
  (y_s, p_s, s_s), (y_o, p_o, s_o) = out_sbx, out_ours
  np.testing.assert_allclose(y_o, y_s, rtol=tol, atol=tol)
  for key in ("w", "norm"):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=tol, atol=tol),
                 p_o[key], p_s[key])
  assert set(s_o) == set(s_s) == {"mean", "var", "r_max", "d_max", "steps"}
  for k in ("mean", "var"):
    np.testing.assert_allclose(s_o[k], s_s[k], rtol=tol, atol=tol)
  assert int(s_o["steps"]) == int(s_s["steps"]) == 8


@pytest.mark.parametrize("eps, loc, spread", [(1e-10, 1.0, 1.0),    # eps -> 0
                                              (1e-3, 30.0, 300.0)])  # sbx's eps, large var
def test_agrees_with_sbx_when_eps_is_negligible(eps, loc, spread):
  """Six training steps past warmup (r, d active), continued from sbx-made variables:
  outputs, gradient steps and running statistics agree to 1e-5 (relative for large values)."""
  *_, out_sbx, out_ours = _both(eps, warmup=3, loc=loc, spread=spread)
  _assert_same(out_sbx, out_ours, 1e-5)


def test_agrees_with_sbx_in_warmup_and_eval():
  """sbx's eps (1e-3), unit-scale data: plain batch norm during warmup, and evaluation."""
  batches, variables, w, out_sbx, out_ours = _both(1e-3, warmup=100, loc=1.0, spread=1.0)
  _assert_same(out_sbx, out_ours, 1e-5)
  x = jnp.asarray(batches[0]) @ w
  stats = out_sbx[2]
  y_s = SbxBatchRenorm(use_running_average=True, epsilon=1e-3).apply(
      {"params": variables["params"], "batch_stats": stats}, x)
  y_o = njnn.BatchRenorm(use_running_average=True, epsilon=1e-3).apply(
      {"params": variables["params"], "batch_stats": stats}, x)
  np.testing.assert_allclose(y_o, y_s, rtol=1e-6, atol=1e-6)


def _renorm64(x, mean, var, scale, bias, eps, r_max=3.0, d_max=5.0):
  """float64 NumPy: (sbx's y, ours) for one training step from running `mean`, `var`."""
  x = x.astype(np.float64).reshape(-1, C)
  mu, v = x.mean(0), x.var(0)
  ra_std = np.sqrt(var.astype(np.float64) + eps)
  r = np.clip(np.sqrt(v + eps) / ra_std, 1 / r_max, r_max)
  d = np.clip((mu - mean) / ra_std, -d_max, d_max)
  sbx = (x - (mu - d * np.sqrt(v) / r)) / np.sqrt(v / r**2 + eps)
  ours = (x - mu) / np.sqrt(v + eps) * r + d
  return sbx * scale + bias, ours * scale + bias


def test_default_eps_difference_is_the_eps_placement():
  """sbx's eps (1e-3) on unit-scale data, past warmup: the outputs differ, by what the two
  formulas predict in float64 (to 1e-5); the size of that difference is stated here and in
  the BatchRenorm docstring."""
  eps = 1e-3
  batches = _data(4, 1.0, 1.0, seed=3)
  w = jnp.asarray(np.eye(C, dtype=np.float32))
  variables, _ = _sbx_made_variables(eps, 0, batches, w)
  x = jnp.asarray(batches[2])
  kw = dict(use_running_average=False, momentum=0.9, epsilon=eps)
  y_s, _ = SbxBatchRenorm(warm_up_steps=0, **kw).apply(variables, x, mutable=["batch_stats"])
  y_o, _ = njnn.BatchRenorm(warmup_steps=0, **kw).apply(variables, x, mutable=["batch_stats"])
  stats, params = variables["batch_stats"], variables["params"]
  sbx64, ours64 = _renorm64(*(np.asarray(a, np.float64) for a in (
      x, stats["mean"], stats["var"], params["scale"], params["bias"])), eps)
  y_s, y_o = np.asarray(y_s).reshape(-1, C), np.asarray(y_o).reshape(-1, C)
  np.testing.assert_allclose(y_s, sbx64, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(y_o, ours64, rtol=1e-5, atol=1e-5)
  measured, predicted = np.max(np.abs(y_o - y_s)), np.max(np.abs(ours64 - sbx64))
  print(f"max |ours - sbx| = {measured:.3e} (float64 formulas: {predicted:.3e})")
  np.testing.assert_allclose(measured, predicted, rtol=1e-2)
  # To first order in eps (the BatchRenorm docstring's formula), with z = (x - mu_B) / sigma_B:
  # y_sbx - y_ours = -eps / (2 var_B) * (r (r**2 - 1) z + r**2 d) * scale.
  x64 = np.asarray(x, np.float64).reshape(-1, C)
  mu, var = x64.mean(0), x64.var(0)
  ra_std = np.sqrt(np.asarray(stats["var"], np.float64) + eps)
  r = np.clip(np.sqrt(var + eps) / ra_std, 1 / 3, 3)
  d = np.clip((mu - np.asarray(stats["mean"], np.float64)) / ra_std, -5, 5)
  first_order = (-eps / (2 * var) * (r * (r**2 - 1) * (x64 - mu) / np.sqrt(var) + r**2 * d)
                 * np.asarray(params["scale"], np.float64))
  np.testing.assert_allclose(y_s - y_o, first_order, atol=2e-5)
  # Measured: 1.8e-3 (3.9e-4 of the largest |y|, 5.2) for var_B 1.7-2.5, r 1.2-1.6, d 1.5-2.4.
  assert 1e-3 < measured < 3e-3, measured
