"""The claims lab (`examples/claims_lab.py`): it runs, its verdict rule is right, and the README's
claims table is the committed run's (`docs/claims/`)."""

import json
import os
import pathlib
import re
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

import _claims_report as report  # noqa: E402
import claims_lab  # noqa: E402
from _claims_report import Comparison  # noqa: E402

VERDICT_CELLS = {"reproduced", "partly", "not reproduced"}


def _table_rows(markdown: str) -> list[list[str]]:
  """The cells of the `| claim | experiment | result | verdict |` table (independent parser)."""
  match = re.search(r"^\| claim \| experiment \| result \| verdict \|\n\|---\|---\|---\|---\|\n"
                    r"((?:\|.*\|\n?)+)", markdown, flags=re.M)
  assert match, "no claims table found"
  return [[c.strip() for c in line.strip().strip("|").split(" | ")]
          for line in match.group(1).splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------------
# The verdict rule on synthetic numbers (2 x seed noise and 1 point minimum, by hand).

def test_comparison_holds_beyond_two_sigma_and_min_effect():
  # effect 0.10, noise hypot(0.03, 0.04) = 0.05, threshold 2 * 0.05 = 0.10: not strictly above.
  assert not Comparison("x", 0.60, 0.03, 0.50, 0.04).holds
  assert Comparison("x", 0.6001, 0.03, 0.50, 0.04).holds
  # No seed noise: the 1-point minimum applies.
  assert not Comparison("x", 0.505, 0.0, 0.50, 0.0).holds
  assert Comparison("x", 0.52, 0.0, 0.50, 0.0).holds
  # A custom minimum effect (e.g. one grid step of lr in log10).
  assert not Comparison("x", 0.3, 0.0, 0.0, 0.0, min_effect=0.4).holds
  assert Comparison("x", 0.5, 0.0, 0.0, 0.0, min_effect=0.4).holds
  # The wrong direction never holds, however large.
  assert not Comparison("x", 0.1, 0.0, 0.9, 0.0).holds


def test_verdict_gives_each_outcome():
  strong = Comparison("strong", 0.95, 0.01, 0.50, 0.02)        # +45 points, noise 2.2
  noisy = Comparison("noisy", 0.80, 0.10, 0.70, 0.10)          # +10 points, needs > 28.3
  wrong = Comparison("wrong", 0.40, 0.01, 0.60, 0.01)          # -20 points
  assert report.verdict([strong]) == "reproduced"
  assert report.verdict([strong, strong]) == "reproduced"
  assert report.verdict([strong, noisy]) == "partly"
  assert report.verdict([wrong, strong]) == "partly"
  assert report.verdict([noisy]) == "not reproduced"
  assert report.verdict([noisy, wrong]) == "not reproduced"
  with pytest.raises(ValueError, match="at least one comparison"):
    report.verdict([])


# ---------------------------------------------------------------------------------------------
# Every experiment's sweep, verdict and report, with a stand-in trainer (compiling the real
# programs of all nine takes minutes on 2 cores); the real model and loop are run below.

def _stub_train(names, cfg, data, s, point, bar=None, task="digits", program=None):
  import numpy as np
  out = {}
  for name in names:
    rng = np.random.default_rng(abs(hash((name, cfg, tuple(sorted(point.items())), task))))
    curve = np.sort(rng.uniform(0.1, 1.0, (len(s.seeds), cfg.num_chunks)), axis=1)
    out[name] = {"test_acc": curve[:, -1], "train_acc": np.minimum(curve[:, -1] + 0.02, 1.0),
                 "curve": curve}
  return out


def test_every_experiment_writes_its_report(tmp_path, monkeypatch):
  monkeypatch.setattr(claims_lab, "train", _stub_train)
  monkeypatch.setenv("CLAIMS_NO_PROGRESS", "1")
  out = claims_lab.main(["--quick", "--seeds", "0", "1", "--out", str(tmp_path)])
  names = list(claims_lab.EXPERIMENTS)
  md = (tmp_path / "claims.md").read_text()
  rows = _table_rows(md)
  assert [r[1] for r in rows] == [f"`{n}`" for n in names]
  assert [r[0].split(".")[0] for r in rows] == [str(i) for i in range(1, 10)]
  for row in rows:
    assert row[3] in VERDICT_CELLS, row
    assert re.search(r"\d", row[2]), f"result cell without numbers: {row}"
  results = json.loads((tmp_path / "results.json").read_text())
  assert [e["name"] for e in results["experiments"]] == names
  for e in results["experiments"]:
    # The stored verdict is the rule applied to the stored comparisons.
    comps = [Comparison(**{k: c[k] for k in Comparison._fields}) for c in e["comparisons"]]
    assert report.verdict(comps) == e["verdict"]
    assert f"**Verdict: {e['verdict']}.**" in md
    for t in e["tables"]:
      assert set(t["rows"]), t["title"]
      if t["plot"]:
        assert (tmp_path / t["plot"]).stat().st_size > 1000
  assert (tmp_path / "convergence_curves.png").exists()
  assert len(out["outcomes"]) == 9


@pytest.mark.parametrize("stride", [1, 2])
def test_conv3x3_matches_a_float64_loop(stride):
  import numpy as np
  import claims_model
  rng = np.random.default_rng(1)
  x, kernel = rng.standard_normal((2, 8, 8, 3)), rng.standard_normal((3, 3, 3, 4))
  bias = rng.standard_normal(4)
  xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  want = np.zeros((2, 8 // stride, 8 // stride, 4))
  for i in range(8 // stride):
    for j in range(8 // stride):
      window = xp[:, stride * i:stride * i + 3, stride * j:stride * j + 3, :]
      want[:, i, j] = np.einsum("nhwc,hwco->no", window, kernel) + bias
  got = claims_model.conv3x3(*(a.astype(np.float32) for a in (x, kernel, bias)), stride)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)


def test_real_training_runs_every_variant(tmp_path):
  """The real model and loop, tiny: every CNN variant (with dropout) and the RNN via the CLI."""
  import numpy as np
  import _common
  claims_lab._RESULTS.clear()
  data = _common.load_digits()
  s = claims_lab.Settings(seeds=(0, 1), examples=64, chunks=2, quick=True)
  cfg = claims_lab.config(s, 4, depth=2, dropout=True)
  res = claims_lab.train(claims_lab.CNN_MAIN, cfg, data, s, {"drop": 0.1})
  assert set(res) == set(claims_lab.CNN_MAIN)
  for name, r in res.items():
    assert r["test_acc"].shape == (2,) and r["curve"].shape == (2, 2), name
    assert np.all((r["test_acc"] >= 0) & (r["test_acc"] <= 1)), name
  # The switch really picks different normalizations.
  assert len({tuple(r["curve"].ravel().tolist()) for r in res.values()}) > 3
  os.environ["CLAIMS_NO_PROGRESS"] = "1"
  out = claims_lab.main(["--quick", "--only", "recurrent", "--examples", "64", "--seeds", "0",
                         "--out", str(tmp_path)])
  assert _table_rows((tmp_path / "claims.md").read_text())[0][3] in VERDICT_CELLS
  assert (tmp_path / "rnn_accuracy.png").exists() and len(out["outcomes"]) == 1


# ---------------------------------------------------------------------------------------------
# The committed full run, and the README that quotes it.

DOCS = ROOT / "docs" / "claims"


def test_committed_run_is_complete_and_its_verdicts_follow_the_rule():
  md = (DOCS / "claims.md").read_text()
  rows = _table_rows(md)
  results = json.loads((DOCS / "results.json").read_text())
  assert len(rows) == 9 and len(results["experiments"]) == 9
  assert "--quick" not in results["config"]["command"]
  for row, e in zip(rows, results["experiments"]):
    comps = [Comparison(**{k: c[k] for k in Comparison._fields}) for c in e["comparisons"]]
    assert row[3] == e["verdict"] == report.verdict(comps)
    for t in e["tables"]:
      if t["plot"]:
        assert (DOCS / t["plot"]).exists(), t["plot"]


def test_readme_claims_table_is_the_committed_one():
  readme = (ROOT / "README.md").read_text()
  committed = (DOCS / "claims.md").read_text()
  assert _table_rows(readme) == _table_rows(committed)
  for png in re.findall(r"\(docs/claims/([\w.]+\.png)\)", readme):
    assert (DOCS / png).exists(), png
