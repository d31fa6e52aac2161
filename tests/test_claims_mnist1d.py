"""The claims lab's MNIST-1D task: the vendored generator (`examples/_mnist1d_data.py`) and the
normalization study on it (`examples/claims_mnist1d.py`)."""

import json
import math
import pathlib
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

import _mnist1d_data as m1d  # noqa: E402
import claims_mnist1d as cm1d  # noqa: E402


# ---------------------------------------------------------------------------------------------
# The data.

@pytest.fixture(scope="module")
def reference_split():
  """`make_dataset()` with the defaults, generated once for the module (about a second)."""
  return m1d.make_dataset()


def test_templates_match_the_reference_construction():
  t = m1d.templates()
  assert t["x"].shape == (10, 12) and t["t"].shape == (12,)
  np.testing.assert_array_equal(t["y"], np.arange(10))
  np.testing.assert_array_equal(t["x"][:, 0], 0.0)          # every signal starts at 0
  # Whitened, shifted to start at 0, divided by 6: the std of each row is 1/6.
  np.testing.assert_allclose(t["x"].std(1), 1 / 6, rtol=1e-12)
  assert len({tuple(row) for row in np.round(t["x"], 9)}) == 10


def test_make_dataset_shapes_labels_and_standardization(reference_split):
  d = reference_split
  assert d["x"].shape == (4000, 40) and d["x_test"].shape == (1000, 40)
  assert d["y"].shape == (4000,) and d["y_test"].shape == (1000,) and d["t"].shape == (40,)
  y = np.concatenate([d["y"], d["y_test"]])
  np.testing.assert_array_equal(np.bincount(y), [500] * 10)   # 5,000 / 10 per class
  x = np.concatenate([d["x"], d["x_test"]])
  assert abs(x.mean()) < 1e-12 and abs(x.std() - 1) < 1e-12
  assert np.isfinite(x).all()


def test_make_dataset_is_deterministic_and_seeded():
  a = m1d.make_dataset(num_samples=200)
  b = m1d.make_dataset(num_samples=200)
  for k in ("x", "y", "x_test", "y_test", "t"):
    np.testing.assert_array_equal(a[k], b[k])
  c = m1d.make_dataset(num_samples=200, seed=7)
  assert not np.array_equal(a["x"], c["x"])
  with pytest.raises(TypeError, match="unknown MNIST-1D arguments"):
    m1d.make_dataset(num_sample=10)


def test_defaults_are_the_reference_generators():
  assert m1d.DEFAULTS == dict(num_samples=5000, train_split=0.8, template_len=12,
                              padding=(36, 60), scale_coeff=0.4, max_translation=48,
                              corr_noise_scale=0.25, iid_noise_scale=2e-2, shear_scale=0.75,
                              final_seq_length=40, seed=42)


def test_identical_to_the_mnist1d_package(reference_split):
  """Bit-identical to `mnist1d.data.make_dataset(get_dataset_args())` (nothing downloaded)."""
  try:
    from mnist1d.data import get_dataset_args
    from mnist1d.data import make_dataset as reference
  except ImportError as e:   # not installed (or its requests/matplotlib imports are missing)
    pytest.skip(f"mnist1d package not importable: {e}")
  ref = reference(get_dataset_args())
  ours = reference_split
  for k in ("x", "y", "x_test", "y_test", "t"):
    np.testing.assert_array_equal(ours[k], ref[k], err_msg=k)


def test_split_is_fixed_disjoint_and_typed(reference_split):
  s = m1d.load()
  assert [a.shape for a in s] == [(3200, 40, 1), (3200,), (800, 40, 1), (800,),
                                  (1000, 40, 1), (1000,)]
  assert all(a.dtype == np.float32 for a in (s.x_train, s.x_val, s.x_test))
  assert all(a.dtype == np.int32 for a in (s.y_train, s.y_val, s.y_test))
  # The reference's train set cut into train + validation, its test set untouched.
  d = reference_split
  np.testing.assert_array_equal(s.x_train[..., 0], d["x"][:3200].astype(np.float32))
  np.testing.assert_array_equal(s.x_val[..., 0], d["x"][3200:].astype(np.float32))
  np.testing.assert_array_equal(s.y_test, d["y_test"])
  # No example in two splits (every signal is unique: noise on every point).
  rows = lambda x: {r.tobytes() for r in x}
  tr, va, te = rows(s.x_train), rows(s.x_val), rows(s.x_test)
  assert len(tr) == 3200 and len(va) == 800 and len(te) == 1000
  assert not (tr & va) and not (tr & te) and not (va & te)
  for y in (s.y_train, s.y_val, s.y_test):
    assert set(np.unique(y)) == set(range(10))


# ---------------------------------------------------------------------------------------------
# The study.

def test_arms_and_conv():
  assert cm1d.ARMS == ("none@32", "batch@32", "layer@32", "group@32", "rms@32",
                       "batch@2", "group@2", "layer@2")
  assert cm1d.parse_arm("group@2") == ("group", 2)
  import inspect
  params = inspect.signature(cm1d.run).parameters
  assert list(params) == ["seeds", "quick"] and params["quick"].default is False
  with pytest.raises(ValueError, match="unknown variant"):
    cm1d.parse_arm("instance@32")
  # The conv equals lax.conv with 'same' padding (kernel 5), stride 1 and 2.
  import jax
  import jax.numpy as jnp
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((3, 40, 4)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((5, 4, 6)), jnp.float32)
  b = jnp.asarray(rng.standard_normal((6,)), jnp.float32)
  for stride in (1, 2):
    ref = jax.lax.conv_general_dilated(x, k, (stride,), ((2, 2),),
                                       dimension_numbers=("NWC", "WIO", "NWC"))
    ref = ref + b.reshape(1, 1, -1)
    np.testing.assert_allclose(cm1d.conv1d(x, k, b, stride), ref, rtol=1e-5, atol=1e-5)


TINY = cm1d.Settings(examples=32 * 2 * 2, chunks=2, lr_grid=(0.03, 0.3), width=8,
                     strides=(2, 2), arms=("none@32", "batch@32"))


def test_tiny_study_returns_the_structure(monkeypatch):
  monkeypatch.setenv("CLAIMS_NO_PROGRESS", "1")
  seeds = [3, 1]
  r = cm1d.study(seeds, TINY)
  json.dumps(r)                                             # plain JSON values
  assert r["task"] == "MNIST-1D" and r["chance"] == 0.1
  assert isinstance(r["setup"], str) and "3200 train / 800 validation" in r["setup"]
  assert r["lr_grid"] == [0.03, 0.3]
  assert r["curve_examples"] == [64, 128]
  assert r["wall_s"] > 0
  assert list(r["arms"]) == list(TINY.arms)
  for arm, a in r["arms"].items():
    assert set(a) == {"lr", "val_by_lr", "tuned"}
    assert set(a["val_by_lr"]) == {"0.03", "0.3"}
    means = {float(k): np.mean(v) for k, v in a["val_by_lr"].items()}
    assert a["lr"] == max(means, key=means.get)             # chosen on validation
    t = a["tuned"]
    assert set(t) == {"val_acc", "test_acc", "train_acc", "curve_val"}
    for k in ("val_acc", "test_acc", "train_acc"):
      assert len(t[k]) == len(seeds)
      assert all(isinstance(v, float) and math.isfinite(v) and 0 <= v <= 1 for v in t[k])
    assert t["val_acc"] == a["val_by_lr"][str(a["lr"])]
    assert np.shape(t["curve_val"]) == (len(seeds), TINY.chunks)
    assert [c[-1] for c in t["curve_val"]] == t["val_acc"]
    # Accuracies are multiples of one example of their split.
    assert all(abs(v * 800 - round(v * 800)) < 1e-6 for v in t["val_acc"])
    assert all(abs(v * 1000 - round(v * 1000)) < 1e-6 for v in t["test_acc"])


def test_tiny_study_is_paired_and_reproducible(monkeypatch):
  """Seed s is the same seed in every arm: the same seed list in another order gives the same
  per-seed numbers, permuted; and a rerun gives the same numbers."""
  monkeypatch.setenv("CLAIMS_NO_PROGRESS", "1")
  tiny = TINY._replace(arms=("none@32",))
  a = cm1d.study([3, 1], tiny)["arms"]["none@32"]["val_by_lr"]
  b = cm1d.study([1, 3], tiny)["arms"]["none@32"]["val_by_lr"]
  for lr in a:
    np.testing.assert_allclose(a[lr], b[lr][::-1], atol=1e-6)
  with pytest.raises(ValueError, match="not a multiple"):
    cm1d.study([0], tiny._replace(examples=100))


@pytest.mark.slow
def test_quick_run_learns(monkeypatch):
  """`run(quick=True)`: every arm, and batch norm at B = 32 clearly above chance."""
  monkeypatch.setenv("CLAIMS_NO_PROGRESS", "1")
  r = cm1d.run([0], quick=True)
  assert list(r["arms"]) == list(cm1d.ARMS)
  assert r["lr_grid"] == list(cm1d.LR_GRID)
  assert np.mean(r["arms"]["batch@32"]["tuned"]["test_acc"]) > 0.5
