"""The layers of today's models, fused, against the unfused composition a user writes today.

Each fused form of issue 28 (`rms_norm(..., scale_offset=1.0)`, `adaptive_layer_norm`,
`adaptive_group_norm`, `gated_rms_norm` in both gate orders and with Mamba-2's groups,
`dynamic_tanh`, `add_rms_norm` with a float32 residual) is timed against the `jax.numpy`
composition a user would write without it (built from normjax's plain norms, and from
flax.linen's modules where flax has the norm), forward and forward + backward, on normjax's
two paths: the default one (the native CPU kernels wherever the dispatch's plan applies) and
the `jax.numpy` one (every program traced
under `nj.implementation("reference")`; the unfused normjax composition is traced under the
same choice, flax's programs once). Run (from the repository root):

    python benchmarks/modern.py [--rounds 9] [--out benchmarks/results/modern.md]
    python benchmarks/modern.py --quick      # smoke run: tiny shapes, 2 rounds (about 20 s)

Shapes: the transformer rows `[8 * 256, 512]` and `[8 * 512, 1024]` (`[B, T, D]` `[8, 256,
512]` and `[8, 512, 1024]` with `[B, 1, D]` modulation for adaLN), NHWC `[8, 32, 32, 128]` with
32 groups and `[B, 1, 1, C]` modulation for AdaGN (the gated norm's mean square also over 8
groups of the features, Mamba-2's `ngroups`); float32 and bfloat16 (`add_rms_norm`:
bfloat16 `x`, float32 residual). Activations (`x`, the modulation `shift`/`scale`, the gate
`z`) are in the case's dtype; learned parameters (`w`, `b`, `alpha`) in float32 (flax's
`param_dtype`); every program returns `x.dtype`, as the fused form does.

Programs: every program is `jax.jit`-compiled ahead of time (`.lower(...).compile()`, under
the path's `nj.implementation` choice, which is jit-cache sensitive: the compiled executable
keeps the choice it was traced under). The forward+backward program is
`out, vjp = jax.vjp(f, *args); return out, vjp(ct)`: the derivative in every argument (`x`,
and `w` / `shift`, `scale` / `z` / `alpha`, `b` / the residual), with a random cotangent
`ct` passed as an argument (a constant cotangent built inside `jit` is folded by XLA). The
native kernels each compiled program calls are read from its HLO (the `Normjax*` FFI
targets) and reported.

Timing: all programs of one configuration (case, shape, dtype) are warmed up, then timed in
interleaved rounds (each round runs every program once, for about `--target-s` seconds of
calls, in a fresh random order), so that load changes hit them alike; the ratio is the fused
program's median time over the baseline's, and the spread is the 25-75 % range of the
per-round ratios. Allocator: as benchmarks/run.py, the script re-executes itself with tcmalloc
preloaded when it is installed (`--allocator glibc` for the system allocator).

One pass: with every configuration, an XLA loop that reads the case's full-size inputs
(`x`, `z`, the residual; the cotangent too for forward+backward) once and writes each output
(and, for forward+backward, each such input's cotangent) once, timed in the same rounds. Each
program's time over it says how far it is from one read and write of its data, as XLA does
it in a single loop; where the target times the baseline's ratio to it is below 1, the target
asks for a program faster than that loop. It is a reference, not a bound: the native kernels
on both cores run below it in some cells.

Targets (issue 28): fused at most 0.7 of the unfused time on the default path, and never
slower than the unfused composition on the `jax.numpy` path.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import random
import re
import shlex
import sys
import tempfile
import time
from collections.abc import Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import normjax as nj
from normjax._src.kernels import cpu

HERE = os.path.dirname(os.path.abspath(__file__))
PATHS = ("default", "reference")
PASSES = ("fwd", "fwd+bwd")
DEFAULT_TARGET = 0.7      # fused / unfused on the default path, at most
REFERENCE_TARGET = 1.0    # on the jax.numpy path: never slower


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--quick", action="store_true", help="tiny shapes, 2 rounds (smoke test)")
  p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 9; 2 quick)")
  p.add_argument("--target-s", type=float, default=None,
                 help="seconds of calls per program per round (default 0.1; 0.004 quick)")
  p.add_argument("--filter", default=None, help="regex on 'case shape dtype'")
  p.add_argument("--out", default=None,
                 help="results .md (the .json beside it); default benchmarks/results/modern.md,\n"
                      "with --quick a file in the temporary directory")
  p.add_argument("--allocator", default="auto", choices=("auto", "tcmalloc", "glibc", "current"),
                 help="auto: tcmalloc if installed (re-exec with LD_PRELOAD, as run.py)")
  args = p.parse_args(argv)
  args.rounds = args.rounds or (2 if args.quick else 9)
  args.target_s = args.target_s or (0.004 if args.quick else 0.1)
  if args.out is None:
    args.out = (os.path.join(tempfile.gettempdir(), "normjax_modern_quick.md") if args.quick
                else os.path.join(HERE, "results", "modern.md"))
  return args


def reexec_with_allocator(args) -> None:
  """benchmarks/run.py's `maybe_reexec`: tcmalloc preloaded when installed (CPU only)."""
  sys.path.insert(0, HERE)
  import run  # benchmarks/run.py, next to this script
  run.maybe_reexec(argparse.Namespace(device="cpu", allocator=args.allocator))


# --- the cases ------------------------------------------------------------------------------------

@dataclasses.dataclass
class Config:
  case: str
  shape: tuple
  dtype: str
  inputs: tuple                  # every array differentiated in the fwd+bwd program
  fused: Callable
  baselines: dict                # name -> (fn, traced per path: True for normjax's, False flax)

  @property
  def label(self) -> str:
    return f"{self.case} {'x'.join(map(str, self.shape))} {self.dtype}"


def make_configs(quick: bool) -> list[Config]:
  f32 = jnp.float32
  rng = np.random.default_rng(0)
  normal = lambda shape, dtype, s=1.0, m=0.0: jnp.asarray(
      m + s * rng.standard_normal(shape), dtype)
  rows = ((64, 128),) if quick else ((8 * 256, 512), (8 * 512, 1024))
  seqs = ((2, 16, 64),) if quick else ((8, 256, 512), (8, 512, 1024))
  images = ((2, 8, 8, 64),) if quick else ((8, 32, 32, 128),)
  dtypes = (jnp.float32, jnp.bfloat16)
  configs = []

  def add(case, shape, dtype, inputs, fused, **baselines):
    configs.append(Config(case, tuple(shape), jnp.dtype(dtype).name, inputs, fused, baselines))

  flax_rms = nn.RMSNorm(epsilon=1e-6, use_scale=False)
  flax_ln = nn.LayerNorm(epsilon=1e-6, use_scale=False, use_bias=False)
  flax_gn = nn.GroupNorm(num_groups=32, epsilon=1e-5, use_scale=False, use_bias=False)

  for shape in rows:
    for dt in dtypes:
      add("rms_norm scale_offset=1", shape, dt, (normal(shape, dt), normal(shape[-1:], f32, 0.1)),
          lambda x, w: nj.rms_norm(x, w, scale_offset=1.0),
          nj=(lambda x, w: (nj.rms_norm(x).astype(f32) * (1 + w.astype(f32))).astype(x.dtype),
              True),
          flax=(lambda x, w: (flax_rms.apply({}, x).astype(f32) * (1 + w)).astype(x.dtype),
                False))
  for shape in seqs:
    for dt in dtypes:
      mod = (shape[0], 1, shape[-1])
      add("adaptive_layer_norm", shape, dt,
          (normal(shape, dt), normal(mod, dt, 0.5), normal(mod, dt, 0.5)),
          lambda x, shift, scale: nj.adaptive_layer_norm(x, shift, scale),
          nj=(lambda x, shift, scale: (nj.layer_norm(x, eps=1e-6) * (1 + scale) + shift
                                       ).astype(x.dtype), True),
          flax=(lambda x, shift, scale: (flax_ln.apply({}, x) * (1 + scale) + shift
                                         ).astype(x.dtype), False))
  for shape in images:
    for dt in dtypes:
      mod = (shape[0], 1, 1, shape[-1])
      add("adaptive_group_norm", shape, dt,
          (normal(shape, dt), normal(mod, dt, 0.5), normal(mod, dt, 0.5)),
          lambda x, shift, scale: nj.adaptive_group_norm(x, shift, scale, num_groups=32),
          nj=(lambda x, shift, scale: (nj.group_norm(x, num_groups=32) * (1 + scale) + shift
                                       ).astype(x.dtype), True),
          flax=(lambda x, shift, scale: (flax_gn.apply({}, x) * (1 + scale) + shift
                                         ).astype(x.dtype), False))
  for shape in rows:
    for dt in dtypes:
      inputs = (normal(shape, dt), normal(shape, dt), normal(shape[-1:], f32, 0.1, 1.0))
      add("gated_rms_norm gate->norm", shape, dt, inputs,
          lambda x, z, w: nj.gated_rms_norm(x, z, w),
          nj=(lambda x, z, w: nj.rms_norm(x * jax.nn.silu(z), w).astype(x.dtype), True))
      add("gated_rms_norm norm->gate", shape, dt, inputs,
          lambda x, z, w: nj.gated_rms_norm(x, z, w, norm_before_gate=True),
          nj=(lambda x, z, w: (nj.rms_norm(x, w) * jax.nn.silu(z)).astype(x.dtype), True))

  def grouped_unfused(x, z, w):   # Mamba-2's RMSNormGated(ngroups=8) as a user writes it
    u = x * jax.nn.silu(z)
    split = u.shape[:-1] + (8, u.shape[-1] // 8)
    return (nj.rms_norm(u.reshape(split)).reshape(u.shape) * w).astype(x.dtype)
  for shape in rows:
    for dt in dtypes:
      add("gated_rms_norm 8 groups", shape, dt,
          (normal(shape, dt), normal(shape, dt), normal(shape[-1:], f32, 0.1, 1.0)),
          lambda x, z, w: nj.gated_rms_norm(x, z, w, group_size=x.shape[-1] // 8),
          nj=(grouped_unfused, True))
  for shape in rows:
    for dt in dtypes:
      add("dynamic_tanh", shape, dt,
          (normal(shape, dt), jnp.asarray(0.5, f32), normal(shape[-1:], f32, 0.1, 1.0),
           normal(shape[-1:], f32, 0.1)),
          lambda x, alpha, w, b: nj.dynamic_tanh(x, alpha, w, b),
          nj=(lambda x, alpha, w, b: (jnp.tanh(alpha * x) * w + b).astype(x.dtype), True))

  def add_rms_unfused(x, r, w):
    h = x.astype(f32) + r
    return nj.rms_norm(h, w).astype(x.dtype), h
  for shape in rows:
    add("add_rms_norm residual f32", shape, jnp.bfloat16,
        (normal(shape, jnp.bfloat16), normal(shape, f32), normal(shape[-1:], f32, 0.1, 1.0)),
        lambda x, r, w: nj.add_rms_norm(x, r, w, residual_dtype=f32),
        nj=(add_rms_unfused, True))
  return configs


# --- programs and timing --------------------------------------------------------------------------

@dataclasses.dataclass
class Program:
  variant: str       # "fused" or a baseline's name
  pass_: str
  path: str          # "default", "reference", or "-" (flax: no normjax inside)
  call: Callable
  args: tuple
  kernels: list
  compile_s: float


FLOOR = "one pass"


def one_pass(cfg: Config, out_shape, *, backward: bool) -> Callable:
  """One pass over the data of a pass: one XLA loop that reads every input of the case's
  shape (`x`, and `z` or the residual) once, and the cotangents too for the forward+backward,
  and writes every output once (and, for the forward+backward, a cotangent of each such
  input), with one add per element read; the small parameters are left out. A reference for
  how near a program is to one read and one write of its data (what XLA does in a single
  loop), not a bound: a native kernel on both cores can run below it."""
  full = lambda tree: [a for a in jax.tree.leaves(tree) if tuple(a.shape) == cfg.shape]

  def program(args, ct):
    reads = full(args) + (jax.tree.leaves(ct) if backward else [])
    s = sum(a.astype(jnp.float32) for a in reads)
    writes = jax.tree.leaves(out_shape) + (full(args) if backward else [])
    # A different factor per output, so that XLA writes each one (no shared buffer).
    return [(s * (1.0 + k / 1024)).astype(w.dtype) for k, w in enumerate(writes)]
  return program


def build_programs(cfg: Config, rng: np.random.Generator) -> list[Program]:
  out_shape = jax.eval_shape(cfg.fused, *cfg.inputs)
  ct = jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s.shape), s.dtype), out_shape)

  def fwd(f):
    return lambda args, ct: f(*args)

  def fwd_bwd(f):
    def program(args, ct):
      out, vjp = jax.vjp(f, *args)
      return out, vjp(ct)
    return program

  floor = {"fwd": one_pass(cfg, out_shape, backward=False),
           "fwd+bwd": one_pass(cfg, out_shape, backward=True)}
  programs = []
  variants = [("fused", cfg.fused, True)] + [(n, f, p) for n, (f, p) in cfg.baselines.items()]
  variants.append((FLOOR, None, False))
  for name, f, per_path in variants:
    for path in (PATHS if per_path else ("-",)):
      for pass_, wrap in (("fwd", fwd), ("fwd+bwd", fwd_bwd)):
        program = floor[pass_] if name == FLOOR else wrap(f)
        t0 = time.perf_counter()
        with nj.implementation("reference" if path == "reference" else "auto"):
          compiled = jax.jit(program).lower(cfg.inputs, ct).compile()
        compile_s = time.perf_counter() - t0
        kernels = sorted({re.sub(r"(F32|BF16)$", "", k) for k in
                          re.findall(r"Normjax([A-Za-z0-9]+)", compiled.as_text())})
        programs.append(Program(name, pass_, path, compiled, (cfg.inputs, ct), kernels,
                                compile_s))
  return programs


def _sample(call, args, reps: int) -> float:
  t0 = time.perf_counter()
  for _ in range(reps):
    out = call(*args)
  jax.block_until_ready(out)
  return (time.perf_counter() - t0) / reps


def time_rounds(programs: list[Program], rounds: int, target_s: float, seed: int) -> list:
  """Per-program lists of per-round mean seconds per call, interleaved round by round."""
  reps = []
  for p in programs:
    _sample(p.call, p.args, 2)                                   # warm-up
    probe = sorted(_sample(p.call, p.args, 1) for _ in range(3))[1]
    reps.append(int(min(200, max(1, round(target_s / max(probe, 1e-7))))))
  samples = [[] for _ in programs]
  order = list(range(len(programs)))
  rnd = random.Random(seed)
  for _ in range(rounds):
    rnd.shuffle(order)           # a fresh order every round: no program always follows another
    for i in order:
      samples[i].append(_sample(programs[i].call, programs[i].args, reps[i]))
  return samples


def max_diff(a, b) -> tuple[float, float]:
  """max |a - b| over the outputs, and max |b|, in float32."""
  la = [np.asarray(v, np.float32) for v in jax.tree.leaves(a)]
  lb = [np.asarray(v, np.float32) for v in jax.tree.leaves(b)]
  return (max(float(np.max(np.abs(u - v))) for u, v in zip(la, lb, strict=True)),
          max(float(np.max(np.abs(v))) for v in lb))


def verdict(path: str, ratio: float, lo: float) -> str:
  """Whether a ratio meets the issue's target on its path ("noise": the median misses it but
  the lower quartile of the per-round ratios meets it)."""
  target = DEFAULT_TARGET if path == "default" else REFERENCE_TARGET
  if ratio <= target:
    return "yes"
  return "noise" if lo <= target else "no"


def measure(cfg: Config, args, seed: int) -> list[dict]:
  rng = np.random.default_rng(seed)
  programs = build_programs(cfg, rng)
  index = {(p.variant, p.pass_, p.path): i for i, p in enumerate(programs)}
  samples = time_rounds(programs, args.rounds, args.target_s, seed)
  records = []
  for path in PATHS:
    for base in cfg.baselines:
      base_path = path if cfg.baselines[base][1] else "-"
      rec = {"case": cfg.case, "baseline": base, "shape": list(cfg.shape), "dtype": cfg.dtype,
             "path": path, "baseline_path": base_path}
      for pass_ in PASSES:
        fu = programs[index[("fused", pass_, path)]]
        bs = programs[index[(base, pass_, base_path)]]
        tf = np.asarray(samples[index[("fused", pass_, path)]])
        tb = np.asarray(samples[index[(base, pass_, base_path)]])
        per_round = tf / tb
        ratio = float(np.median(tf) / np.median(tb))
        lo, hi = (float(q) for q in np.percentile(per_round, [25, 75]))
        diff, scale = max_diff(fu.call(*fu.args), bs.call(*bs.args))
        tfloor = float(np.median(samples[index[(FLOOR, pass_, "-")]]))
        rec[pass_] = {
            "ratio": ratio, "round_ratio_25": lo, "round_ratio_75": hi,
            "fused_ms": float(np.median(tf)) * 1e3, "baseline_ms": float(np.median(tb)) * 1e3,
            "fused_round_ms": [t * 1e3 for t in tf], "baseline_round_ms": [t * 1e3 for t in tb],
            "fused_kernels": fu.kernels, "baseline_kernels": bs.kernels,
            "fused_compile_s": fu.compile_s, "baseline_compile_s": bs.compile_s,
            "max_abs_diff": diff, "max_abs_baseline": scale,
            "floor_ms": tfloor * 1e3, "fused_over_floor": float(np.median(tf)) / tfloor,
            "baseline_over_floor": float(np.median(tb)) / tfloor,
            "meets_target": verdict(path, ratio, lo)}
      records.append(rec)
  return records


# --- report ---------------------------------------------------------------------------------------

KERNEL_FAMILY = {"RowsForward": "rows", "RowsBackward": "rows", "RowsAddForward": "rows-add",
                 "ColumnMoments": "moments", "RowMoments": "moments", "ColumnSums": "sums",
                 "RowSums": "sums"}


def _runs_on(kernels: list) -> str:
  """The native kernel families a program calls, or "XLA" (the jax.numpy code) for none."""
  fams = sorted({KERNEL_FAMILY.get(k, k) for k in kernels})
  return "+".join(fams) if fams else "XLA"


def table(records: list[dict]) -> list[str]:
  lines = ["| case | baseline | shape | dtype | path | kernels (fused / baseline) | fwd ratio "
           "| fwd 25-75 % | fwd+bwd ratio | fwd+bwd 25-75 % | target met (fwd, fwd+bwd) "
           "| fwd / one pass (fused, baseline) | fwd+bwd / one pass (fused, baseline) |",
           "|---|---|---|---|---|---|---:|---|---:|---|---|---|---|"]
  for r in records:
    f, b = r["fwd"], r["fwd+bwd"]
    runs = f"{_runs_on(b['fused_kernels'])} / {_runs_on(b['baseline_kernels'])}"
    lines.append(
        f"| {r['case']} | {r['baseline']} | {'x'.join(map(str, r['shape']))} | {r['dtype']} | "
        f"{r['path']} | {runs} | {f['ratio']:.2f} | {f['round_ratio_25']:.2f}-"
        f"{f['round_ratio_75']:.2f} | {b['ratio']:.2f} | {b['round_ratio_25']:.2f}-"
        f"{b['round_ratio_75']:.2f} | {f['meets_target']}, {b['meets_target']} | "
        f"{f['fused_over_floor']:.2f}, {f['baseline_over_floor']:.2f} | "
        f"{b['fused_over_floor']:.2f}, {b['baseline_over_floor']:.2f} |")
  return lines


def xla_on_default(records: list[dict]) -> list[str]:
  """The fused forms whose default-path programs call no native kernel."""
  cases = sorted({f"`{r['case']}`" for r in records if r["path"] == "default"
                  and not r["fwd+bwd"]["fused_kernels"]})
  return ([f"- fused forms that call no native kernel on the default path (they run the "
           f"jax.numpy reference there too): {', '.join(cases)}"] if cases else [])


def summary(records: list[dict]) -> list[str]:
  out = []
  for path, target in (("default", DEFAULT_TARGET), ("reference", REFERENCE_TARGET)):
    rs = [r for r in records if r["path"] == path]
    for pass_ in PASSES:
      ratios = [r[pass_]["ratio"] for r in rs]
      if not ratios:
        continue
      missed = [f"{r['case']} vs {r['baseline']} {'x'.join(map(str, r['shape']))} {r['dtype']} "
                f"({r[pass_]['ratio']:.2f}"
                f"{', noise' if r[pass_]['meets_target'] == 'noise' else ''})"
                for r in rs if r[pass_]["meets_target"] != "yes"]
      below = [f"{r['case']} vs {r['baseline']} {'x'.join(map(str, r['shape']))} {r['dtype']} "
               f"({target * r[pass_]['baseline_over_floor']:.2f})"
               for r in rs if r[pass_]["meets_target"] != "yes"
               and target * r[pass_]["baseline_over_floor"] < 1.0]
      gm = float(np.exp(np.mean(np.log(ratios))))
      out.append(f"- {path} path, {pass_}: ratios {min(ratios):.2f}-{max(ratios):.2f} "
                 f"(geometric mean {gm:.2f}); target <= {target}: met by "
                 f"{len(ratios) - len(missed)} of {len(ratios)}"
                 + (f"; missed by {'; '.join(missed)}" if missed else "")
                 + (f"; of these, the target asks for less than one XLA loop over the data "
                    f"(target x baseline / one pass below 1) for {'; '.join(below)}"
                    if below else ""))
  return out


def write_report(args, argv, records: list[dict], start: dict, n_done: int, n_all: int) -> None:
  """Writes the .md and .json (after every configuration: a cut-short run keeps what it has)."""
  load_end = os.getloadavg()
  wall = time.time() - start["t"]
  preload = os.environ.get("LD_PRELOAD", "")
  allocator = "tcmalloc" if "tcmalloc" in preload else "glibc"
  command = shlex.join(["python", "benchmarks/modern.py",
                        *(argv if argv is not None else sys.argv[1:])])
  meta = {
      "command": command, "date_utc": start["date"], "wall_s": wall, "rounds": args.rounds,
      "target_s": args.target_s, "quick": args.quick,
      "configurations_done": n_done, "configurations": n_all,
      "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
      "jax": jax.__version__, "flax": flax.__version__, "native": cpu.NATIVE,
      "cpu_level": cpu.CPU_LEVEL, "allocator": allocator, "ld_preload": preload,
      "loadavg_start": list(start["load"]), "loadavg_end": list(load_end),
      "targets": {"default": DEFAULT_TARGET, "reference": REFERENCE_TARGET}}
  fmt_load = lambda avg: ", ".join(f"{v:.2f}" for v in avg)
  head = [
      "# The layers of today's models: fused vs the unfused composition",
      "",
      f"- command: `{command}`" + (" (smoke run: tiny shapes)" if args.quick else ""),
      f"- machine: {meta['machine']}; jax {jax.__version__}, flax {flax.__version__}; "
      f"native kernels {cpu.NATIVE} ({cpu.CPU_LEVEL})",
      f"- allocator: {allocator}" + (f" (`LD_PRELOAD={preload}`, benchmarks/run.py's re-exec)"
                                     if allocator == "tcmalloc" else ""),
      f"- date (UTC): {start['date']}; wall time {wall:.0f} s; {args.rounds} rounds of about "
      f"{args.target_s} s of calls per program",
      f"- load average (1, 5, 15 min): {fmt_load(start['load'])} at the start, "
      f"{fmt_load(load_end)} at the end",
  ]
  if n_done < n_all:
    head.append(f"- **partial**: {n_done} of {n_all} configurations measured so far")
  head += [
      "",
      "Ratio: the fused program's median time over the baseline's (below 1: fused faster), "
      "both timed in the same interleaved rounds in one process; 25-75 %: the range of the "
      "per-round ratios. Baselines: `nj`, the unfused composition of normjax's plain norms "
      "(traced on the same path as the fused form); `flax`, flax.linen's module with the "
      "modulation written by hand (the same program on both paths). Kernels: the native "
      "kernel families the forward+backward programs call (from their HLO), `XLA` where they "
      "call none. Targets (issue 28): at most 0.7 on the default path, at most 1.0 on the "
      "reference (`jax.numpy`) path; `noise`: the median misses it, the lower quartile of the "
      "rounds meets it. One pass: each program's median time over that of one pass over "
      "its data, one XLA loop that reads the case's full-size inputs (and, for the "
      "forward+backward, the cotangents) once and writes the outputs (and those inputs' "
      "cotangents) once; where the target times the baseline's one-pass ratio is below 1, "
      "the target asks for a program faster than that one XLA loop (a reference, not a "
      "bound: the native kernels on both cores run below it in some cells). See the "
      "docstring of benchmarks/modern.py for the programs.",
      "",
  ]
  body = table(records) + ["", "Summary:", ""] + summary(records) + xla_on_default(records)
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    f.write("\n".join(head + body) + "\n")
  with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
    json.dump({"meta": meta, "records": records}, f, indent=1)


def main(argv=None):
  args = parse_args(argv)
  if args.allocator != "current":
    reexec_with_allocator(args)
  start = {"load": os.getloadavg(), "t": time.time(),
           "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}
  print(f"native={cpu.NATIVE} level={cpu.CPU_LEVEL} jax={jax.__version__} "
        f"allocator={'tcmalloc' if 'tcmalloc' in os.environ.get('LD_PRELOAD', '') else 'glibc'} "
        f"load={start['load']}", flush=True)
  configs = make_configs(args.quick)
  if args.filter:
    configs = [c for c in configs if re.search(args.filter, c.label)]
  records = []
  print("\n".join(table([])), flush=True)
  for i, cfg in enumerate(configs):
    t0 = time.time()
    recs = measure(cfg, args, seed=i)
    records.extend(recs)
    for line in table(recs)[2:]:
      print(line, flush=True)
    print(f"  ({cfg.label}: {time.time() - t0:.0f} s)", file=sys.stderr, flush=True)
    write_report(args, argv, records, start, i + 1, len(configs))
  print("\n".join(["", *summary(records)]), flush=True)
  print(f"wrote {args.out} and its .json ({time.time() - start['t']:.0f} s)", flush=True)


if __name__ == "__main__":
  main()
