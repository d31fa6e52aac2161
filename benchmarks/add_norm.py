"""Residual add + layer norm, fused (`nj.add_layer_norm`) vs unfused (`nj.layer_norm(x + r)`).

The pre-LN transformer's residual+norm pair, at the shapes of benchmarks/models.py's
transformer (`[8 * 256, 512]`) and a larger one, float32 and bfloat16, forward and forward +
backward (a loss that reads both `y` and `h`). Both programs run in one process, interleaved
round by round; the ratio is fused / unfused median time. Run:

    python benchmarks/add_norm.py [--rounds 7] [--out benchmarks/results/add_norm.md]
    python benchmarks/add_norm.py --model [--quick]   # the whole transformer of models.py

With `--out`, the op-level table is also written there (Markdown, with the command, machine,
allocator and date); the committed `benchmarks/results/add_norm.md` is such a run, and the
README's fused/unfused range is checked against it (tests/test_readme.py).

`--model` times benchmarks/models.py's pre-LN transformer (normjax build, LayerNorm and
RMSNorm) with `fused=False` and `fused=True` (every residual add + norm pair one
`AddLayerNorm`/`AddRMSNorm` call), same variables, eval forward and training step.
"""

import argparse
import dataclasses
import datetime
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import normjax as nj
from normjax._src.kernels import cpu


def _programs(x, r, s, b):
  fused = lambda x, r: nj.add_layer_norm(x, r, s, b)
  unfused = lambda x, r: (nj.layer_norm(x + r, s, b), x + r)

  def grad(f):
    def loss(x, r):
      y, h = f(x, r)
      return jnp.sum(y.astype(jnp.float32) * x.astype(jnp.float32)) + jnp.sum(
          h.astype(jnp.float32))
    return jax.grad(loss, argnums=(0, 1))
  return {("fwd", "fused"): fused, ("fwd", "unfused"): unfused,
          ("fwd+bwd", "fused"): grad(fused), ("fwd+bwd", "unfused"): grad(unfused)}


def _time(fn, args, reps):
  t0 = time.perf_counter()
  for _ in range(reps):
    out = fn(*args)
  jax.block_until_ready(out)
  return (time.perf_counter() - t0) / reps


def run_model(args):
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  import models  # noqa: PLC0415 (benchmarks/models.py, next to this script)
  print("| model | program | unfused ms | fused ms | fused / unfused | max |y diff| |")
  print("|---|---|---:|---:|---:|---:|")
  for case in models.model_cases(args.quick)[:2]:   # the transformers (layer, rms)
    x, target = models.make_batch(case)
    variables = models.init_variables(case, x)
    built = {}
    for fused in (False, True):
      model = models.make_model(dataclasses.replace(case, fused=fused), "normjax")
      fwd, step = models.programs(case, model)
      opt_state = models.OPTIMIZER.init(variables["params"])
      built[fused] = {"fwd": (jax.jit(fwd), (variables, x)),
                      "train": (jax.jit(step), (variables["params"], opt_state, None, x,
                                                target))}
    diff = float(jnp.max(jnp.abs(built[True]["fwd"][0](*built[True]["fwd"][1])
                                 - built[False]["fwd"][0](*built[False]["fwd"][1]))))
    times = {(p, f): [] for p in ("fwd", "train") for f in (False, True)}
    for (p, f) in times:
      fn, a = built[f][p]
      jax.block_until_ready(fn(*a))
    for _ in range(args.rounds):
      for (p, f) in times:
        fn, a = built[f][p]
        times[(p, f)].append(_time(fn, a, 1))
    for p in ("fwd", "train"):
      u = float(np.median(times[(p, False)])) * 1e3
      fz = float(np.median(times[(p, True)])) * 1e3
      print(f"| {case.name} | {p} | {u:.1f} | {fz:.1f} | {fz / u:.2f} | {diff:.1e} |",
            flush=True)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--rounds", type=int, default=7)
  p.add_argument("--target-s", type=float, default=0.2, help="seconds per timing sample")
  p.add_argument("--model", action="store_true", help="the transformer of models.py instead")
  p.add_argument("--quick", action="store_true", help="with --model: smoke-test sizes")
  p.add_argument("--out", default=None, help="also write the op-level table to this .md file")
  args = p.parse_args(argv)
  print(f"native={cpu.NATIVE} level={cpu.CPU_LEVEL} jax={jax.__version__}")
  if args.model:
    return run_model(args)
  t_start = time.time()
  lines = ["| shape | dtype | pass | unfused ms | fused ms | fused / unfused |",
           "|---|---|---|---:|---:|---:|"]
  print("\n".join(lines))
  rng = np.random.default_rng(0)
  for shape in ((2048, 512), (8192, 1024)):
    for dtype in (jnp.float32, jnp.bfloat16):
      x = jnp.asarray(rng.standard_normal(shape), dtype)
      r = jnp.asarray(rng.standard_normal(shape), dtype)
      s = jnp.asarray(rng.standard_normal(shape[-1]), jnp.float32)
      b = jnp.asarray(rng.standard_normal(shape[-1]), jnp.float32)
      progs = {k: jax.jit(f) for k, f in _programs(x, r, s, b).items()}
      reps = {}
      for k, f in progs.items():
        jax.block_until_ready(f(x, r))
        reps[k] = max(1, int(args.target_s / max(_time(f, (x, r), 3), 1e-6)))
      times = {k: [] for k in progs}
      for _ in range(args.rounds):     # interleaved: load changes hit both alike
        for k, f in progs.items():
          times[k].append(_time(f, (x, r), reps[k]))
      for pass_ in ("fwd", "fwd+bwd"):
        u = float(np.median(times[(pass_, "unfused")])) * 1e3
        fz = float(np.median(times[(pass_, "fused")])) * 1e3
        lines.append(f"| {shape} | {jnp.dtype(dtype).name} | {pass_} | {u:.3f} | {fz:.3f} | "
                     f"{fz / u:.2f} |")
        print(lines[-1], flush=True)
  if args.out:
    preload = os.environ.get("LD_PRELOAD", "")
    head = [
        "# Residual add + layer norm: fused (`nj.add_layer_norm`) vs unfused",
        "",
        f"- command: `python benchmarks/add_norm.py --rounds {args.rounds} --out {args.out}`",
        f"- machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
        f"jax {jax.__version__}; native kernels {cpu.NATIVE} ({cpu.CPU_LEVEL})",
        f"- allocator: {'tcmalloc' if 'tcmalloc' in preload else 'glibc'}",
        f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}; "
        f"wall time {time.time() - t_start:.0f} s",
        "",
        "Median time per call of each program, interleaved round by round in one process.",
        "",
    ]
    with open(args.out, "w") as f:
      f.write("\n".join(head + lines) + "\n")


if __name__ == "__main__":
  main()
