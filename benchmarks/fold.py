"""What folding BatchNorm into the preceding conv buys at inference (`nj.fold_linen_params`).

The model is the ResNet-style CNN of `benchmarks/models.py` (stem + 3 stages x 2 residual
blocks, widths 16-32-64, 32x32x3 input: 15 conv + BatchNorm pairs, projections included),
timed in evaluation three ways in one process:

* `normjax BN`: conv (no bias) + `normjax.linen.BatchNorm(use_running_average=True)`;
* `flax BN`: the same with `flax.linen.BatchNorm`, on the same variables;
* `folded`: the same model with each BatchNorm replaced by a bias add and the conv kernels
  scaled (`nj.fold_linen_params`): conv + bias, what PyTorch's `fuse_conv_bn_eval` gives.

Measurement: all three are compiled and warmed up first; then `--rounds` rounds, each timing
every candidate for about `--target-ms` (a fixed number of calls per candidate, chosen from a
probe) in an order that rotates from round to round. A round's time per call is the median of
its calls; the reported ratio is the median over rounds of the per-round ratio (folded /
normjax BN), with its 25-75% range, so that drifts in machine load, which hit the candidates
of one round alike, cancel. The allocator is stated: by default the script re-executes itself
with tcmalloc preloaded when it is installed, as `benchmarks/run.py` does.

    python benchmarks/fold.py            # batch 1 and 32, 30 rounds (about 3 min on 2 cores)
    python benchmarks/fold.py --quick    # a smoke run

Writes `benchmarks/results/fold.md` and `fold.json` (or into `--out`).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run as suite  # noqa: E402  (allocator handling only: stdlib imports)


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32], help="batch sizes")
  p.add_argument("--rounds", type=int, default=30, help="interleaved timing rounds")
  p.add_argument("--target-ms", type=float, default=400.0,
                 help="time per candidate per round (sets the calls per round)")
  p.add_argument("--quick", action="store_true",
                 help="smoke run: a small model (widths 8-16, 8x8 input), 3 rounds")
  p.add_argument("--allocator", default="auto", choices=("auto", "tcmalloc", "glibc", "current"),
                 help="auto: tcmalloc if installed (re-exec with LD_PRELOAD); current: as is")
  p.add_argument("--out", default=None, help="output folder (default benchmarks/results)")
  args = p.parse_args(argv)
  args.device = "cpu"   # for suite.maybe_reexec
  return args


def _timed_rounds(calls: dict, rounds: int, target_s: float) -> dict:
  """Per candidate, the median seconds per call of each round (interleaved, rotating order)."""
  import numpy as np
  reps = {}
  for name, call in calls.items():
    for _ in range(3):                     # warm-up
      call()
    t0 = time.perf_counter()
    for _ in range(3):
      call()
    reps[name] = int(np.clip(target_s / ((time.perf_counter() - t0) / 3), 3, 2000))
  names = list(calls)
  per_round = {name: [] for name in names}
  for r in range(rounds):
    for name in names[r % len(names):] + names[:r % len(names)]:
      t = []
      for _ in range(reps[name]):
        t0 = time.perf_counter()
        calls[name]()
        t.append(time.perf_counter() - t0)
      per_round[name].append(float(np.median(t)))
  return {"per_round_s": per_round, "calls_per_round": reps}


def main(argv=None) -> dict:
  args = parse_args(argv)
  suite.maybe_reexec(args)
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  import numpy as np

  import models
  import normjax as nj
  import normjax.linen as njnn

  class Bias(nn.Module):
    """What remains of a folded BatchNorm: a per-channel bias (the conv's folded bias)."""

    @nn.compact
    def __call__(self, x, use_running_average=None):
      del use_running_average
      return x + self.param("bias", nn.initializers.zeros, (x.shape[-1],))

  widths, image, blocks = ((8, 16), 8, 1) if args.quick else ((16, 32, 64), 32, 2)
  rounds = 3 if args.quick else args.rounds
  bn = lambda cls: functools.partial(cls, momentum=0.9, epsilon=models.EPS)
  build = lambda norm: models.ResNet(norm, True, widths, blocks, 10)
  builds = {"normjax BN": build(bn(njnn.BatchNorm)), "flax BN": build(bn(nn.BatchNorm)),
            "folded": build(Bias)}

  # conv/BN pairs of the ResNet, by their paths in `params`
  pairs = [("stem", "stem_norm")]
  for i in range(len(widths)):
    for j in range(blocks):
      b = f"stage{i}_block{j}"
      pairs += [(f"{b}/conv1", f"{b}/norm1"), (f"{b}/conv2", f"{b}/norm2")]
      if i > 0 and j == 0:            # stride 2 entering the stage: a projection shortcut
        pairs.append((f"{b}/proj", f"{b}/proj_norm"))

  records = []
  for batch in args.batch_sizes:
    case = models.ModelCase("resnet", "batch", batch, image=image, widths=widths,
                            blocks_per_stage=blocks)
    x, _ = models.make_batch(case)
    variables = models.init_variables(case, x)   # running stats from a training-mode pass
    folded = nj.fold_linen_params(variables["params"], variables["batch_stats"], pairs,
                                  eps=models.EPS)
    for conv, norm in pairs:        # the folded conv's bias goes where the BatchNorm was
      get = lambda tree, path: functools.reduce(lambda t, k: t[k], path.split("/"), tree)
      parent, leaf = (norm.rsplit("/", 1) + [""])[:2] if "/" in norm else ("", norm)
      target = get(folded, parent) if parent else folded
      target[leaf] = {"bias": get(folded, conv).pop("bias")}
    inputs = {"normjax BN": variables, "flax BN": variables, "folded": {"params": folded}}
    xj = jax.device_put(jnp.asarray(x))
    fns, outs, hlo_ops = {}, {}, {}
    for name, model in builds.items():
      fn = jax.jit(functools.partial(model.apply, train=False)).lower(inputs[name], xj).compile()
      entry = fn.as_text().split("ENTRY", 1)[1]     # XLA's optimized program: its top level
      hlo_ops[name] = {"fusions": entry.count(" fusion("),
                       "instructions": sum(" = " in line for line in entry.splitlines())}
      fns[name] = functools.partial(lambda f, v: jax.block_until_ready(f(v, xj)), fn,
                                    inputs[name])
      outs[name] = np.asarray(fns[name]())
    scale = float(np.max(np.abs(outs["normjax BN"])))
    diff = {k: float(np.max(np.abs(v - outs["normjax BN"]))) / scale for k, v in outs.items()}
    timing = _timed_rounds(fns, rounds, args.target_ms / 1e3)
    t = {k: np.asarray(v) for k, v in timing["per_round_s"].items()}
    ratio = lambda k: t[k] / t["normjax BN"]
    q = lambda a: [float(np.percentile(a, p)) for p in (25, 50, 75)]
    records.append({"batch": batch, "input": list(x.shape), "pairs": len(pairs),
                    "median_ms": {k: 1e3 * float(np.median(v)) for k, v in t.items()},
                    "ratio_vs_normjax_bn": {k: q(ratio(k)) for k in t if k != "normjax BN"},
                    "max_rel_diff_vs_normjax_bn": diff, "hlo_top_level": hlo_ops, **timing})
    print(f"batch {batch}: " + ", ".join(f"{k} {1e3 * float(np.median(v)):.3f} ms"
                                         for k, v in t.items()) +
          f"; folded / normjax BN {q(ratio('folded'))[1]:.2f}")

  info = {"backend": jax.default_backend(), "cpus": os.cpu_count(), "jax": jax.__version__,
          "allocator": suite.allocator_name(), "rounds": rounds, "target_ms": args.target_ms,
          "widths": list(widths), "blocks_per_stage": blocks,
          "command": "python benchmarks/fold.py " + " ".join(sys.argv[1:] if argv is None
                                                              else list(argv)),
          "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
  lines = [
      "# Folding BatchNorm into the preceding conv: ResNet-style eval forward", "",
      f"`{info['command'].strip()}`: backend {info['backend']}, {info['cpus']} CPUs, jax "
      f"{info['jax']}, allocator {info['allocator']}; ResNet of `benchmarks/models.py` "
      f"(widths {'-'.join(map(str, widths))}, {blocks} blocks per stage, "
      f"{records[0]['pairs']} conv + BatchNorm pairs), eval mode; {rounds} interleaved rounds "
      f"of about {args.target_ms:.0f} ms per candidate.", "",
      "| batch | input | normjax BN (ms) | flax BN (ms) | folded (ms) | folded / normjax BN "
      "(median, 25-75%) | flax BN / normjax BN | max rel. diff of folded | XLA fusions: "
      "normjax BN / folded |",
      "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
  for r in records:
    m, rf, rl = r["median_ms"], r["ratio_vs_normjax_bn"]["folded"], \
        r["ratio_vs_normjax_bn"]["flax BN"]
    lines.append(f"| {r['batch']} | {'x'.join(map(str, r['input']))} | {m['normjax BN']:.3f} | "
                 f"{m['flax BN']:.3f} | {m['folded']:.3f} | {rf[1]:.2f} ({rf[0]:.2f}-{rf[2]:.2f})"
                 f" | {rl[1]:.2f} ({rl[0]:.2f}-{rl[2]:.2f}) | "
                 f"{r['max_rel_diff_vs_normjax_bn']['folded']:.1e} | "
                 f"{r['hlo_top_level']['normjax BN']['fusions']} / "
                 f"{r['hlo_top_level']['folded']['fusions']} |")
  lines += ["", "Ratios are per round (the candidates of a round run back to back), then the "
            "median over rounds; below 1 = faster than the unfolded normjax model.", ""]
  out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, "fold.md"), "w") as f:
    f.write("\n".join(lines))
  with open(os.path.join(out, "fold.json"), "w") as f:
    json.dump({"info": info, "results": records}, f, indent=1)
  print("\n".join(lines))
  return {"info": info, "results": records}


if __name__ == "__main__":
  main()
