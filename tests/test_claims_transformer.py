"""The claims lab's transformer experiment (`examples/claims_transformer.py`): the task's labels,
the blocks against a float64 NumPy model, DyT, the pairing, the learning-rate protocol, and a
tiny end-to-end run."""

import collections
import json
import math
import pathlib
import sys

import jax
import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

import claims_transformer as ct  # noqa: E402

TINY = ct.Settings(steps=8, batch=4, chunks=2, blocks=2, n_train=32, n_val=8, n_test=8)


# ---------------------------------------------------------------------------------------------
# The task.

def test_labels_are_counts_minus_one():
  split = ct.make_split(np.random.default_rng(3), 20, ct.FULL)
  assert split.tokens.shape == split.labels.shape == (20, ct.FULL.length)
  for tokens, labels in zip(split.tokens, split.labels):
    counts = collections.Counter(tokens.tolist())
    assert labels.tolist() == [counts[t] - 1 for t in tokens.tolist()]


def test_chance_is_the_mode_of_the_counts():
  # Binomial(15, 1/16), by hand: P(0) = (15/16)**15 = P(1) = 15 * (1/16) * (15/16)**14 = 0.3798.
  assert ct.chance(ct.FULL) == pytest.approx((15 / 16) ** 15)
  assert ct.chance(ct.FULL._replace(vocab=8)) == pytest.approx(15 / 8 * (7 / 8) ** 14)
  train, _, _ = ct.make_data(ct.FULL)
  freq = np.bincount(train.labels.ravel()) / train.labels.size
  assert freq.max() == pytest.approx(ct.chance(ct.FULL), abs=0.01)


def test_splits_are_fixed_and_distinct():
  a, b = ct.make_data(TINY), ct.make_data(TINY)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x.tokens, y.tokens)
  assert not np.array_equal(a[1].tokens, a[2].tokens[:len(a[1].tokens)])


# ---------------------------------------------------------------------------------------------
# The blocks against an independent float64 NumPy model.

def _np_norm(kind, p, h):
  if kind == "layer":
    mu = h.mean(-1, keepdims=True)
    var = ((h - mu) ** 2).mean(-1, keepdims=True)
    return (h - mu) / np.sqrt(var + 1e-5) * p["scale"] + p["bias"]
  if kind == "rms":
    return h / np.sqrt((h ** 2).mean(-1, keepdims=True) + 1e-6) * p["scale"]
  if kind == "dyt":
    return np.tanh(p["alpha"] * h) * p["scale"] + p["bias"]
  return h


def _np_gelu(x):
  return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def _np_attention(p, y, heads):
  n, t, d = y.shape
  qkv = (y @ p["qkv"] + p["qkv_b"]).reshape(n, t, 3, heads, d // heads)
  q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
  logits = np.einsum("nqhd,nkhd->nhqk", q, k) / np.sqrt(d // heads)
  w = np.exp(logits - logits.max(-1, keepdims=True))
  w /= w.sum(-1, keepdims=True)
  return np.einsum("nhqk,nkhd->nqhd", w, v).reshape(n, t, d) @ p["out"] + p["out_b"]


def _np_forward(params, tokens, place, kind, s):
  params = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  h = params["embed"][tokens] + params["pos"]
  for i in range(s.blocks):
    p = jax.tree.map(lambda a: a[i], params["blocks"])
    mlp = lambda y: _np_gelu(y @ p["fc1"] + p["fc1_b"]) @ p["fc2"] + p["fc2_b"]
    if place == "pre":
      h = h + _np_attention(p, _np_norm(kind, p["norm1"], h), s.heads)
      h = h + mlp(_np_norm(kind, p["norm2"], h))
    else:
      h = _np_norm(kind, p["norm1"], h + _np_attention(p, h, s.heads))
      h = _np_norm(kind, p["norm2"], h + mlp(h))
  if place == "pre":
    h = _np_norm(kind, params["final_norm"], h)
  return h @ params["head"] + params["head_b"]


def _random_params(s, seed=0):
  """Initial weights with non-trivial norm parameters and biases, so each one matters."""
  rng = np.random.default_rng(seed)
  params = ct.init_params(rng, s)
  return jax.tree.map(
      lambda a: (a + 0.3 * rng.standard_normal(a.shape)).astype(np.float32), params)


@pytest.mark.parametrize("arch", range(len(ct._ARCHS)))
def test_forward_matches_float64_model(arch):
  s = TINY
  params = _random_params(s)
  tokens = ct.make_split(np.random.default_rng(1), 3, s).tokens
  got = np.asarray(jax.jit(ct.forward, static_argnums=3)(params, tokens, np.int32(arch), s))
  want = _np_forward(params, tokens, *ct._ARCHS[arch], s)
  np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4)


def test_post_ln_rows_are_standardized_before_the_affine():
  s = TINY
  params = _random_params(s, seed=2)
  h = np.random.default_rng(4).standard_normal((3, s.length, s.d_model)).astype(np.float32)
  out = np.asarray(ct.post_ln_blocks("layer", params, h, s.heads), np.float64)
  last = params["blocks"]["norm2"]
  z = (out - last["bias"][-1]) / last["scale"][-1]
  np.testing.assert_allclose(z.mean(-1), 0.0, atol=1e-4)
  np.testing.assert_allclose(z.var(-1), 1.0, atol=1e-3)


def test_pre_ln_stream_is_not_normalized():
  # Pre-LN leaves the residual stream unnormalized: without the final norm ("none") the rows
  # keep the embedding's scale; with it, the rows are standardized.
  s = TINY
  params = _random_params(s, seed=5)
  h = 3.0 * np.random.default_rng(6).standard_normal((2, s.length, s.d_model)).astype(np.float32)
  params["final_norm"] = ct._norm_params(None, (s.d_model,))
  y = np.asarray(ct.pre_ln_blocks("layer", params, h, s.heads), np.float64)
  np.testing.assert_allclose(y.var(-1), 1.0, atol=1e-3)
  raw = np.asarray(ct.pre_ln_blocks("none", params, h, s.heads), np.float64)
  assert raw.var(-1).mean() > 4.0


def test_dyt_is_linear_at_small_alpha_and_a_sign_at_large():
  x = np.linspace(-3, 3, 13, dtype=np.float32).reshape(1, 13)
  scale = np.full((13,), 2.0, np.float32)
  bias = np.full((13,), 0.5, np.float32)
  small = np.asarray(ct.dynamic_tanh(x, np.float32(1e-3), scale, bias))
  np.testing.assert_allclose(small, 2.0 * 1e-3 * x + 0.5, rtol=0, atol=1e-7)
  large = np.asarray(ct.dynamic_tanh(x, np.float32(1e3), scale, bias))
  np.testing.assert_allclose(large, 2.0 * np.sign(x) + 0.5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Pairing, schedule, and the learning-rate protocol.

def test_runs_pair_seeds_across_learning_rates():
  s = TINY
  params, orders, lrs = ct._runs([7, 8], s)
  k = len(ct.LR_GRID)
  assert lrs.tolist() == pytest.approx(list(ct.LR_GRID) * 2)
  for leaf in jax.tree.leaves(params):
    assert all(np.array_equal(leaf[0], leaf[j]) for j in range(k))
  assert all(np.array_equal(orders[0], orders[j]) for j in range(k))
  assert not np.array_equal(params["embed"][0], params["embed"][k])
  assert not np.array_equal(orders[0], orders[k])
  again, orders2, _ = ct._runs([8], s)      # a seed's run does not depend on its neighbours
  np.testing.assert_array_equal(again["embed"][0], params["embed"][k])
  np.testing.assert_array_equal(orders2[0], orders[k])


def test_schedule_warmup_and_decay():
  lr = ct.schedule(np.float32(0.01), np.int32(10), 100)
  assert float(lr(0)) == pytest.approx(0.001)
  assert float(lr(9)) == pytest.approx(0.01)
  assert float(lr(55)) == pytest.approx(0.005)
  assert float(lr(100)) == pytest.approx(0.0)
  no_warmup = ct.schedule(np.float32(0.01), np.int32(0), 100)
  assert float(no_warmup(0)) == pytest.approx(0.01)
  assert float(no_warmup(50)) == pytest.approx(0.005)


def test_learning_rates_are_chosen_on_validation_not_test(monkeypatch):
  # A fake trainer: validation accuracy is best at the largest lr for "pre_layer" and at the
  # smallest for every other arm; test accuracy is the reverse. The chosen lrs must follow
  # validation, the shared lr is pre_layer's, and the test numbers are reported, not used.
  grid = np.array(ct.LR_GRID, np.float32)

  def fake_make_train(s):
    def fn(arch, warmup, params, orders, lrs, data):
      rank = np.searchsorted(grid, lrs) / (len(grid) - 1)   # 0 .. 1 along the grid
      val = 0.5 + 0.4 * (rank if int(arch) == 0 and int(warmup) > 0 else 1 - rank)
      r = len(lrs)
      return {"val_acc": val, "test_acc": 1.0 - val, "train_loss": np.zeros(r),
              "diverged": np.zeros(r, bool), "curve_val": np.tile(val[:, None], (1, s.chunks))}
    return fn

  monkeypatch.setattr(ct, "make_train", fake_make_train)
  out = ct.run([0, 1], settings=TINY, bar=_NoBar())
  assert out["arms"]["pre_layer"]["lr"] == ct.LR_GRID[-1]
  assert out["shared_lr"] == ct.LR_GRID[-1]
  for arm in ct.ARMS[1:]:
    assert out["arms"][arm]["lr"] == ct.LR_GRID[0], arm
    assert out["arms"][arm]["tuned"]["val_acc"] == pytest.approx([0.9, 0.9])
    assert out["arms"][arm]["tuned"]["test_acc"] == pytest.approx([0.1, 0.1])
    assert out["arms"][arm]["shared"]["val_acc"] == pytest.approx([0.5, 0.5])


class _NoBar:
  def update(self, n):
    pass


# ---------------------------------------------------------------------------------------------
# End to end, tiny.

@pytest.mark.slow   # compiles the training program: ~15 s quiet, a minute on a busy machine
def test_run_tiny_returns_the_documented_structure():
  seeds = [0, 3]
  out = ct.run(seeds, settings=TINY, bar=_NoBar())
  json.dumps(out)                                            # plain Python values only
  assert set(out) == {"task", "setup", "chance", "lr_grid", "shared_lr", "arms", "curve_steps",
                      "wall_s"}
  assert "\n" not in out["task"]
  assert out["lr_grid"] == list(ct.LR_GRID) and out["shared_lr"] in ct.LR_GRID
  assert out["curve_steps"] == [4, 8]
  assert 0 < out["chance"] < 1 and out["wall_s"] > 0
  assert tuple(out["arms"]) == ct.ARMS
  for arm, r in out["arms"].items():
    assert r["lr"] in ct.LR_GRID
    assert set(r["val_by_lr"]) == {str(lr) for lr in ct.LR_GRID}
    assert all(len(v) == 2 for v in r["val_by_lr"].values())
    for key in ("tuned", "shared"):
      m = r[key]
      assert set(m) == {"val_acc", "test_acc", "train_loss", "diverged", "curve_val"}
      for name in ("val_acc", "test_acc", "train_loss"):
        assert len(m[name]) == 2 and all(math.isfinite(v) for v in m[name]), (arm, name)
        assert all(type(v) is float for v in m[name])
      assert m["diverged"] == [False, False]
      assert np.shape(m["curve_val"]) == (2, 2)
      assert m["curve_val"][0][-1] == m["val_acc"][0]
    assert r["tuned"]["val_acc"] == r["val_by_lr"][str(r["lr"])]
  # Reproducible: the same seeds give the same numbers.
  again = ct.run(seeds, settings=TINY, bar=_NoBar())
  assert again["arms"]["post_layer"]["tuned"] == out["arms"]["post_layer"]["tuned"]
