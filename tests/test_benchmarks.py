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


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
  out = tmp_path_factory.mktemp("bench")
  env = dict(os.environ, PYTHONPATH=ROOT)
  env.pop("XLA_FLAGS", None)   # the suite times one CPU device, not conftest's four
  cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "run.py"), "--quick", "--out", str(out),
         "--allocator", "current", "--no-plot"]
  proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, check=False)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  return out


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
