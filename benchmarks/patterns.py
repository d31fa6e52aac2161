"""The norm patterns of a transformer: normjax's drop-in modules and fused functions vs flax.

Issue 27's cases, normjax / flax, forward and training step, on normjax's two paths. Run (from
the repository root; `python benchmarks/run.py --patterns [--quick]` runs the same):

    python benchmarks/patterns.py [--rounds 5] [--out benchmarks/results/patterns.md]
    python benchmarks/patterns.py --quick      # smoke run: tiny shapes, 2 rounds (about 30 s)
    python benchmarks/patterns.py --filter 'linen layer .* 2048x1024'

Patterns, each built from `normjax.linen`'s `LayerNorm`/`RMSNorm` and from flax.linen's (and,
on a few shapes, `normjax.nnx`'s against `flax.nnx`'s), on the same parameters:

* `n(x)`: the norm of `x`;
* `n(x+r)`: the norm of a residual sum `x + r` (the add is XLA's, before the norm);
* `pre-LN`: `(x + r, norm(x + r))`, both returned (the pre-LN block's residual stream);
* `fused`: `nj.add_layer_norm` / `nj.add_rms_norm` (nnx rows: `normjax.nnx.AddLayerNorm` /
  `AddRMSNorm`) against flax's unfused `pre-LN` program above.

Shapes: the issue's `[8, 256, 512]` and `[8, 512, 1024]` float32 and `[8, 256, 1024]`
bfloat16 ("before" table), and a `[rows, D]` grid over D in {256, 1024, 4096, 8192} and rows
in {2048, 16384, 65536}, float32 and bfloat16, without the combinations of more than 2^24
elements (64 MiB per float32 array: 16384 x 4096 and larger take too long on 2 cores), and in
bfloat16 without those of more than 2^23 (the run's 10 minutes); nnx on the issue's two
float32 shapes. The
modules get `dtype=x.dtype` (a bfloat16 model computes in bfloat16; parameters stay float32),
so every output is in `x.dtype`, as the fused functions' `y`.

Programs (benchmarks/modern.py's `measure`): each is `jax.jit`-compiled ahead of time, normjax's
once per path (traced under `nj.implementation("auto")` for the default path, the native CPU
kernels where the dispatch's plan applies, and under `"reference"` for the `jax.numpy` path),
flax's once. `fwd` is the forward; `train` is `out, vjp = jax.vjp(f, params, x[, r]);
return out, vjp(ct)`: the gradients with respect to the parameters, `x` and `r`, with random
cotangents for every output passed as arguments (a constant built inside `jit` is folded).

Timing: per (pattern, shape, dtype, api), the normjax programs of both paths and flax's are
warmed up, then timed in interleaved rounds (each round calls every program for about
`--target-s` seconds, in a fresh random order); the ratio is normjax's median time over
flax's, the spread the 25-75 % range of the per-round ratios. tcmalloc is preloaded as in
benchmarks/run.py (`--allocator glibc` for the system allocator).

Targets (issue 27), flagged in bold in the report: on the default path the training step at
most 1.0 and the forward at most 1.2, the fused function's training step at most 0.8 of flax's
unfused pre-LN; on the `jax.numpy` path no ratio above 1.2.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import shlex
import sys
import tempfile
import time

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import normjax as nj
import normjax.linen as njnn
import normjax.nnx as njnnx
from normjax._src.kernels import cpu

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import modern  # noqa: E402  (benchmarks/modern.py: programs, interleaved timing)
import run  # noqa: E402  (benchmarks/run.py: allocator and machine descriptions)

PATTERNS = ("n(x)", "n(x+r)", "pre-LN", "fused")
PASS_NAMES = {"fwd": "fwd", "fwd+bwd": "train"}
TRAIN_TARGET, FWD_TARGET, FUSED_TRAIN_TARGET, REFERENCE_TARGET = 1.0, 1.2, 0.8, 1.2
MAX_ELEMENTS = 2**24


def parse_args(argv=None):
  """benchmarks/modern.py's options (`--quick`, `--rounds`, `--target-s`, `--filter` on 'api
  norm pattern shape dtype', `--out`, `--allocator`) with this benchmark's defaults: 5 rounds
  of 0.03 s (2 of 0.004 s with `--quick`), `--out` benchmarks/results/patterns.md (a file in
  the temporary directory with `--quick`). The defaults go first; the caller's flags win."""
  argv = list(sys.argv[1:] if argv is None else argv)
  if "-h" in argv or "--help" in argv:
    sys.exit(print(__doc__))
  quick = "--quick" in argv
  out = (os.path.join(tempfile.gettempdir(), "normjax_patterns_quick.md") if quick
         else os.path.join(HERE, "results", "patterns.md"))
  return modern.parse_args(["--rounds", "2" if quick else "5",
                            "--target-s", "0.004" if quick else "0.03", "--out", out, *argv])


# --- the cases ------------------------------------------------------------------------------------

def shapes(quick: bool) -> list[tuple[tuple, str, tuple]]:
  """(shape, dtype, apis) of every configuration."""
  if quick:
    return [((64, 128), "float32", ("linen", "nnx")), ((2, 32, 256), "bfloat16", ("linen",))]
  issue = [((8, 256, 512), "float32"), ((8, 512, 1024), "float32"), ((8, 256, 1024), "bfloat16")]
  out = [(s, dt, ("linen", "nnx") if dt == "float32" else ("linen",)) for s, dt in issue]
  for d in (256, 1024, 4096, 8192):
    for rows in (2048, 16384, 65536):
      out += [((rows, d), dt, ("linen",)) for dt, cap in (("float32", MAX_ELEMENTS),
                                                          ("bfloat16", MAX_ELEMENTS // 2))
              if rows * d <= cap]
  return out


def _linen_fns(norm: str, dtype) -> dict:
  """pattern -> (normjax fn, flax fn, needs r); fn(params, x[, r])."""
  ours = {"layer": njnn.LayerNorm, "rms": njnn.RMSNorm}[norm](dtype=dtype)
  theirs = {"layer": nn.LayerNorm, "rms": nn.RMSNorm}[norm](dtype=dtype)
  add = {"layer": nj.add_layer_norm, "rms": nj.add_rms_norm}[norm]

  def unfused(module):
    apply = lambda p, x: module.apply({"params": p}, x)
    return {"n(x)": lambda p, x: apply(p, x), "n(x+r)": lambda p, x, r: apply(p, x + r),
            "pre-LN": lambda p, x, r: (x + r, apply(p, x + r))}

  def fused(p, x, r):
    y, h = add(x, r, p["scale"], *([p["bias"]] if "bias" in p else []), eps=ours.epsilon)
    return h, y

  pairs = zip(unfused(ours).items(), unfused(theirs).values(), strict=True)
  fns = {k: (f, g) for (k, f), g in pairs}
  fns["fused"] = (fused, fns["pre-LN"][1])
  return fns


def _nnx_fns(norm: str, dtype, d: int) -> tuple[dict, object]:
  """As `_linen_fns` for normjax.nnx / flax.nnx modules (fn(state, x[, r])), and flax's
  parameter state (normjax's modules get the same values)."""
  rngs = nnx.Rngs(0)
  make = lambda cls: cls(d, dtype=dtype, rngs=rngs)
  lib = {"layer": ("LayerNorm", "AddLayerNorm"), "rms": ("RMSNorm", "AddRMSNorm")}[norm]
  theirs = nnx.split(make(getattr(nnx, lib[0])))
  ours, ours_add = (nnx.split(make(getattr(njnnx, name))) for name in lib)
  for g, s in (ours, ours_add):   # the same variables (names, shapes) as flax's
    assert jax.tree.structure(s) == jax.tree.structure(theirs[1]), (norm, g)

  def unfused(graphdef):
    apply = lambda s, x: nnx.merge(graphdef, s)(x)
    return {"n(x)": lambda s, x: apply(s, x), "n(x+r)": lambda s, x, r: apply(s, x + r),
            "pre-LN": lambda s, x, r: (x + r, apply(s, x + r))}

  def fused(s, x, r):
    y, h = nnx.merge(ours_add[0], s)(x, r)
    return h, y

  pairs = zip(unfused(ours[0]).items(), unfused(theirs[0]).values(), strict=True)
  fns = {k: (f, g) for (k, f), g in pairs}
  fns["fused"] = (fused, fns["pre-LN"][1])
  return fns, theirs[1]


def make_configs(quick: bool) -> list[tuple[dict, modern.Config]]:
  """(description, modern.Config) per (api, norm, pattern, shape, dtype): the normjax program
  as modern's `fused`, flax's as its one baseline."""
  rng = np.random.default_rng(0)
  configs = []
  for shape, dt, apis in shapes(quick):
    dtype, d = jnp.dtype(dt), shape[-1]
    x, r = (jnp.asarray(rng.standard_normal(shape), dtype) for _ in range(2))
    w = jnp.asarray(1 + 0.1 * rng.standard_normal(d), jnp.float32)
    b = jnp.asarray(0.1 * rng.standard_normal(d), jnp.float32)
    for api in apis:
      for norm in ("layer", "rms"):
        if api == "linen":
          fns = _linen_fns(norm, dtype)
          params = {"scale": w, "bias": b} if norm == "layer" else {"scale": w}
        else:
          fns, state = _nnx_fns(norm, dtype, d)
          params = jax.tree_util.tree_map_with_path(
              lambda path, _, w=w, b=b: w if "scale" in jax.tree_util.keystr(path) else b, state)
        for pattern, (ours, theirs) in fns.items():
          inputs = (params, x) if pattern == "n(x)" else (params, x, r)
          desc = {"api": api, "norm": norm, "pattern": pattern, "shape": list(shape),
                  "dtype": dt}
          configs.append((desc, modern.Config(f"{api} {norm} {pattern}", shape, dt, inputs,
                                              ours, {"flax": (theirs, False)})))
  return configs


# --- targets and report ---------------------------------------------------------------------------

def target(path: str, pattern: str, pass_: str) -> float:
  if path == "reference":
    return REFERENCE_TARGET
  if pass_ == "fwd":
    return FWD_TARGET
  return FUSED_TRAIN_TARGET if pattern == "fused" else TRAIN_TARGET


def annotate(desc: dict, rec: dict) -> dict:
  """modern's record with this benchmark's description and verdicts (`meets_target`: yes,
  no, or noise: the median misses, the lower quartile of the per-round ratios meets it)."""
  rec.update(desc)
  for pass_ in modern.PASSES:
    v = rec[pass_]
    t = target(rec["path"], desc["pattern"], pass_)
    v["target"] = t
    v["meets_target"] = ("yes" if v["ratio"] <= t else
                         "noise" if v["round_ratio_25"] <= t else "no")
  return rec


def _cell(v: dict) -> str:
  s = f"{v['ratio']:.2f}"
  return {"yes": s, "noise": f"**{s}**~", "no": f"**{s}**"}[v["meets_target"]]


def tables(records: list[dict]) -> list[str]:
  """One table per path: a row per (api, norm, shape, dtype), a column per pattern and pass."""
  head = ["api", "norm", "shape", "dtype"] + [f"{p} {PASS_NAMES[q]}" for p in PATTERNS
                                              for q in modern.PASSES]
  lines = []
  for path, title in (("default", "Default path (native CPU kernels)"),
                      ("reference", "`jax.numpy` path (`nj.implementation(\"reference\")`)")):
    rows = {}
    for r in records:
      if r["path"] == path:
        key = (r["api"], r["norm"], "x".join(map(str, r["shape"])), r["dtype"])
        rows.setdefault(key, {})[r["pattern"]] = r
    if not rows:
      continue
    lines += [f"### {title}", "", "| " + " | ".join(head) + " |",
              "|" + "---|" * 4 + "---:|" * (len(head) - 4)]
    for key, cells in rows.items():
      vals = [_cell(cells[p][q]) if p in cells else "" for p in PATTERNS for q in modern.PASSES]
      lines.append("| " + " | ".join(list(key) + vals) + " |")
    lines.append("")
  return lines


def summary(records: list[dict]) -> list[str]:
  out = []
  for path in modern.PATHS:
    for pass_ in modern.PASSES:
      for fused in (False, True):
        rs = [r for r in records if r["path"] == path and (r["pattern"] == "fused") == fused]
        if not rs:
          continue
        ratios = [r[pass_]["ratio"] for r in rs]
        missed = [r for r in rs if r[pass_]["meets_target"] != "yes"]
        noise = sum(r[pass_]["meets_target"] == "noise" for r in missed)
        gm = float(np.exp(np.mean(np.log(ratios))))
        worst = max(rs, key=lambda r: r[pass_]["ratio"])
        out.append(
            f"- {path} path, {'fused' if fused else 'modules'} {PASS_NAMES[pass_]}: "
            f"{min(ratios):.2f}-{max(ratios):.2f} (geometric mean {gm:.2f}) over {len(rs)}; "
            f"target <= {rs[0][pass_]['target']}: missed by {len(missed)}"
            + (f" ({noise} within the per-round quartile)" if noise else "")
            + f"; worst {worst['api']} {worst['norm']} {worst['pattern']} "
              f"{'x'.join(map(str, worst['shape']))} {worst['dtype']}")
  return out


def write_report(args, command, records: list[dict], start: dict, n_done: int, n_all: int) -> None:
  """Writes the .md and .json (after every configuration: a cut-short run keeps what it has)."""
  wall = time.time() - start["t"]
  preload, allocator = os.environ.get("LD_PRELOAD", ""), start["allocator"]
  machine = run.machine_info(jax.devices()[0])   # CPU model, cores, kernel, RAM
  meta = {"command": command, "date_utc": start["date"], "wall_s": wall, "rounds": args.rounds,
          "target_s": args.target_s, "quick": args.quick, "configurations_done": n_done,
          "configurations": n_all, "machine": machine, "jax": jax.__version__,
          "flax": flax.__version__, "native": cpu.NATIVE, "cpu_level": cpu.CPU_LEVEL,
          "allocator": allocator, "ld_preload": preload, "loadavg_start": list(start["load"]),
          "loadavg_end": list(os.getloadavg()),
          "targets": {"default_train": TRAIN_TARGET, "default_fwd": FWD_TARGET,
                      "default_fused_train": FUSED_TRAIN_TARGET,
                      "reference": REFERENCE_TARGET}}
  load = lambda avg: ", ".join(f"{v:.2f}" for v in avg)
  items = (
      ("command", f"`{command}`" + (" (smoke run: tiny shapes)" if args.quick else "")),
      ("machine", f"{machine}; jax {meta['jax']}, flax {meta['flax']}; native kernels "
                  f"{cpu.NATIVE} ({cpu.CPU_LEVEL})"),
      ("allocator", allocator + (f" (`LD_PRELOAD={preload}`, benchmarks/run.py's re-exec)"
                                 if allocator == "tcmalloc" else "")),
      ("date (UTC)", f"{start['date']}; wall time {wall:.0f} s; {args.rounds} rounds of "
                     f"about {args.target_s} s of calls per program"),
      ("load average (1, 5, 15 min)", f"{load(start['load'])} at the start, "
                                      f"{load(meta['loadavg_end'])} at the end"))
  head = ["# Norm patterns: normjax vs flax (issue 27)", ""]
  head += [f"- {k}: {v}" for k, v in items]
  if n_done < n_all:
    head.append(f"- **partial**: {n_done} of {n_all} configurations measured so far")
  head += [
      "", "Ratios: normjax's median time over flax's (below 1: normjax faster), timed in the "
      "same interleaved rounds in one process. `train`: forward + backward (`jax.vjp` with "
      "random cotangents for every output, gradients for the parameters, `x` and `r`). "
      "`fused`: `nj.add_layer_norm` / `nj.add_rms_norm` (nnx: `AddLayerNorm` / `AddRMSNorm`) "
      "against flax's unfused `pre-LN` program. **Bold**: over the issue's target (default "
      "path: train <= 1.0, fwd <= 1.2, fused train <= 0.8; `jax.numpy` path: <= 1.2); `~`: "
      "the lower quartile of the per-round ratios meets the target (within this run's noise). The "
      "JSON has the per-round ratios' 25-75 % range, the times, the native kernels each "
      "program calls and the agreement with flax. See benchmarks/patterns.py's docstring.", ""]
  body = tables(records) + ["Summary:", ""] + summary(records)
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    f.write("\n".join(head + body) + "\n")
  with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
    json.dump({"meta": meta, "records": records}, f, indent=1)


def main(argv=None, command=None):
  """`command`: the command line the report names (benchmarks/run.py --patterns passes its own)."""
  args = parse_args(argv)
  command = command or shlex.join(["python", "benchmarks/patterns.py",
                                   *(argv if argv is not None else sys.argv[1:])])
  if args.allocator != "current":
    modern.reexec_with_allocator(args)
  configs = [(d, c) for d, c in make_configs(args.quick)
             if not args.filter or re.search(args.filter, c.label)]
  start = {"load": os.getloadavg(), "t": time.time(), "allocator": run.allocator_name(),
           "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}
  print(f"{len(configs)} configurations; native kernels {cpu.NATIVE} ({cpu.CPU_LEVEL}), "
        f"{start['allocator']}, load average {start['load']}", flush=True)
  records = []
  for i, (desc, cfg) in enumerate(configs):
    t0 = time.time()
    recs = [annotate(desc, r) for r in modern.measure(cfg, args, seed=i)]
    records.extend(recs)
    for r in recs:
      print(f"[{i + 1}/{len(configs)}] {cfg.label:44s} {r['path']:9s} "
            f"fwd {r['fwd']['ratio']:.2f}  train {r['fwd+bwd']['ratio']:.2f}  "
            f"({r['fwd+bwd']['fused_kernels'] or 'XLA'}; {time.time() - t0:.0f} s)", flush=True)
    write_report(args, command, records, start, i + 1, len(configs))
  print("\n".join(["", *summary(records)]), flush=True)
  print(f"wrote {args.out} and its .json ({time.time() - start['t']:.0f} s)", flush=True)


if __name__ == "__main__":
  main()
