"""examples/data_parallel.py: data-parallel batch norm equals the single-device run.

Runs the example's `run()` at a tiny size in a fresh process with 8 simulated CPU devices
(the test process has only conftest.py's 4, and XLA_FLAGS is read once, at backend start).
The oracle is the single-device run of the same code on the whole batch; the per-device
batch-norm run (no `axis_name`) shows that the comparison can fail.
"""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = """
import json, sys
sys.path.insert(0, "examples")
import data_parallel
r = data_parallel.run(batch_size=16, steps=3, num_devices=8, progress=False)
fields = ("params_max_diff", "stats_max_diff", "loss_max_diff", "step_params_max_diff",
          "step_stats_max_diff")
print(json.dumps({k: {f: v[f] for f in fields} for k, v in r.items() if isinstance(v, dict)}))
"""


@pytest.mark.slow
def test_shard_map_and_sharded_jit_match_single_device():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
  out = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  diffs = json.loads(out.stdout.strip().splitlines()[-1])
  for name in ("shard_map + axis_name", "jit, sharded batch", "single device, reordered"):
    for field, value in diffs[name].items():   # per step and after the 3 steps
      assert value <= 1e-5, (name, field, value)
  # Per-device statistics (batch norm without axis_name) are a different computation: 2
  # examples per device here, so the difference is large, not rounding.
  contrast = diffs["shard_map, per-device BN"]
  assert min(contrast.values()) > 1e-3, contrast
