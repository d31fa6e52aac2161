"""normjax's accuracy against a float64 NumPy reference, beside flax.linen and PyTorch.

Usage (from the repository root):

  python benchmarks/numerics.py           # the default cases (about 30 s on 2 CPU cores)
  python benchmarks/numerics.py --full    # adds a layer-norm row of 2^28 values (1 GiB of
                                          # float32): about 2 minutes, 7 GB of memory at peak
  python benchmarks/numerics.py --quick   # smoke-test sizes (about 10 s); numerics_quick.*

The committed `benchmarks/results/numerics.md` is a `--full` run; the README's accuracy figures
are its numbers (`tests/test_readme.py` checks them).

Writes `numerics.md` and `numerics.json` under `--out` (default `benchmarks/results/`).

Cases, all float32 input, `eps = 1e-5` for every implementation and for the reference:

  * outlier: batch norm (train) on `N(0, 1)` of shape (16, 64, 64, 4) whose first element of
    every channel is 1e4 (the value a shifted sum that takes the first sample as its shift
    loses digits on);
  * long: a layer-norm row and a batch-norm column of 2^24 values of `3 + N(0, 1)` (with
    `--full` also a layer-norm row of 2^28 values);
  * offset: `1e5 + N(0, 1)` and `1e3 + N(0, 1)`, layer norm over rows of 1024 and batch norm
    (train) over (32, 16, 16) per channel.

Implementations: normjax on both of its paths, the native CPU kernels (this process) and the
`jax.numpy` reference path that GPUs and TPUs run (a subprocess with `NORMJAX_NATIVE=0`, which
is read when normjax is imported); `flax.linen` with its default `use_fast_variance=True`
("flax") and with `False` ("flax slow"); PyTorch on CPU if it is installed ("torch").

Metrics, against float64 statistics and outputs computed with NumPy from the same float32
input:

  * `var`: the variance of the first channel (outlier case), next to the float64 value;
  * `var rel err`: max over the statistics of `|var - var64| / var64`. The variance is the one
    each library normalizes with: normjax's batch-norm running variance after one step with
    `momentum=0` and, for layer norm, the statistics of `normjax._src.dispatch.standardize` (what
    `layer_norm` calls); flax's `batch_stats` after one step with `momentum=0` and, for layer
    norm, `flax.linen.normalization._compute_stats` (what `LayerNorm` calls); PyTorch's
    running variance after one step with `momentum=1` (unbiased, rescaled by `(n - 1) / n` in
    float64) and, for layer norm, `1 / rstd^2 - eps` from `torch.native_layer_norm`, which
    adds the rounding of `rstd` to float32 (about 1e-7);
  * `out abs err`: `max |y - y64|`; `out rel err` (outlier case): `max |y - y64| / max |y64|`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from typing import NamedTuple

import numpy as np

EPS = 1e-5
IMPLS = ("normjax_native", "normjax_jnp", "flax", "flax_slow", "torch")
LABELS = {"normjax_native": "normjax native", "normjax_jnp": "normjax jnp", "flax": "flax",
          "flax_slow": "flax slow", "torch": "torch"}
METRIC_LABELS = {"var": "var", "var_rel_err": "var rel err", "out_abs_err": "out abs err",
                 "out_rel_err": "out rel err"}
CHUNK = 1 << 22   # elements of x per float64 chunk of the reference


class Case(NamedTuple):
  name: str          # printed in the table
  kind: str          # "layer" (reduce the last axis) or "batch" (reduce all but the last)
  shape: tuple
  loc: float         # added to N(0, 1)
  outlier: float | None = None   # the first element of every channel, if set
  metrics: tuple = ("var_rel_err", "out_abs_err")
  seed: int = 0


def cases(quick: bool, full: bool) -> list[Case]:
  """The cases of a run (smoke-test sizes with `quick`)."""
  long_n = 1 << (16 if quick else 24)
  exp = 16 if quick else 24
  out = [
      Case("batch norm, N(0, 1) of shape " + ("(4, 16, 16, 4)" if quick else "(16, 64, 64, 4)")
           + ", first element of every channel 1e4", "batch",
           (4, 16, 16, 4) if quick else (16, 64, 64, 4), 0.0, outlier=1e4,
           metrics=("var", "var_rel_err", "out_rel_err")),
      Case(f"layer norm, a row of 2^{exp} values of 3 + N(0, 1)", "layer", (1, long_n), 3.0,
           seed=1),
      Case(f"batch norm, 2 columns of 2^{exp} values of 3 + N(0, 1)", "batch", (long_n, 2), 3.0,
           seed=2),
  ]
  if full and not quick:
    out.append(Case("layer norm, a row of 2^28 values of 3 + N(0, 1)", "layer", (1, 1 << 28),
                    3.0, seed=3))
  for loc, name in ((1e5, "1e5"), (1e3, "1e3")):
    layer = (8, 256) if quick else (64, 1024)
    batch = (4, 8, 8, 16) if quick else (32, 16, 16, 16)
    out += [Case(f"layer norm, {name} + N(0, 1), rows of {layer[1]}, shape {layer}", "layer",
                 layer, loc, seed=4),
            Case(f"batch norm, {name} + N(0, 1), shape {batch}", "batch", batch, loc, seed=5)]
  return out


def make_input(case: Case) -> np.ndarray:
  """The case's float32 input (the same in every process: seeded)."""
  x = np.random.default_rng(case.seed).standard_normal(case.shape, dtype=np.float32)
  if case.loc:
    x += np.float32(case.loc)
  if case.outlier is not None:
    x.reshape(-1)[:case.shape[-1]] = case.outlier
  return x


# --- the float64 reference ------------------------------------------------------------------------

def _as_2d(case: Case, a: np.ndarray) -> tuple[np.ndarray, int]:
  """`a` as (rows, columns) and the axis reduced: layer norm reduces each row (axis 1), batch
  norm each column (axis 0)."""
  if case.kind == "layer":
    return a.reshape(-1, case.shape[-1]), 1
  return a.reshape(-1, case.shape[-1]), 0


def _chunks(a2: np.ndarray, axis: int):
  """Slices of `a2` along the reduced axis, about CHUNK elements each, as float64."""
  step = max(1, CHUNK // a2.shape[1 - axis])
  for i in range(0, a2.shape[axis], step):
    yield (a2[:, i:i + step] if axis == 1 else a2[i:i + step]).astype(np.float64)


def reference_moments(case: Case, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Float64 mean and biased variance of every statistic (two passes, chunked)."""
  x2, axis = _as_2d(case, x)
  n = x2.shape[axis]
  mean = sum(c.sum(axis=axis) for c in _chunks(x2, axis)) / n
  m = mean[:, None] if axis == 1 else mean[None, :]
  var = sum(((c - m) ** 2).sum(axis=axis) for c in _chunks(x2, axis)) / n
  return mean, var


def output_errors(case: Case, x: np.ndarray, y: np.ndarray, mean, var) -> tuple[float, float]:
  """`max |y - y64|` and `max |y64|`, where `y64 = (x - mean) / sqrt(var + eps)` in float64."""
  x2, axis = _as_2d(case, x)
  y2, _ = _as_2d(case, np.asarray(y))
  shape = (-1, 1) if axis == 1 else (1, -1)
  m, r = mean.reshape(shape), (1.0 / np.sqrt(var + EPS)).reshape(shape)
  err = top = 0.0
  for cx, cy in zip(_chunks(x2, axis), _chunks(y2, axis)):
    want = (cx - m) * r
    err = max(err, float(np.abs(cy - want).max()))
    top = max(top, float(np.abs(want).max()))
  return err, top


# --- the implementations: each returns (y, var) as NumPy arrays ---------------------------------

def run_normjax(case: Case, x: np.ndarray):
  import jax  # pylint: disable=import-outside-toplevel
  import normjax as nj  # pylint: disable=import-outside-toplevel
  from normjax._src import dispatch as _dispatch  # pylint: disable=import-outside-toplevel
  if case.kind == "layer":
    y = jax.jit(lambda x: nj.layer_norm(x, eps=EPS))(x)
    var = jax.jit(lambda x: _dispatch.standardize(x, (x.ndim - 1,), None, None, EPS)[1].var)(x)
    return np.asarray(y), np.asarray(var).reshape(-1)
  c = case.shape[-1]
  y, stats = jax.jit(lambda x: nj.batch_norm(x, None, None, nj.init_batch_stats(c), train=True,
                                             momentum=0.0, eps=EPS))(x)
  return np.asarray(y), np.asarray(stats.var)


def run_flax(case: Case, x: np.ndarray, fast: bool):
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  from flax.linen import normalization  # pylint: disable=import-outside-toplevel
  if case.kind == "layer":
    module = nn.LayerNorm(epsilon=EPS, use_bias=False, use_scale=False, use_fast_variance=fast)
    y = jax.jit(lambda x: module.apply({}, x))(x)
    var = jax.jit(lambda x: normalization._compute_stats(  # pylint: disable=protected-access
        x, (x.ndim - 1,), None, use_fast_variance=fast)[1])(x)
    return np.asarray(y), np.asarray(var).reshape(-1)
  c = case.shape[-1]
  module = nn.BatchNorm(use_running_average=False, momentum=0.0, epsilon=EPS, use_bias=False,
                        use_scale=False, use_fast_variance=fast)
  variables = {"batch_stats": {"mean": jnp.zeros(c), "var": jnp.ones(c)}}
  y, new = jax.jit(lambda x: module.apply(variables, x, mutable=["batch_stats"]))(x)
  return np.asarray(y), np.asarray(new["batch_stats"]["var"])


def run_torch(case: Case, x: np.ndarray):
  import torch  # pylint: disable=import-outside-toplevel
  t = torch.from_numpy(x)
  with torch.no_grad():
    if case.kind == "layer":
      y, _, rstd = torch.native_layer_norm(t, [case.shape[-1]], None, None, EPS)
      var = rstd.double().reshape(-1).numpy() ** -2 - EPS
      return y.numpy(), var
    c, n = case.shape[-1], x.size // case.shape[-1]
    mean, var = torch.zeros(c), torch.ones(c)
    y = torch.nn.functional.batch_norm(t.movedim(-1, 1), mean, var, training=True, momentum=1.0,
                                       eps=EPS)
    return y.movedim(1, -1).numpy(), var.double().numpy() * ((n - 1) / n)


def torch_version() -> str | None:
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError:
    return None
  return f"{torch.__version__} ({torch.get_num_threads()} threads)"


def measure(case: Case, x: np.ndarray, mean, var, impl: str) -> dict:
  """The case's metrics for one implementation (and its seconds, compilation included)."""
  t0 = time.perf_counter()
  if impl.startswith("normjax"):
    y, v = run_normjax(case, x)
  elif impl in ("flax", "flax_slow"):
    y, v = run_flax(case, x, fast=impl == "flax")
  else:
    y, v = run_torch(case, x)
  seconds = time.perf_counter() - t0
  v = np.asarray(v, np.float64)
  err, top = output_errors(case, x, y, mean, var)
  return {"var": float(v[0]), "var_rel_err": float(np.max(np.abs(v - var) / var)),
          "out_abs_err": err, "out_rel_err": err / top, "seconds": seconds}


def native_path() -> str:
  """"native" if normjax's CPU kernels are loaded in this process, else "jnp"."""
  from normjax._src.kernels import cpu  # pylint: disable=import-outside-toplevel
  return "native" if cpu.NATIVE else "jnp"


def run_cases(case_list, impls, progress=True) -> list[dict]:
  """Every case's reference and every implementation's metrics, in this process."""
  from tqdm import tqdm  # pylint: disable=import-outside-toplevel
  records = []
  for case in tqdm(case_list, desc="cases", disable=not progress):
    t0 = time.perf_counter()
    x = make_input(case)
    mean, var = reference_moments(case, x)
    rec = {"case": case.name, "kind": case.kind, "shape": list(case.shape), "loc": case.loc,
           "outlier": case.outlier, "metrics": list(case.metrics),
           "reference": {"var": float(var[0])}, "results": {}}
    for impl in impls:
      rec["results"][impl] = measure(case, x, mean, var, impl)
    rec["seconds"] = time.perf_counter() - t0
    records.append(rec)
    del x
  return records


# --- the report ---------------------------------------------------------------------------------

def fmt(metric: str, v: float | None) -> str:
  """A value as the table prints it: variances to 8 digits, errors to 2 (`1.8e-8`)."""
  if v is None:
    return "n/a"
  if metric == "var":
    return f"{v:.8g}"
  if v == 0:
    return "0"
  return re.sub(r"e([-+])0*(\d)", lambda m: "e" + m[1].replace("+", "") + m[2], f"{v:.1e}")


def markdown(meta: dict, records: list[dict]) -> str:
  impls = meta["impls"]
  lines = ["# normjax accuracy against float64 (benchmarks/numerics.py)", "",
           f"- command: `{meta['command']}`",
           f"- machine: {meta['machine']}",
           f"- software: {meta['software']}",
           f"- date: {meta['date']}; wall time {meta['wall_s']:.0f} s"]
  lines += [f"- note: {n}" for n in meta["notes"]]
  lines += ["",
            "Float32 inputs, `eps = 1e-5` everywhere. `float64`: NumPy's two-pass statistics "
            "of the same float32 input. `var rel err`: the largest `|var - var64| / var64` "
            "over the case's statistics, for the variance each library normalizes with (see "
            "the script's docstring; PyTorch's layer-norm variance is `1 / rstd^2 - eps`, "
            "which adds the float32 rounding of `rstd`). `out abs err`: `max |y - y64|`; "
            "`out rel err`: that over `max |y64|`. `normjax native`: the CPU kernels; "
            "`normjax jnp`: the `jax.numpy` path GPUs and TPUs run (`NORMJAX_NATIVE=0`, a "
            "subprocess); `flax`: `flax.linen` with its default `use_fast_variance=True`; "
            "`flax slow`: `use_fast_variance=False`.", ""]
  head = ["case", "metric", "float64"] + [LABELS[i] for i in impls]
  lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in records:
    for metric in r["metrics"]:
      ref = fmt(metric, r["reference"]["var"]) if metric == "var" else ""
      cells = [fmt(metric, r["results"].get(i, {}).get(metric)) for i in impls]
      lines.append("| " + " | ".join([r["case"], METRIC_LABELS[metric], ref] + cells) + " |")
  lines += ["", "Seconds per case (making the input, the float64 reference and every "
            "implementation, compilation included, the `jnp` path's in its own process):", ""]
  lines += [f"- {r['case']}: {r['seconds']:.1f} s" for r in records]
  lines.append("")
  return "\n".join(lines)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--quick", action="store_true", help="smoke-test sizes; writes numerics_quick.*")
  p.add_argument("--full", action="store_true", help="add a layer-norm row of 2^28 values")
  p.add_argument("--out", default=None, help="output folder (default benchmarks/results)")
  p.add_argument("--impls", default=",".join(IMPLS), help="implementations to measure")
  p.add_argument("--json-only", default=None, help=argparse.SUPPRESS)   # the jnp subprocess
  args = p.parse_args(argv)
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  t_start = time.time()
  case_list = cases(args.quick, args.full)
  impls = [i for i in args.impls.split(",") if i]
  if set(impls) - set(IMPLS):
    sys.exit(f"--impls: unknown implementation in {args.impls!r} ({', '.join(IMPLS)})")
  if args.json_only:   # the subprocess: this process's normjax path only
    records = run_cases(case_list, [f"normjax_{native_path()}"], progress=False)
    with open(args.json_only, "w") as f:
      json.dump(records, f)
    return

  notes = []
  here = f"normjax_{native_path()}"
  if "normjax_native" in impls and here != "normjax_native":
    notes.append("normjax's native kernels are not built here: no `normjax native` column")
    impls.remove("normjax_native")
  if "torch" in impls and torch_version() is None:
    notes.append("PyTorch is not installed: no `torch` column")
    impls.remove("torch")
  in_process = [i for i in impls if i != "normjax_jnp"]
  records = run_cases(case_list, in_process)
  if "normjax_jnp" in impls:
    with tempfile.TemporaryDirectory() as tmp:
      path = os.path.join(tmp, "jnp.json")
      cmd = [sys.executable, os.path.abspath(__file__), "--json-only", path]
      cmd += ["--quick"] if args.quick else []
      cmd += ["--full"] if args.full else []
      subprocess.run(cmd, check=True, env=dict(os.environ, NORMJAX_NATIVE="0"))
      with open(path) as f:
        sub = json.load(f)
    for rec, other in zip(records, sub):
      assert rec["case"] == other["case"], (rec["case"], other["case"])
      rec["results"]["normjax_jnp"] = other["results"]["normjax_jnp"]
      rec["seconds"] += other["seconds"]
  impls = [i for i in IMPLS if i in impls]

  import jax  # pylint: disable=import-outside-toplevel
  import flax  # pylint: disable=import-outside-toplevel
  import run as suite  # pylint: disable=import-outside-toplevel  (benchmarks/run.py)
  software = f"jax {jax.__version__}, flax {flax.__version__}, numpy {np.__version__}"
  if "torch" in impls:
    software += f", torch {torch_version()}"
  meta = {"command": "python benchmarks/numerics.py " + " ".join(sys.argv[1:] if argv is None
                                                                  else argv),
          "machine": suite.machine_info(jax.devices()[0]), "software": software,
          "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
          "wall_s": time.time() - t_start, "eps": EPS, "impls": impls, "notes": notes}
  meta["command"] = meta["command"].strip()
  out_dir = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
  os.makedirs(out_dir, exist_ok=True)
  stem = "numerics_quick" if args.quick else "numerics"
  md = markdown(meta, records)
  with open(os.path.join(out_dir, stem + ".md"), "w") as f:
    f.write(md)
  with open(os.path.join(out_dir, stem + ".json"), "w") as f:
    json.dump({"meta": meta, "records": records}, f, indent=1)
  print(md)


if __name__ == "__main__":
  main()
