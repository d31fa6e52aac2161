"""Smoke test of the benchmark suite: `benchmarks/run.py --quick` runs and writes its reports.

No timing assertions: the numbers depend on the machine and its load. The test checks that the
JSON and markdown are produced and hold the expected rows and columns.
"""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow   # each test reads a benchmark run of a minute or more


def _run_script(out, script, *args, timeout=600):
  """Runs `benchmarks/<script> --quick --out <out> *args` on one CPU device (not conftest's
  four) and returns `out`."""
  env = dict(os.environ, PYTHONPATH=ROOT)
  env.pop("XLA_FLAGS", None)
  cmd = [sys.executable, os.path.join(ROOT, "benchmarks", script), "--quick", "--out", str(out),
         *args]
  proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout,
                        check=False)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  return out


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
  return _run_script(tmp_path_factory.mktemp("bench"), "run.py", "--allocator", "current",
                     "--no-plot")


def test_quick_json_has_expected_rows(quick_run):
  with open(quick_run / "quick.json") as f:
    data = json.load(f)
  names = [r["case"] for r in data["records"]]
  assert names == ["layer fwd 8x128x256", "layer fwdbwd 8x128x256", "group fwd 8x16x16x64",
                   "group fwdbwd 8x16x16x64", "batch_train fwd 8x16x16x64"]
  for rec in data["records"]:
    assert {"normjax", "flax", "flax_slow", "floor", "roofline"} <= set(rec["times"])
    assert {"flax", "flax_slow", "floor", "roofline"} <= set(rec["ratios"])
    assert all(t["median_s"] > 0 for t in rec["times"].values())
    # Every baseline computes the same normalization (bf16-free cases: tight agreement).
    for impl, diff in rec["max_abs_diff"].items():
      if impl in ("flax", "flax_slow", "torch"):
        assert diff < 1e-3, (rec["case"], impl, diff)
  fwdbwd = [r for r in data["records"] if r["op"] == "fwdbwd"]
  assert all({"normjax", "flax"} <= set(r["residual_bytes"]) for r in fwdbwd)
  assert data["meta"]["allocator"] in ("glibc", "tcmalloc")
  assert "flax" in data["summary"]


def test_quick_markdown_table(quick_run):
  md = (quick_run / "quick.md").read_text()
  assert "| case | normjax ms | flax ms | /flax |" in md
  for name in ("layer fwd 8x128x256", "group fwdbwd 8x16x16x64", "batch_train fwd 8x16x16x64"):
    assert f"| {name} |" in md
  assert "allocator:" in md and "machine:" in md


@pytest.fixture(scope="module")
def quick_models_run(tmp_path_factory):
  """`--models --quick`: the whole-model cases at smoke-test sizes, one transformer and one
  ResNet, native path only (the jax.numpy path's subprocess is the same code again)."""
  out = tmp_path_factory.mktemp("bench_models")
  # No timing is checked: XLA's cheapest optimization level halves the compile time.
  env = dict(os.environ, PYTHONPATH=ROOT,
             XLA_FLAGS="--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")
  cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "run.py"), "--models", "--quick",
         "--paths", "native", "--filter", "^(transformer layer|resnet batch)", "--out", str(out),
         "--allocator", "current", "--no-plot"]
  proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, check=False)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  return out


def test_quick_models_json(quick_models_run):
  with open(quick_models_run / "quick_models.json") as f:
    data = json.load(f)
  assert [r["case"] for r in data["records"]] == ["transformer layer 1x d64 h2 s16 b2",
                                                  "resnet batch 8x8x3 w8-16x1 b4"]
  for rec in data["records"]:
    assert rec["path"] in ("native", "jnp")
    for op in ("fwd", "train"):
      assert {"normjax", "flax"} == set(rec["times"][op])
      assert all(t["median_s"] > 0 for t in rec["times"][op].values())
      assert rec["ratios"][op] > 0
    # The two builds ran on the same variables and computed the same thing.
    assert rec["agreement"]["fwd_max_abs_diff"] <= 1e-4 * rec["agreement"]["fwd_max_abs"]
    assert rec["agreement"]["grad_max_abs_diff"] <= 1e-3 * rec["agreement"]["grad_max_abs"]
    assert rec["agreement"]["grad_leaf_rel_diff"] >= 0 and rec["agreement"]["grad_worst_leaf"]
    mem = rec["memory"]["normjax"]["train"]
    assert mem is None or mem["argument"] > 0
  assert data["meta"]["allocator"] in ("glibc", "tcmalloc")
  assert data["summary"]


def test_quick_models_markdown(quick_models_run):
  md = (quick_models_run / "quick_models.md").read_text()
  assert "| model | path | params | fwd normjax ms |" in md
  assert "| transformer layer 1x d64 h2 s16 b2 |" in md and "allocator:" in md


@pytest.fixture(scope="module")
def quick_numerics_run(tmp_path_factory):
  """`benchmarks/numerics.py --quick`: the accuracy cases at smoke-test sizes, both normjax
  paths (the jax.numpy one in its NORMJAX_NATIVE=0 subprocess), flax and PyTorch."""
  return _run_script(tmp_path_factory.mktemp("numerics"), "numerics.py", timeout=120)


def test_quick_numerics_reports(quick_numerics_run):
  with open(quick_numerics_run / "numerics_quick.json") as f:
    data = json.load(f)
  md = (quick_numerics_run / "numerics_quick.md").read_text()
  assert "| case | metric | float64 | normjax native | normjax jnp | flax | flax slow |" in md
  assert "command: `python benchmarks/numerics.py --quick" in md and "machine:" in md
  records = data["records"]
  assert len(records) == 7 and not any("2^28" in r["case"] for r in records)
  impls = data["meta"]["impls"]
  assert {"normjax_jnp", "flax", "flax_slow"} <= set(impls)
  ours = [i for i in impls if i.startswith("normjax")]
  for rec in records:
    assert set(rec["results"]) == set(impls), rec["case"]
    assert f"| {rec['case']} |" in md
    for impl in ours:   # every normjax path is within a few float32 roundings of float64
      assert rec["results"][impl]["var_rel_err"] < 1e-6, (rec["case"], impl)
  offset = [r for r in records if r["loc"] in (1e3, 1e5)]
  assert len(offset) == 4
  for rec in offset:   # where flax's default E[x^2] - E[x]^2 loses its digits
    fast = rec["results"]["flax"]
    for impl in ours:
      for metric in ("var_rel_err", "out_abs_err"):
        assert rec["results"][impl][metric] < 1e-3 * fast[metric], (rec["case"], impl, metric)


def test_quick_patterns_report(tmp_path):
  """`run.py --patterns --quick`: issue 27's patterns (n(x), n(x + r), pre-LN, fused) at
  smoke-test sizes write a markdown table with normjax / flax ratios on both paths."""
  out = tmp_path / "patterns.md"
  env = dict(os.environ, PYTHONPATH=ROOT)
  env.pop("XLA_FLAGS", None)
  cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "patterns.py"), "--quick", "--out",
         str(out)]
  proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, check=False)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  md = out.read_text()
  for pattern in ("n(x)", "n(x+r)", "fused"):
    assert pattern in md, pattern
  assert "jax.numpy" in md and "flax" in md


def test_quick_blocks_report(tmp_path):
  """`run.py --blocks --quick`: the DiT and Gemma-style blocks at smoke-test sizes."""
  _run_script(tmp_path, "run.py", "--blocks", "--allocator", "current", "--paths", "native")
  md = (tmp_path / "quick_models_blocks.md").read_text()
  assert "DiT" in md and "Gemma" in md


def test_quick_modern_report_has_the_one_pass_floor(tmp_path):
  """`modern.py --quick`: issue 28's fused forms against their compositions, with each
  program's time over one pass (one XLA loop reading the full-size inputs
  and writing the outputs once), timed in the same rounds."""
  out = tmp_path / "modern.md"
  _run_script(out, "modern.py", "--allocator", "current", "--filter", "add_rms|dynamic_tanh")
  md = out.read_text()
  assert "fwd / one pass (fused, baseline)" in md
  records = json.loads(out.with_suffix(".json").read_text())["records"]
  assert {r["case"] for r in records} == {"add_rms_norm residual f32", "dynamic_tanh"}
  for r in records:
    for pass_ in ("fwd", "fwd+bwd"):
      p = r[pass_]
      assert p["floor_ms"] > 0
      assert p["fused_over_floor"] == pytest.approx(p["fused_ms"] / p["floor_ms"])
      assert p["baseline_over_floor"] == pytest.approx(p["baseline_ms"] / p["floor_ms"])
      row = (f"| {r['case']} | {r['baseline']} | {'x'.join(map(str, r['shape']))} | "
             f"{r['dtype']} | {r['path']} |")
      line = next(l for l in md.splitlines() if l.startswith(row))
      assert f"{p['fused_over_floor']:.2f}, {p['baseline_over_floor']:.2f}" in line


def test_one_pass_floor_reads_and_writes_each_full_size_array_once():
  """The floor program of `benchmarks/modern.py`: outputs of the fused form's shapes and dtypes
  (and, for the forward+backward, one per full-size input), each a function of every
  full-size array read (a changed input or cotangent changes every output)."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
  try:
    import modern  # pylint: disable=import-outside-toplevel
  finally:
    sys.path.remove(os.path.join(ROOT, "benchmarks"))
  x = jnp.ones((4, 8), jnp.bfloat16)
  r = jnp.ones((4, 8), jnp.float32)
  w = jnp.ones((8,), jnp.float32)
  cfg = modern.Config("c", (4, 8), "bfloat16", (x, r, w), None, {})
  out_shape = (jax.ShapeDtypeStruct((4, 8), jnp.bfloat16),
               jax.ShapeDtypeStruct((4, 8), jnp.float32))
  ct = (jnp.ones((4, 8), jnp.bfloat16), jnp.ones((4, 8), jnp.float32))
  fwd = modern.one_pass(cfg, out_shape, backward=False)((x, r, w), ct)
  bwd = modern.one_pass(cfg, out_shape, backward=True)((x, r, w), ct)
  assert [o.dtype for o in fwd] == [jnp.bfloat16, jnp.float32]
  assert [o.dtype for o in bwd] == [jnp.bfloat16, jnp.float32, jnp.bfloat16, jnp.float32]
  for changed in ((x * 2, r, w), (x, r * 2, w)):
    new = modern.one_pass(cfg, out_shape, backward=True)(changed, ct)
    assert all(not np.array_equal(a, b) for a, b in zip(new, bwd))
  new = modern.one_pass(cfg, out_shape, backward=True)((x, r, w), (ct[0], ct[1] * 2))
  assert all(not np.array_equal(a, b) for a, b in zip(new, bwd))
  fwd_ct = modern.one_pass(cfg, out_shape, backward=False)((x, r, w), (ct[0], ct[1] * 2))
  assert all(np.array_equal(a, b) for a, b in zip(fwd_ct, fwd))   # the forward reads no ct
