"""normjax performance suite: normjax vs flax.linen, PyTorch, the memory roofline and jit(x * c).

Usage (from the repository root):

  python benchmarks/run.py                 # full suite: kernels, then whole models (~10 min, 2 CPU cores)
  python benchmarks/run.py --no-models     # the kernel cases only (263 s in the committed run)
  python benchmarks/run.py --quick         # smoke run: 2 small shapes, few reps (~30 s; no models)
  python benchmarks/run.py --device gpu    # on a GPU (torch baseline if torch.cuda works;
                                          # normjax's opt-in Pallas kernels as "pallas")
  python benchmarks/run.py --filter 'group fwd'   # a subset (regex on the case name)
  python benchmarks/run.py --models        # only the whole-model cases (models.py), both paths (233 s)
  python benchmarks/run.py --models --quick --paths native   # their smoke-test sizes
  python benchmarks/run.py --blocks        # the DiT and Gemma blocks alone (models_blocks.*)
  python benchmarks/run.py --patterns      # issue 27's norm patterns (patterns.py), both paths
  python benchmarks/run.py --patterns --quick   # their smoke-test sizes (~30 s)

Writes `results.md`, `results.json` and `results.png` under `--out` (default
`benchmarks/results/`; `--quick` writes `quick.*` so the committed full results stay), and for
the whole-model cases `models.md` and `models.json` (`quick_models.*` with `--quick`).

Norm patterns (`benchmarks/patterns.py`, `--patterns`): normjax.linen's and normjax.nnx's
LayerNorm/RMSNorm on `x`, on `x + r` and in the pre-LN pattern `(x + r, norm(x + r))`, and the
fused `add_layer_norm`/`add_rms_norm`, against flax's, forward and training step, on normjax's
default and jax.numpy paths; writes `patterns.md` and `patterns.json` (see its docstring).

Whole models (`benchmarks/models.py`): a pre-LN transformer stack (4 blocks, d_model 512, 8
heads, MLP 4x, seq 256, batch 8; LayerNorm and RMSNorm) and a ResNet-style CNN (3 stages of 2
residual blocks, widths 16/32/64, 32x32x3 input, batch 32; BatchNorm and GroupNorm), each built
from flax.linen with flax's normalization class and with normjax.linen's, on the same variables.
Timed: the eval forward and a full adamw training step; memory: XLA's `memory_analysis()` of
each compiled program. `--paths native,jnp` (default) measures normjax's native CPU kernels in
this process and its jax.numpy path (`NORMJAX_NATIVE=0`, which must be set before normjax is
imported) in a subprocess; flax is timed again, interleaved, in each.

Timing: every candidate of a case is compiled first (compile time recorded on the side),
warmed up, then called in interleaved rounds (one call of each candidate in turn, in a fresh
random order every sweep, so that each candidate follows each other one about equally often)
and `block_until_ready`'d; the reported time is the median of all calls. PyTorch and the NumPy
roofline copy are each timed in their own interleaved group, against normjax alone: calls of
PyTorch's thread pool in the same rounds slowed the JAX candidates unevenly (layer norm forward
8x512x1024: normjax 1.36 ms and flax 1.86 ms without PyTorch in the rounds, 3.1-3.6 ms and
2.3-4.1 ms with it; OMP_WAIT_POLICY=PASSIVE did not help), and a JAX call right after the
single-threaded NumPy copy ran slower. On a shared machine the absolute times drift; the
ratios between candidates measured in the same interleaved rounds are what to read.

Allocator: on CPU, glibc malloc returns large buffers to the OS and page-faults every large JAX
output on the next call. By default the suite re-executes itself with tcmalloc preloaded
(`LD_PRELOAD`, Debian package `libtcmalloc-minimal4`) when it is installed, and (full runs)
times a few cases under glibc too, in a subprocess, for the allocator table. `--allocator
glibc` forces the system allocator.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import random
import re
import shlex
import subprocess
import sys
import time

TCMALLOC = "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"
CPU_IMPLS = ("normjax", "flax", "flax_slow", "torch", "roofline", "floor")
# On a GPU also normjax's opt-in Pallas kernels (layer/RMS/NCHW instance norm).
GPU_IMPLS = CPU_IMPLS + ("pallas",)
# Peak memory bandwidth (GB/s) by device kind, for the GPU table.
PEAK_GBPS = {"H100": 3350.0, "H200": 4800.0, "A100": 2039.0, "L4": 300.0, "V100": 900.0}


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--quick", action="store_true", help="small shapes, few reps (smoke test)")
  p.add_argument("--device", default="cpu", choices=("cpu", "gpu", "auto"))
  p.add_argument("--out", default=None, help="output folder (default benchmarks/results)")
  p.add_argument("--filter", default=None, help="regex on case names, e.g. 'layer fwdbwd'")
  p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 5; 2 quick)")
  p.add_argument("--target-s", type=float, default=None,
                 help="seconds of calls per candidate per round (default 0.12; 0.02 quick)")
  p.add_argument("--allocator", default="auto", choices=("auto", "tcmalloc", "glibc", "current"),
                 help="auto: tcmalloc if installed (re-exec with LD_PRELOAD)")
  p.add_argument("--no-allocator-check", action="store_true",
                 help="skip timing a few cases under the other allocator")
  p.add_argument("--impls", default=None,
                 help=f"candidates to time (default {','.join(CPU_IMPLS)}; on a GPU also pallas)")
  p.add_argument("--no-plot", action="store_true")
  p.add_argument("--models", action="store_true",
                 help="only the whole-model cases (transformer, ResNet; see models.py)")
  p.add_argument("--no-models", action="store_true",
                 help="skip the whole-model cases in a full run")
  p.add_argument("--paths", default="native,jnp",
                 help="normjax paths for the model cases: native (NORMJAX_NATIVE=1) and/or\n"
                      "jnp (NORMJAX_NATIVE=0, in a subprocess unless this process already is)")
  p.add_argument("--blocks", action="store_true",
                 help="only the DiT and Gemma blocks of models.py (both paths); writes\n"
                      "models_blocks.md/json (quick_models_blocks.* with --quick)")
  p.add_argument("--patterns", action="store_true",
                 help="only the norm patterns of issue 27 (patterns.py; --quick, --rounds,\n"
                      "--target-s, --filter and --out apply; writes patterns.md/json)")
  p.add_argument("--json-only", default=None, help=argparse.SUPPRESS)   # allocator subprocess
  return p.parse_args(argv)


def allocator_name() -> str:
  return "tcmalloc" if "tcmalloc" in os.environ.get("LD_PRELOAD", "") else "glibc"


def maybe_reexec(args) -> None:
  """Re-executes this script with the requested allocator preloaded (CPU only)."""
  if args.device == "gpu" or args.allocator == "current":
    return
  want = args.allocator
  if want == "auto":
    want = "tcmalloc" if os.path.exists(TCMALLOC) else "glibc"
  if want == allocator_name():
    return
  env = dict(os.environ)
  if want == "tcmalloc":
    if not os.path.exists(TCMALLOC):
      sys.exit(f"--allocator tcmalloc: {TCMALLOC} not found (apt-get install libtcmalloc-minimal4)")
    env["LD_PRELOAD"] = (TCMALLOC + " " + env.get("LD_PRELOAD", "")).strip()
  else:
    env["LD_PRELOAD"] = " ".join(p for p in env.get("LD_PRELOAD", "").split() if "tcmalloc" not in p)
  os.execve(sys.executable, [sys.executable] + sys.argv, env)


# --- timing -------------------------------------------------------------------------------------

def time_interleaved(calls: dict, rounds: int, target_s: float, max_reps: int = 400,
                     min_reps: int = 3, probes: int = 3) -> dict:
  """Median seconds per call of each candidate, measured in interleaved round-robin.

  Each candidate is warmed up and probed (`probes` calls, median) to pick its calls per round:
  enough for `target_s` seconds, between `min_reps` and `max_reps`.
  """
  reps = {}
  for name, call in calls.items():
    call()   # warm-up (compilation already happened at build time)
    t = []
    for _ in range(probes):
      t0 = time.perf_counter()
      call()
      t.append(time.perf_counter() - t0)
    probe = sorted(t)[(len(t) - 1) // 2]
    reps[name] = int(min(max_reps, max(min_reps, math.ceil(target_s / max(probe, 1e-7)))))
  samples = {name: [] for name in calls}
  names = list(calls)
  rng = random.Random(0)
  for _ in range(rounds):
    for i in range(max(reps.values())):
      # A fresh random order every sweep, so that each candidate runs after each other one
      # about equally often: a call's time depends on what ran just before it (cache,
      # allocator and thread-pool state). One order per round (as before) kept the same
      # predecessor for a whole round: with seed 0 and five rounds, normjax followed the NumPy
      # roofline copy in 3 of 5 rounds and flax in none, and its eval forward measured
      # 1.15-1.25x flax's time for the same XLA program (docs/performance-history.md).
      for name in rng.sample(names, len(names)):
        if i < reps[name]:
          t0 = time.perf_counter()
          calls[name]()
          samples[name].append(time.perf_counter() - t0)
  out = {}
  for name, s in samples.items():
    s = sorted(s)
    q = lambda f: s[min(len(s) - 1, int(f * len(s)))]
    out[name] = {"median_s": q(0.5), "p25_s": q(0.25), "p75_s": q(0.75), "n": len(s)}
  return out


def run_case(case, impls, rounds, target_s, device, torch_device):
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  import cases as C  # pylint: disable=import-outside-toplevel
  host = C.make_inputs(case)
  built = {}
  for impl in impls:
    if impl in ("normjax", "flax", "flax_slow", "pallas"):
      b = C.build_jax(case, impl, host, device)
    elif impl == "torch":
      b = C.build_torch(case, host, torch_device) if torch_device else None
    elif impl == "roofline":
      b = C.build_roofline(case, host) if device.platform == "cpu" else None
    elif impl == "floor":
      b = C.build_floor(case, host, device)
    else:
      raise ValueError(impl)
    if b is not None:
      built[impl] = b
  # PyTorch and the NumPy roofline copy are each timed in their own interleaved group with
  # normjax: in shared rounds PyTorch's thread pool slowed the JAX candidates unevenly (no user
  # alternates the two runtimes call by call), and a single-threaded NumPy copy of the whole
  # input slowed whichever JAX program ran next. The XLA candidates share one group.
  own_group = ("torch", "roofline")
  jax_group = {k: b.call for k, b in built.items() if k not in own_group}
  timing = time_interleaved(jax_group, rounds, target_s)
  for other in own_group:
    if other in built and "normjax" in built:
      pair = time_interleaved({k: built[k].call for k in ("normjax", other)}, rounds, target_s)
      timing[other] = pair[other]
      timing[f"normjax_vs_{other}"] = pair["normjax"]
  rec = {"case": case.name, "variant": case.variant, "op": case.op, "shape": list(case.shape),
         "dtype": case.dtype, "layout": case.layout, "bytes_moved": case.bytes_moved,
         "times": timing,
         "compile_s": {k: b.compile_s for k, b in built.items() if b.compile_s is not None},
         "residual_bytes": {k: b.residual_bytes for k, b in built.items()
                            if b.residual_bytes is not None},
         "temp_bytes": {k: b.temp_bytes for k, b in built.items() if b.temp_bytes is not None}}
  ours = built.get("normjax")
  if ours is not None:   # sanity: the candidates compute the same thing
    rec["max_abs_diff"] = {k: float(np.max(np.abs(ours.output - b.output)))
                           for k, b in built.items()
                           if k != "normjax" and b.output is not None}
  t = {k: v["median_s"] for k, v in timing.items()}
  if "normjax" in t:
    ratios = {}
    for k in ("flax", "flax_slow", "floor"):
      if k in t:
        ratios[k] = t["normjax"] / t[k]
    if "torch" in t:
      ratios["torch"] = t["normjax_vs_torch"] / t["torch"]
    if "roofline" in t:
      ratios["roofline"] = (t["normjax_vs_roofline"]
                            / (t["roofline"] * case.bytes_moved / (2 * case.nbytes)))
    rec["ratios"] = ratios
    rec["gbps"] = case.bytes_moved / t["normjax"] / 1e9
  rec["gbps_by_impl"] = {k: case.bytes_moved / t[k] / 1e9
                         for k in ("normjax", "pallas", "flax") if k in t}
  return rec


# --- whole models -------------------------------------------------------------------------------

PATH_ENV = {"native": "1", "jnp": "0"}


def native_path() -> str:
  """Which normjax path this process runs: "native" (the CPU kernels loaded) or "jnp"."""
  try:
    from normjax._src.kernels import cpu  # pylint: disable=import-outside-toplevel
    return "native" if cpu.NATIVE else "jnp"
  except ImportError:
    return "native" if os.environ.get("NORMJAX_NATIVE", "1") != "0" else "jnp"


def run_models(args, device, rounds, target_s) -> list:
  """The whole-model records for every path in `--paths`: this process's path here, the other
  in a subprocess with `NORMJAX_NATIVE` set (read once, when normjax is imported)."""
  import models as Mo  # pylint: disable=import-outside-toplevel
  cases = Mo.model_cases(args.quick, blocks=args.blocks)
  if args.filter:
    cases = [c for c in cases if re.search(args.filter, c.name)]
  paths = [p for p in args.paths.split(",") if p]
  if not cases or not paths:
    return []
  if set(paths) - set(PATH_ENV):
    sys.exit(f"--paths: unknown path in {args.paths!r} (native, jnp)")
  here, records = native_path(), []
  if args.json_only:   # a subprocess of the call below: this process's path only, labelled
    paths = [here]
  for path in paths:
    if path == here:
      for i, case in enumerate(cases):
        timer = lambda c, r, t: time_interleaved(c, r, t, min_reps=1, probes=1)
        rec = Mo.run_model_case(case, timer, rounds, target_s, device)
        rec.update(path=here, allocator=allocator_name())
        records.append(rec)
        ag = rec["agreement"]
        if ag["grad_flag"]:
          print(f"warning: {case.name} ({here}): gradients of {ag['grad_worst_leaf']} differ "
                f"from flax's by {ag['grad_leaf_rel_diff']:.1e} of their largest value",
                file=sys.stderr, flush=True)
        r = rec["ratios"]
        print(f"[{here} {i + 1}/{len(cases)}] {case.name:42s} "
              f"fwd {rec['times']['fwd']['normjax']['median_s'] * 1e3:7.1f} ms /flax "
              f"{r['fwd']:.2f}  train {rec['times']['train']['normjax']['median_s'] * 1e3:7.1f} "
              f"ms /flax {r['train']:.2f}  train temp /flax {r.get('train_temp', float('nan')):.2f}",
              flush=True)
      continue
    tmp = os.path.join(args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                "results"), f".models_{path}.json")
    cmd = [sys.executable, os.path.abspath(__file__), "--models", "--paths", path,
           "--allocator", "current", "--device", args.device, "--rounds", str(rounds),
           "--target-s", str(target_s), "--json-only", tmp]
    cmd += ["--quick"] if args.quick else []
    cmd += ["--blocks"] if args.blocks else []
    cmd += ["--filter", args.filter] if args.filter else []
    subprocess.run(cmd, check=True, env=dict(os.environ, NORMJAX_NATIVE=PATH_ENV[path]))
    with open(tmp) as f:
      sub = json.load(f)
    os.remove(tmp)
    if any(r["path"] != path for r in sub):   # e.g. native asked for, kernels not built
      print(f"warning: path {path!r} unavailable (the subprocess ran {sub[0]['path']!r}); "
            f"dropped", file=sys.stderr)
      continue
    records += sub
  return records


def models_summary(records) -> dict:
  """Per path: geometric means (and ranges) of the normjax / flax ratios over the models."""
  s = {}
  for path in dict.fromkeys(r["path"] for r in records):
    rs = [r for r in records if r["path"] == path]
    s[path] = {}
    for key in ("fwd", "train", "fwd_temp", "train_temp", "train_total"):
      v = [r["ratios"][key] for r in rs if key in r["ratios"]]
      if v:
        s[path][key] = {"geomean": geomean(v), "min": min(v), "max": max(v)}
  return s


def models_markdown(meta, records, summary) -> str:
  mib = lambda b: f"{b / 2**20:.1f}"
  lines = ["# normjax whole-model benchmark results", "",
           f"- command: `{meta['command']}`",
           f"- machine: {meta['machine']}",
           f"- software: {meta['software']}",
           f"- allocator: **{meta['allocator']}**" + (
               " (LD_PRELOAD)" if meta["allocator"] == "tcmalloc" else ""),
           f"- date: {meta['date']}; wall time {meta['wall_s']:.0f} s; "
           f"{meta['rounds']} interleaved rounds, >= {meta['target_s']} s of calls per "
           f"candidate per round", "",
           "Each model is built from `flax.linen` twice, with flax's normalization class and "
           "with `normjax.linen`'s (nothing else differs), and both run on the SAME variables "
           "(flax's `init`, reused). Checked before timing: the same variable tree from both "
           "`init`s, eval outputs within 1e-4 (relative to max(1, |y|)), loss and gradients "
           "agree (`max dy`: the largest absolute difference of the eval outputs). `grad diff`: "
           "the largest difference of a gradient leaf from flax's, relative to that leaf's "
           "largest flax value (at least 1e-2 x the largest gradient of the model), worst leaf "
           "(reported, not asserted; `!` above 1e-3). `fwd`: eval forward. `train`: one training step (loss, "
           "grad, `optax.adamw` update, new `batch_stats` for BatchNorm), same inputs every "
           "call, no donation. Times: median of interleaved calls (ms); ratios are **normjax / "
           "flax** (below 1.00 = normjax faster or smaller). Memory: XLA's "
           "`compiled.memory_analysis()`; `temp` is the scratch buffer, `total` = temp + "
           "arguments + outputs, in MiB. `path`: `native` = normjax's CPU kernels, `jnp` = "
           "`NORMJAX_NATIVE=0` (pure jax.numpy), each measured against flax in its own "
           "process.", ""]
  if any(r["kind"] in ("dit", "gemma") for r in records):
    lines += ["The DiT and Gemma blocks (issue 28; benchmarks/models.py's docstring) differ "
              "from flax's build in more than the norm class: normjax's side uses "
              "`AdaptiveLayerNorm` (adaLN-Zero) and `RMSNorm(scale_offset=1.0)` + "
              "`nj.add_rms_norm(..., residual_dtype=jnp.float32)`, flax's side flax's "
              "`LayerNorm` / `RMSNorm` with the modulation, the `1 + w` scale and the float32 "
              "residual written by hand; same variable tree. The Gemma block computes in "
              "bfloat16: its eval outputs and loss are checked to 3e-2 instead of 1e-4.", ""]
  head = ["model", "path", "params", "fwd normjax ms", "fwd flax ms", "fwd /flax",
          "train normjax ms", "train flax ms", "train /flax", "train temp MiB", "temp /flax",
          "train total MiB", "total /flax", "fwd temp /flax", "max dy", "grad diff"]
  lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in records:
    t, ra, m = r["times"], r["ratios"], r["memory"]
    ms = lambda op, k: (lambda v: f"{v:.0f}" if v >= 100 else f"{v:.3g}")(
        t[op][k]["median_s"] * 1e3)
    mt, mf = m["normjax"]["train"], m["flax"]["train"]
    total = lambda v: v["temp"] + v["argument"] + v["output"]
    row = [r["case"], r["path"], f"{r['params'] / 1e6:.2f}M", ms("fwd", "normjax"),
           ms("fwd", "flax"), f"{ra['fwd']:.2f}", ms("train", "normjax"), ms("train", "flax"),
           f"{ra['train']:.2f}"]
    row += ([f"{mib(mt['temp'])} / {mib(mf['temp'])}", f"{ra['train_temp']:.2f}",
             f"{mib(total(mt))} / {mib(total(mf))}", f"{ra['train_total']:.2f}",
             f"{ra['fwd_temp']:.2f}"] if mt and mf else [""] * 5)
    ag = r["agreement"]
    row.append(f"{ag['fwd_max_abs_diff']:.1e}")
    row.append(f"{ag['grad_leaf_rel_diff']:.1e}" + (
        f" ! (`{ag['grad_worst_leaf']}`)" if ag["grad_flag"] else ""))
    lines.append("| " + " | ".join(row) + " |")
  lines += ["", "## Summary", ""]
  for path, s in summary.items():
    parts = [f"{k} {v['geomean']:.2f} ({v['min']:.2f}-{v['max']:.2f})" for k, v in s.items()]
    lines.append(f"- {path}: normjax / flax, geometric mean (range) over the models: "
                 + "; ".join(parts))
  comp = [(r["case"], r["path"], r["compile_s"]) for r in records]
  lines += ["", "Compile time (s, fwd + train), normjax / flax: " + "; ".join(
      f"{c} ({p}) {sum(cs['normjax'].values()):.1f} / {sum(cs['flax'].values()):.1f}"
      for c, p, cs in comp)]
  return "\n".join(lines) + "\n"


# --- reports ------------------------------------------------------------------------------------

def geomean(xs):
  xs = [x for x in xs if x is not None and x > 0]
  return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else float("nan")


def fmt_ms(rec, k):
  v = rec["times"].get(k)
  return "" if v is None else f"{v['median_s'] * 1e3:.3g}"


def fmt_r(rec, k):
  v = rec.get("ratios", {}).get(k)
  return "" if v is None else f"{v:.2f}"


def summarize(records):
  """Target checks over the records (ratios are ours / baseline: below 1 is faster)."""
  s = {}
  for base in ("flax", "flax_slow", "torch"):
    rs = [r["ratios"][base] for r in records if base in r.get("ratios", {})]
    if rs:
      worst = max((r for r in records if base in r.get("ratios", {})),
                  key=lambda r: r["ratios"][base])
      s[base] = {"geomean": geomean(rs), "worst": worst["ratios"][base],
                 "worst_case": worst["case"], "n": len(rs),
                 "slower_cases": [r["case"] for r in records
                                  if r.get("ratios", {}).get(base, 0) > 1.0]}
  for op in ("fwd", "fwdbwd"):
    rs = [r["ratios"]["flax"] for r in records if r["op"] == op and "flax" in r.get("ratios", {})]
    if rs:
      s[f"flax_{op}_geomean"] = geomean(rs)
  gn = [r for r in records if r["variant"] == "group" and r["op"] == "fwd"
        and "torch" in r.get("ratios", {})]
  s["group_fwd_vs_torch"] = {r["case"]: r["ratios"]["torch"] for r in gn}
  ln = [r for r in records if r["variant"] == "layer" and r["op"] == "fwdbwd"
        and "torch" in r.get("ratios", {})]
  s["layer_fwdbwd_vs_torch"] = {r["case"]: r["ratios"]["torch"] for r in ln}
  big = [r for r in records if r["op"] == "fwd" and math.prod(r["shape"]) >= 16 * 2**20
         and "roofline" in r.get("ratios", {})]
  s["large_fwd_vs_roofline"] = {r["case"]: r["ratios"]["roofline"] for r in big}
  mem = [(r["residual_bytes"]["normjax"], r["residual_bytes"]["flax"]) for r in records
         if {"normjax", "flax"} <= set(r.get("residual_bytes", {}))]
  s["residual_ratio_geomean"] = geomean([a / b for a, b in mem if b])
  return s


def markdown(meta, records, summary, alloc=None):
  lines = [f"# normjax benchmark results", "",
           f"- command: `{meta['command']}`",
           f"- machine: {meta['machine']}",
           f"- software: {meta['software']}",
           f"- allocator: **{meta['allocator']}**" + (
               " (LD_PRELOAD; see the allocator table below for glibc)"
               if meta["allocator"] == "tcmalloc" else ""),
           f"- date: {meta['date']}; wall time {meta['wall_s']:.0f} s", "",
           "Times are medians of interleaved calls, in ms. Ratios are **normjax / baseline** "
           "(below 1.00 = normjax faster). `flax` is `flax.linen` with its default "
           "`use_fast_variance=True`, `flax-slow` with `False` (normjax's default variance is "
           "the stable one). `roofline` is a NumPy copy of the same bytes scaled to the bytes the "
           "op must move (2N forward, 5N forward+backward); `floor` is `jit(x * c)` (and its "
           "VJP). `saved` is the bytes the backward keeps from the forward (normjax / flax), in "
           "MiB.", ""]
  gpu = meta.get("platform") == "gpu"
  head = ["case", "normjax ms", "flax ms", "/flax", "/flax-slow", "torch ms", "/torch",
          "/roofline" if not gpu else "GB/s", "/floor", "saved MiB"]
  if gpu:   # GB/s and % of peak bandwidth for normjax's jax.numpy path, Pallas and flax
    head.insert(8, "% peak")
    head[9:9] = ["pallas ms", "pallas GB/s", "pallas % peak", "flax GB/s", "flax % peak"]
  lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in records:
    rb = r.get("residual_bytes", {})
    saved = (f"{rb['normjax'] / 2**20:.0f} / {rb['flax'] / 2**20:.0f}"
             if {"normjax", "flax"} <= set(rb) else "")
    row = [r["case"], fmt_ms(r, "normjax"), fmt_ms(r, "flax"), fmt_r(r, "flax"),
           fmt_r(r, "flax_slow"), fmt_ms(r, "torch"), fmt_r(r, "torch")]
    if gpu:
      peak = meta.get("peak_gbps")
      pct = lambda gbps: f"{100 * gbps / peak:.0f}" if gbps and peak else ""
      by_impl = r.get("gbps_by_impl", {})
      gb = lambda impl: "" if impl not in by_impl else f"{by_impl[impl]:.0f}"
      row += [f"{r.get('gbps', 0):.0f}", pct(r.get("gbps", 0)), fmt_ms(r, "pallas"),
              gb("pallas"), pct(by_impl.get("pallas")), gb("flax"), pct(by_impl.get("flax")),
              fmt_r(r, "floor")]
    else:
      row += [fmt_r(r, "roofline"), fmt_r(r, "floor")]
    row.append(saved)
    lines.append("| " + " | ".join(row) + " |")
  lines += ["", "## Summary", ""]
  for base in ("flax", "flax_slow", "torch"):
    if base in summary:
      b = summary[base]
      lines.append(f"- vs {base}: geometric mean ratio **{b['geomean']:.2f}** "
                   f"(normjax speed-up {1 / b['geomean']:.2f}x) over {b['n']} cases; worst "
                   f"{b['worst']:.2f} ({b['worst_case']}); cases slower than {base}: "
                   f"{len(b['slower_cases'])}" +
                   (f" ({', '.join(b['slower_cases'])})" if b["slower_cases"] else ""))
  for op in ("fwd", "fwdbwd"):
    if f"flax_{op}_geomean" in summary:
      lines.append(f"- vs flax, {op} only: geometric mean {summary[f'flax_{op}_geomean']:.2f}")
  for key, title in (("group_fwd_vs_torch", "group norm forward / torch"),
                     ("layer_fwdbwd_vs_torch", "layer norm fwd+bwd / torch"),
                     ("large_fwd_vs_roofline", "large-shape forward / roofline")):
    if summary.get(key):
      short = (lambda k: k) if key == "large_fwd_vs_roofline" else (lambda k: k.split(" ", 2)[-1])
      lines.append(f"- {title}: " + ", ".join(f"{short(k)}: {v:.2f}"
                                              for k, v in summary[key].items()))
  if summary.get("residual_ratio_geomean") == summary.get("residual_ratio_geomean"):
    lines.append(f"- bytes saved for the backward, normjax / flax: geometric mean "
                 f"{summary['residual_ratio_geomean']:.2f}")
  comp = [(r["case"], r["compile_s"].get("normjax"), r["compile_s"].get("flax"))
          for r in records if "normjax" in r.get("compile_s", {})]
  if comp:
    lines.append(f"- compile time (s), geometric mean: normjax "
                 f"{geomean([c[1] for c in comp]):.2f}, flax "
                 f"{geomean([c[2] for c in comp if c[2]]):.2f}")
  if alloc:
    lines += ["", "## Allocator", "",
              "The same cases timed in a subprocess under each allocator (ms, median):", "",
              "| case | candidate | glibc ms | tcmalloc ms | glibc / tcmalloc |", "|---|---|---|---|---|"]
    for row in alloc:
      lines.append(f"| {row['case']} | {row['impl']} | {row['glibc'] * 1e3:.3g} | "
                   f"{row['tcmalloc'] * 1e3:.3g} | {row['glibc'] / row['tcmalloc']:.2f} |")
  return "\n".join(lines) + "\n"


def plot(records, path):
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  recs = [r for r in records if "ratios" in r]
  names = [r["case"] for r in recs]
  fig, ax = plt.subplots(figsize=(10, 0.28 * len(recs) + 1.5))
  ys = range(len(recs))
  for i, (base, color) in enumerate((("flax", "tab:blue"), ("torch", "tab:orange"),
                                     ("roofline", "tab:gray"))):
    vals = [1 / r["ratios"][base] if base in r["ratios"] else 0 for r in recs]
    ax.barh([y + (i - 1) * 0.27 for y in ys], vals, height=0.27, color=color,
            label={"flax": "baseline: flax.linen", "torch": "baseline: PyTorch",
                   "roofline": "baseline: memory roofline"}[base])
  ax.axvline(1.0, color="k", lw=0.8)
  ax.set_xscale("log")
  ax.set_yticks(list(ys))
  ax.set_yticklabels(names, fontsize=7)
  ax.invert_yaxis()
  ax.set_xlabel("speed of normjax relative to baseline (baseline time / normjax time; >1 = faster)")
  ax.legend(loc="lower right", fontsize=8)
  ax.set_title("normjax vs flax.linen, PyTorch and the memory roofline")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def machine_info(device):
  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      m = re.search(r"model name\s*:\s*(.*)", f.read())
      cpu = m.group(1) if m else cpu
  except OSError:
    pass
  info = f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}"
  try:
    with open("/proc/meminfo") as f:
      kb = int(re.search(r"MemTotal:\s*(\d+)", f.read()).group(1))
      info += f", {kb / 2**20:.0f} GiB RAM"
  except (OSError, AttributeError):
    pass
  if device.platform != "cpu":
    info = f"{device.device_kind} ({device.platform}); host: {info}"
  return info


def allocator_table(args, out_dir):
  """Times a few cases under glibc and tcmalloc (one subprocess each)."""
  if not os.path.exists(TCMALLOC):
    return None
  filt = ("^(layer fwd 8x512x1024|layer fwdbwd 8x512x1024|group fwd 32x56x56x256|"
          "batch_train fwd 32x56x56x256)$")
  res = {}
  for alloc in ("glibc", "tcmalloc"):
    path = os.path.join(out_dir, f".alloc_{alloc}.json")
    cmd = [sys.executable, os.path.abspath(__file__), "--allocator", alloc, "--filter", filt,
           "--impls", "normjax,flax,floor", "--rounds", "3", "--no-allocator-check",
           "--json-only", path]
    subprocess.run(cmd, check=True)
    with open(path) as f:
      res[alloc] = json.load(f)
    os.remove(path)
  rows = []
  for a, b in zip(res["glibc"], res["tcmalloc"]):
    for impl in ("normjax", "flax", "floor"):
      if impl in a["times"] and impl in b["times"]:
        rows.append({"case": a["case"], "impl": impl, "glibc": a["times"][impl]["median_s"],
                     "tcmalloc": b["times"][impl]["median_s"]})
  return rows


def main(argv=None):
  args = parse_args(argv)
  args.models = args.models or args.blocks
  maybe_reexec(args)
  if args.device == "cpu":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
  elif args.device == "gpu":
    os.environ.setdefault("JAX_PLATFORMS", "cuda")
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  if args.patterns:
    run_patterns(args)
    return
  import jax  # pylint: disable=import-outside-toplevel
  import cases as C  # pylint: disable=import-outside-toplevel

  device = jax.devices()[0]
  torch_device = None
  default_impls = GPU_IMPLS if device.platform == "gpu" else CPU_IMPLS
  impls = [i for i in (args.impls or ",".join(default_impls)).split(",") if i]
  if "torch" in impls and not args.models:
    try:
      import torch  # pylint: disable=import-outside-toplevel
      if device.platform == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)
        torch_device = "cpu"
      elif torch.cuda.is_available():
        torch_device = "cuda"
    except ImportError:
      pass
  rounds = args.rounds or (2 if args.quick else 5)
  target_s = args.target_s or (0.02 if args.quick else 0.12)
  out_dir = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
  os.makedirs(out_dir, exist_ok=True)
  stem = "quick" if args.quick else "results"
  if device.platform == "gpu":
    stem += "_gpu"

  case_list = [] if args.models else C.all_cases(args.quick)
  if args.filter:
    case_list = [c for c in case_list if re.search(args.filter, c.name)]
  with_models = args.models or not (args.quick or args.json_only or args.no_models)
  m_rounds = args.rounds or (2 if args.quick else 7)
  m_target = args.target_s or (0.02 if args.quick else 0.5)
  if args.models and args.json_only:   # a model subprocess (run_models)
    recs = run_models(args, device, m_rounds, m_target)
    with open(args.json_only, "w") as f:
      json.dump(recs, f)
    return
  t_start = time.time()
  records = []
  for i, case in enumerate(case_list):
    rec = run_case(case, impls, rounds, target_s, device, torch_device)
    records.append(rec)
    r = rec.get("ratios", {})
    print(f"[{i + 1}/{len(case_list)}] {case.name:40s} normjax {fmt_ms(rec, 'normjax'):>7s} ms  "
          + "  ".join(f"/{k} {v:.2f}" for k, v in r.items()), flush=True)
  if args.json_only:
    with open(args.json_only, "w") as f:
      json.dump(records, f)
    return
  wall = time.time() - t_start
  if case_list:
    write_suite(args, device, torch_device, records, wall, rounds, target_s, out_dir, stem)
  if with_models:
    t_start = time.time()
    m_records = run_models(args, device, m_rounds, m_target)
    if m_records:
      meta = run_meta(args, device, None, time.time() - t_start, m_rounds, m_target,
                      models=True)
      summary = models_summary(m_records)
      md = models_markdown(meta, m_records, summary)
      models = "models_blocks" if args.blocks else "models"
      m_stem = stem.replace("results", models) if not args.quick else stem.replace(
          "quick", "quick_" + models)
      with open(os.path.join(out_dir, m_stem + ".md"), "w") as f:
        f.write(md)
      with open(os.path.join(out_dir, m_stem + ".json"), "w") as f:
        json.dump({"meta": meta, "summary": summary, "records": m_records}, f, indent=1)
      print(md)


def run_patterns(args) -> None:
  """`--patterns`: benchmarks/patterns.py in this process (already under the allocator)."""
  import patterns  # pylint: disable=import-outside-toplevel
  argv = ["--allocator", "current"] + (["--quick"] if args.quick else [])
  for flag, value in (("--rounds", args.rounds), ("--target-s", args.target_s),
                      ("--filter", args.filter)):
    argv += [flag, str(value)] if value is not None else []
  if args.out:
    argv += ["--out", os.path.join(args.out, "quick_patterns.md" if args.quick else "patterns.md")]
  patterns.main(argv, command=shlex.join(["python", "benchmarks/run.py", *sys.argv[1:]]))


def run_meta(args, device, torch_device, wall, rounds, target_s, models=False) -> dict:
  """The run's description written at the top of every report."""
  import jax  # pylint: disable=import-outside-toplevel
  import flax  # pylint: disable=import-outside-toplevel
  versions = f"jax {jax.__version__}, flax {flax.__version__}"
  if models:
    import optax  # pylint: disable=import-outside-toplevel
    versions += f", optax {optax.__version__}; normjax paths: {args.paths}"
  if torch_device:
    import torch  # pylint: disable=import-outside-toplevel
    versions += f", torch {torch.__version__} ({torch.get_num_threads()} threads)"
  env = "NORMJAX_NATIVE=0 " if os.environ.get("NORMJAX_NATIVE", "1") == "0" else ""
  if not models:   # the model cases name their paths in `versions`
    versions += f"; normjax path: {native_path()}"
  meta = {"command": env + "python benchmarks/run.py " + " ".join(sys.argv[1:]),
          "machine": machine_info(device), "software": versions,
          "allocator": allocator_name() if device.platform == "cpu" else "n/a (GPU)",
          "platform": device.platform, "device_kind": device.device_kind,
          "date": datetime.datetime.now().isoformat(timespec="seconds"), "wall_s": wall,
          "rounds": rounds, "target_s": target_s}
  if device.platform == "gpu":
    meta["peak_gbps"] = next((v for k, v in PEAK_GBPS.items() if k in device.device_kind), None)
  return meta


def write_suite(args, device, torch_device, records, wall, rounds, target_s, out_dir, stem):
  """Writes the kernel suite's reports (results.* or quick.*)."""
  alloc = None
  if not args.quick and not args.no_allocator_check and device.platform == "cpu":
    alloc = allocator_table(args, out_dir)
  meta = run_meta(args, device, torch_device, wall, rounds, target_s)
  summary = summarize(records)
  md = markdown(meta, records, summary, alloc)
  with open(os.path.join(out_dir, stem + ".md"), "w") as f:
    f.write(md)
  with open(os.path.join(out_dir, stem + ".json"), "w") as f:
    json.dump({"meta": meta, "summary": summary, "records": records, "allocator": alloc}, f,
              indent=1)
  if not args.no_plot:
    plot(records, os.path.join(out_dir, stem + ".png"))
  print(md)


if __name__ == "__main__":
  main()
