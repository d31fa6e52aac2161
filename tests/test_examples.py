"""The examples run end to end (tiny settings), so that they do not rot.

Each script's `main(argv)` is called in-process, under the strict promotion rules that
`conftest.py` sets, with the smallest settings that still touch every code path.
"""

import json
import os
import sys

import numpy as np
import pytest

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
sys.path.insert(0, EXAMPLES)

import _common  # noqa: E402


def test_digits_split_is_deterministic_and_disjoint():
  a, b = _common.load_digits(), _common.load_digits()
  assert a.x_train.shape == (1347, 8, 8, 1) and a.x_test.shape == (450, 8, 8, 1)
  np.testing.assert_array_equal(a.x_test, b.x_test)
  train = {x.tobytes() for x in a.x_train}
  assert sum(x.tobytes() in train for x in a.x_test) < 10   # digits has a few duplicate images


@pytest.mark.slow
def test_masked_sequences_end_to_end(tmp_path):
  import masked_sequences

  out = masked_sequences.main(["--steps", "5", "--train-size", "64", "--test-size", "32",
                               "--out", str(tmp_path)])
  checks = out["checks"]
  for name, value in checks.items():
    if name.startswith(("layer_norm masked", "batch_norm masked")):
      assert value < 1e-4, (name, value)
    else:
      assert value > 1e-2, (name, value)
  for row in out["training"]:
    accs = list(row["test_acc"].values())
    if row["masked"]:    # masked: the padding length cannot change a single prediction
      assert max(accs) == min(accs), row
  assert (tmp_path / "results.md").exists()
  json.loads((tmp_path / "results.json").read_text())


@pytest.mark.slow
def test_flax_models_end_to_end(tmp_path):
  pytest.importorskip("normjax.linen", reason="normjax.linen (the Flax wrappers) not available")
  pytest.importorskip("normjax.nnx", reason="normjax.nnx (the Flax wrappers) not available")
  import flax_models

  out = flax_models.main(["--norms", "batch", "--epochs", "1", "--out", str(tmp_path)])
  for row in out["rows"]:
    for name, gap in row["max_logit_gap_vs_flax"].items():
      assert gap < 1e-4, (row["norm"], name, gap)
    assert 0.0 <= row["linen_test_acc"] <= 1.0 and 0.0 <= row["nnx_test_acc"] <= 1.0
  assert (tmp_path / "results.md").exists()
