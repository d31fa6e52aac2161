"""The claims lab (`examples/claims_lab.py`): its statistics and verdict rule on hand-made
numbers, the pre-registration, the CLI's errors, every experiment's report (with a stand-in
trainer, and for real on a tiny configuration), and the README's tables are the committed
run's (`docs/claims/`)."""

import json
import math
import os
import pathlib
import re
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

import _claims_report as report  # noqa: E402
import _claims_stats as cs  # noqa: E402
import claims_lab  # noqa: E402

DOCS = ROOT / "docs" / "claims"


def _table_rows(markdown: str) -> list[list[str]]:
  """The cells of the `| claim | experiment | result | verdict |` table (independent parser)."""
  match = re.search(r"^\| claim \| experiment \| result \| verdict \|\n\|---\|---\|---\|---\|\n"
                    r"((?:\|.*\|\n?)+)", markdown, flags=re.M)
  assert match, "no claims table found"
  return [[c.strip() for c in line.strip().strip("|").split(" | ")]
          for line in match.group(1).splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------------
# Statistics, by hand.

def test_paired_interval_by_hand():
  a = [0.9, 0.8, 0.85, 0.95, 0.7]
  b = [0.8, 0.75, 0.8, 0.8, 0.72]
  d = np.array(a) - np.array(b)                       # 0.1, 0.05, 0.05, 0.15, -0.02
  mean, sd = d.mean(), math.sqrt(((d - d.mean()) ** 2).sum() / 4)
  half = 2.7764451051977987 * sd / math.sqrt(5)       # t_{0.975, 4}
  ci = cs.paired_interval(a, b)
  assert ci.n == 5
  np.testing.assert_allclose([ci.mean, ci.sd, ci.low, ci.high],
                             [mean, sd, mean - half, mean + half], rtol=1e-12)
  # The pairing matters: the same numbers unpaired (shuffled b) give another interval.
  assert cs.paired_interval(a, b[::-1]).sd != pytest.approx(ci.sd)
  with pytest.raises(ValueError, match="at least 2 seeds"):
    cs.paired_interval([1.0], [0.0])
  with pytest.raises(ValueError, match="equal length"):
    cs.paired_interval([1.0, 2.0], [0.0])


def _ci(mean, low, high):
  return cs.Interval(mean, low, high, 1.0, 5, 0.5)


@pytest.mark.parametrize("ci, min_effect, pre, want", [
    (_ci(5.0, 2.0, 8.0), 2.0, True, "reproduced"),        # above 0, mean >= min effect
    (_ci(1.5, 0.5, 2.5), 2.0, True, "inconclusive"),      # above 0 but the mean too small
    (_ci(-3.0, -5.0, -1.0), 2.0, True, "contradicted"),   # below 0
    (_ci(0.2, -1.0, 1.4), 2.0, True, "no effect"),        # within +- min effect
    (_ci(1.0, -3.0, 5.0), 2.0, True, "inconclusive"),     # wide
    (_ci(5.0, 2.0, 8.0), 2.0, False, "not testable here"),  # precondition failed
])
def test_each_verdict_from_hand_made_intervals(ci, min_effect, pre, want):
  assert cs.verdict(ci, min_effect, pre) == want


@pytest.mark.parametrize("ci, want", [
    (_ci(0.2, -1.0, 1.4), "reproduced"),      # within the +-2 band
    (_ci(4.0, 3.0, 5.0), "contradicted"),     # entirely outside
    (_ci(-4.0, -5.0, -3.0), "contradicted"),
    (_ci(1.0, -1.0, 3.0), "inconclusive"),    # straddles the band's edge
])
def test_equivalence_verdicts(ci, want):
  assert cs.verdict(ci, 2.0, True, equivalence=True) == want


def test_verdict_rejects_a_non_positive_minimum_effect():
  with pytest.raises(ValueError, match="min_effect"):
    cs.verdict(_ci(1.0, 0.5, 1.5), 0.0)


def test_holm_by_hand():
  # Sorted p: 0.01 (x3 = 0.03), 0.02 (x2 = 0.04), 0.04 (x1 = 0.04, monotone).
  assert cs.holm([0.04, 0.01, 0.02]) == pytest.approx([0.04, 0.03, 0.04])
  assert cs.holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])   # capped at 1


def test_judge_applies_the_precondition_and_the_registered_direction():
  claim = claims_lab.CLAIM_BY_NUMBER["2"]
  good = claims_lab.Outcome("2", [90, 91, 92, 89, 90], [10, 11, 9, 10, 10], "r", True, "")
  assert claims_lab.judge(claim, good)["verdict"] == "reproduced"
  assert claims_lab.judge(claim, good._replace(precondition=False))["verdict"] == \
      "not testable here"
  flipped = good._replace(a=good.b, b=good.a)
  assert claims_lab.judge(claim, flipped)["verdict"] == "contradicted"


# ---------------------------------------------------------------------------------------------
# Pre-registration: the claims and their comparisons are fixed in code, before any run.

def test_claims_are_registered_before_the_run():
  numbers = [c.number for c in claims_lab.CLAIMS]
  assert len(numbers) == len(set(numbers)) >= 13
  for c in claims_lab.CLAIMS:
    assert c.experiment in claims_lab.EXPERIMENTS or c.number == "12", c
    assert c.min_effect > 0 and c.source and c.comparison and c.unit, c
  every = sorted(n for e in claims_lab.EXPERIMENTS for n in claims_lab.registered(e))
  assert every == sorted(numbers)          # each claim tested by exactly one experiment


# ---------------------------------------------------------------------------------------------
# Every experiment's report, with stand-ins for the training (the real thing is below).

def _stub_train(name, cfg, data, s, points, program=claims_lab.PROGRAM, task="digits", bar=None):
  out = []
  for p in points:
    seed = abs(hash((name, cfg, p, task))) % 2**32
    rng = np.random.default_rng(seed)
    curve = np.sort(rng.uniform(0.5, 1.0, (len(s.seeds), cfg.num_chunks)), axis=1)
    acc = curve[:, -1]
    out.append({"test_acc": acc, "val_acc": np.clip(acc + 0.01, 0, 1),
                "train_acc": np.minimum(acc + 0.05, 1.0), "train_loss": 1.0 - acc,
                "test_acc_population": np.clip(acc + 0.02, 0, 1), "curve_test": curve,
                "curve_loss": 1.0 - curve})
  return out


def _stub_module(arms, shared=False):
  def run(seeds, quick=False):
    rng = np.random.default_rng(0)
    cell = lambda: {"val_acc": rng.uniform(0.5, 1, len(seeds)).tolist(),
                    "test_acc": rng.uniform(0.5, 1, len(seeds)).tolist(),
                    "train_loss": [0.1] * len(seeds), "train_acc": [1.0] * len(seeds),
                    "diverged": [False] * len(seeds), "curve_val": [[0.5, 0.9]] * len(seeds)}
    return {"task": "stub", "setup": "stub setup", "chance": 0.1, "lr_grid": [0.1],
            "shared_lr": 0.1, "curve_steps": [1, 2], "curve_examples": [1, 2], "wall_s": 0.0,
            "arms": {a: {"lr": 0.1, "val_by_lr": {"0.1": [0.9] * len(seeds)}, "tuned": cell(),
                         **({"shared": cell()} if shared else {})} for a in arms}}
  return run


@pytest.fixture
def stubbed(monkeypatch):
  import claims_model
  import claims_mnist1d
  import claims_transformer
  monkeypatch.setattr(claims_lab, "train", _stub_train)
  monkeypatch.setenv("CLAIMS_NO_PROGRESS", "1")
  monkeypatch.setattr(claims_mnist1d, "run", _stub_module(claims_mnist1d.ARMS))
  monkeypatch.setattr(claims_transformer, "run", _stub_module(claims_transformer.ARMS, True))

  def grad_norms(names, cfg):
    return lambda which, params, x, y: np.tile(
        np.geomspace(1.0, 10.0 ** (int(which) + 1), cfg.depth),
        (params["stem"]["kernel"].shape[0], 1))

  def make_step(names, cfg):
    return (lambda w, p, s, x, y: (p, s)), (lambda w, p, s, x: x)
  monkeypatch.setattr(claims_model, "make_grad_norms", grad_norms)
  monkeypatch.setattr(claims_model, "make_step", make_step)
  claims_lab._RESULTS.clear()


def test_every_experiment_writes_its_report(tmp_path, stubbed):
  out = claims_lab.main(["--quick", "--seeds", "0", "1", "2", "3", "4", "--out",
                         str(tmp_path / "r")])
  md = (tmp_path / "r" / "claims.md").read_text()
  rows = _table_rows(md)
  assert [r[0].split(".")[0] for r in rows] == [c.number for c in claims_lab.CLAIMS]
  for row in rows:
    assert row[3] in cs.VERDICTS, row
    assert re.search(r"\[[-+]\d", row[2]) and "95 % CI" in row[2], row   # effect with its CI
  assert md.index("A reduced run (`--quick`)") < md.index("| claim |")  # said at the top
  results = json.loads((tmp_path / "r" / "results.json").read_text())
  meta = results["meta"]
  for key in ("git commit", "normjax", "jax", "flax", "cpu level", "seeds", "quick"):
    assert key in meta, key
  assert meta["seeds"] == [0, 1, 2, 3, 4] and meta["quick"] is True
  for j in results["claims"]:
    # The stored verdict is the rule applied to the stored per-seed numbers.
    claim = claims_lab.CLAIM_BY_NUMBER[j["claim"]["number"]]
    ci = cs.paired_interval(j["a"], j["b"])
    pre = True if j["precondition_held"] is None else j["precondition_held"]
    assert j["verdict"] == cs.verdict(ci, claim.min_effect, pre, claim.equivalence)
  for sec in results["sections"].values():
    for t in sec.get("tables", []):
      if t["plot"]:
        assert (tmp_path / "r" / t["plot"]).stat().st_size > 1000, t["plot"]
  assert len(out["claims"]) == len(claims_lab.CLAIMS)
  # The decision table in claims.md is the one results.json regenerates.
  assert "\n".join(report.decision_table(results)) in md


def test_an_experiment_reporting_an_unregistered_claim_is_refused(tmp_path, stubbed,
                                                                  monkeypatch):
  real = claims_lab.EXPERIMENTS["gn_vs_bn"]

  def wrong(ctx):
    r = real.run(ctx)
    r["outcomes"] = [r["outcomes"][0]._replace(number="5a")]
    return r
  monkeypatch.setitem(claims_lab.EXPERIMENTS, "gn_vs_bn", real._replace(run=wrong))
  with pytest.raises(RuntimeError, match="registered"):
    claims_lab.main(["--only", "gn_vs_bn", "--seeds", "0", "1", "--out", str(tmp_path / "x")])


# ---------------------------------------------------------------------------------------------
# The CLI: bad input is a clear message and a non-zero exit; a failed run overwrites nothing.

@pytest.mark.parametrize("argv, message", [
    (["--only", "nonsense"], "invalid choice: 'nonsense'"),
    (["--seeds", "3"], "at least 2 distinct seeds"),
    (["--seeds", "3", "3"], "at least 2 distinct seeds"),
    (["--examples", "5"], "--examples must be at least 64"),
    (["--out", "/proc/claims-lab-cannot-write-here"], "is not writable"),
])
def test_cli_rejects_bad_input(argv, message, capsys):
  with pytest.raises(SystemExit) as e:
    claims_lab.main(argv)
  assert e.value.code == 2
  assert message in capsys.readouterr().err


def test_a_run_replaces_its_own_files_and_keeps_others(tmp_path, stubbed):
  out = tmp_path / "results"
  out.mkdir()
  (out / "index.md").write_text("a docs page")
  (out / "stale_plot.png").write_bytes(b"old")
  (out / "claims.md").write_text("previous")
  claims_lab.main(["--only", "gn_vs_bn", "--seeds", "0", "1", "--out", str(out)])
  assert (out / "index.md").read_text() == "a docs page"
  assert not (out / "stale_plot.png").exists()
  assert "| claim |" in (out / "claims.md").read_text()
  assert sorted(p.name for p in tmp_path.iterdir()) == ["results"]   # no temporary folder left


def test_a_failed_run_leaves_the_previous_results(tmp_path, stubbed, monkeypatch):
  out = tmp_path / "results"
  out.mkdir()
  (out / "claims.md").write_text("previous")

  def boom(ctx):
    raise KeyboardInterrupt
  monkeypatch.setitem(claims_lab.EXPERIMENTS, "gn_vs_bn",
                      claims_lab.EXPERIMENTS["gn_vs_bn"]._replace(run=boom))
  with pytest.raises(KeyboardInterrupt):
    claims_lab.main(["--only", "gn_vs_bn", "--seeds", "0", "1", "--out", str(out)])
  assert (out / "claims.md").read_text() == "previous"
  assert sorted(p.name for p in tmp_path.iterdir()) == ["results"]   # no half-written folder


# ---------------------------------------------------------------------------------------------
# The model.

@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("padding", ["zero", "wrap"])
def test_conv3x3_matches_a_float64_loop(stride, padding):
  import claims_model
  rng = np.random.default_rng(1)
  x, kernel = rng.standard_normal((2, 8, 8, 3)), rng.standard_normal((3, 3, 3, 4))
  bias = rng.standard_normal(4)
  xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="wrap" if padding == "wrap" else
              "constant")
  want = np.zeros((2, 8 // stride, 8 // stride, 4))
  for i in range(8 // stride):
    for j in range(8 // stride):
      window = xp[:, stride * i:stride * i + 3, stride * j:stride * j + 3, :]
      want[:, i, j] = np.einsum("nhwc,hwco->no", window, kernel) + bias
  got = claims_model.conv3x3(*(a.astype(np.float32) for a in (x, kernel, bias)), stride, padding)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)


def test_statistics_over_k_examples_and_noisy_batch_norm():
  """`batch_k2` normalizes each pair of examples with their own statistics (float64 check);
  noisy batch norm differs from batch norm in training only."""
  import jax
  import jax.numpy as jnp
  import claims_model as cm
  import normjax as nj
  rng = np.random.default_rng(0)
  h = rng.standard_normal((4, 2, 2, 3)).astype(np.float32) * 3 + 1
  p = {"scale": jnp.ones(3), "bias": jnp.zeros(3)}
  cfg = cm.Config(batch_size=4, steps_per_chunk=1, num_chunks=1)
  ctx = cm.Ctx(jnp.zeros((), jnp.int32), 10, jax.random.key(0))
  y, _ = cm.VARIANTS["batch_k2"].norm(p, nj.init_batch_stats(3), jnp.asarray(h), cfg, True, ctx)
  h64 = h.astype(np.float64).reshape(2, 2, 2, 2, 3)
  m = h64.mean(axis=(1, 2, 3), keepdims=True)
  v = h64.var(axis=(1, 2, 3), keepdims=True)
  want = ((h64 - m) / np.sqrt(v + 1e-5)).reshape(h.shape)
  np.testing.assert_allclose(np.asarray(y), want, atol=1e-5)
  s0 = nj.init_batch_stats(3)
  yb, _ = cm.VARIANTS["batch"].norm(p, s0, jnp.asarray(h), cfg, True, ctx)
  yn, _ = cm.VARIANTS["noisy_batch"].norm(p, s0, jnp.asarray(h), cfg, True, ctx)
  assert not np.allclose(np.asarray(yn), np.asarray(yb))
  ev = ctx._replace(key=None)
  yb, _ = cm.VARIANTS["batch"].norm(p, s0, jnp.asarray(h), cfg, False, ev)
  yn, _ = cm.VARIANTS["noisy_batch"].norm(p, s0, jnp.asarray(h), cfg, False, ev)
  np.testing.assert_array_equal(np.asarray(yn), np.asarray(yb))


def test_renorm_ramps_r_max_and_d_max():
  import jax.numpy as jnp
  import claims_model as cm
  ramp = lambda step: float(cm._ramp(jnp.asarray(step), 5, 40, 1.0, 3.0))
  assert [ramp(0), ramp(5), ramp(22.5), ramp(40), ramp(100)] == pytest.approx(
      [1.0, 1.0, 2.0, 3.0, 3.0])


@pytest.mark.slow
def test_every_experiment_runs_for_real_on_a_tiny_configuration(tmp_path, monkeypatch):
  """The real models and loops (not the stand-ins), tiny: every experiment of the lab."""
  import claims_mnist1d
  import claims_transformer
  monkeypatch.setenv("CLAIMS_NO_PROGRESS", "1")
  claims_lab._RESULTS.clear()
  tiny = claims_lab.QUICK._replace(seeds=(0, 1), examples=128, chunks=2, lr_grid=(0.1,))
  monkeypatch.setattr(claims_lab, "QUICK", tiny)
  m1d = claims_mnist1d.QUICK._replace(examples=256, chunks=2, lr_grid=(0.1,))
  monkeypatch.setattr(claims_mnist1d, "run", lambda seeds, quick=False: claims_mnist1d.study(
      seeds, m1d))
  tiny_t = claims_transformer.QUICK._replace(steps=16, chunks=2, n_train=256, n_val=64,
                                             n_test=64)
  real = claims_transformer.run
  monkeypatch.setattr(claims_transformer, "run", lambda seeds, quick=False: real(
      seeds, quick, settings=tiny_t))
  out = claims_lab.main(["--quick", "--seeds", "0", "1", "--out", str(tmp_path / "r")])
  assert len(out["claims"]) == len(claims_lab.CLAIMS)
  for j in out["claims"]:
    assert np.all(np.isfinite(j["a"])) and np.all(np.isfinite(j["b"])), j["claim"]["number"]


# ---------------------------------------------------------------------------------------------
# The committed full run, and the README that quotes it.

def test_committed_run_is_the_full_study_and_its_verdicts_follow_the_rule():
  md = (DOCS / "claims.md").read_text()
  results = json.loads((DOCS / "results.json").read_text())
  assert results["meta"]["quick"] is False and len(results["meta"]["seeds"]) >= 5
  assert results["meta"]["git commit"] != "unknown"
  rows = _table_rows(md)
  assert len(rows) == len(results["claims"]) == len(claims_lab.CLAIMS)
  for row, j in zip(rows, results["claims"]):
    claim = claims_lab.CLAIM_BY_NUMBER[j["claim"]["number"]]
    ci = cs.paired_interval(j["a"], j["b"])
    pre = True if j["precondition_held"] is None else j["precondition_held"]
    assert row[3] == j["verdict"] == cs.verdict(ci, claim.min_effect, pre, claim.equivalence)
  for sec in results["sections"].values():
    for t in sec.get("tables", []):
      if t["plot"]:
        assert (DOCS / t["plot"]).exists(), t["plot"]


def test_readme_tables_are_the_committed_run():
  readme = (ROOT / "README.md").read_text()
  committed = (DOCS / "claims.md").read_text()
  assert _table_rows(readme) == _table_rows(committed)
  results = json.loads((DOCS / "results.json").read_text())
  decision = "\n".join(report.decision_table(results))
  assert decision in readme, "README's decision table is not the one results.json gives"
  for png in re.findall(r"\(docs/claims/([\w.]+\.png)\)", readme):
    assert (DOCS / png).exists(), png
