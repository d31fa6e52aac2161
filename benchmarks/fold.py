"""Inference speedup from folding BatchNorm into the preceding Conv (`normjax.fold_linen_params`).

A ResNet-ish evaluation forward (stem + conv/BN/ReLU blocks) with and without folding, timed
in one process (the ratio is what matters); writes benchmarks/results/fold.md.

    python benchmarks/fold.py [--batch 32] [--size 32] [--repeats 20]
"""

from __future__ import annotations

import argparse
import os
import time

import flax.linen as nn
import jax
import jax.numpy as jnp

import normjax as nj
import normjax.linen as njnn

BLOCKS = 4


class Net(nn.Module):
  fold: bool = False

  @nn.compact
  def __call__(self, x):
    def unit(x, i, features, stride=1):
      x = nn.Conv(features, (3, 3), strides=stride, use_bias=self.fold, name=f"conv{i}")(x)
      if not self.fold:
        x = njnn.BatchNorm(use_running_average=True, name=f"bn{i}")(x)
      return x
    x = nn.relu(unit(x, 0, 32))
    for b in range(BLOCKS):
      y = nn.relu(unit(x, 2 * b + 1, 32))
      x = nn.relu(x + unit(y, 2 * b + 2, 32))
    return jnp.mean(x, axis=(1, 2))


def timed(fn, *args, repeats):
  jax.block_until_ready(fn(*args))
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    best = min(best, time.perf_counter() - t)
  return best


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--size", type=int, default=32)
  parser.add_argument("--repeats", type=int, default=20)
  args = parser.parse_args()
  x = jax.random.normal(jax.random.key(0), (args.batch, args.size, args.size, 3))
  variables = Net().init(jax.random.key(1), x)
  variables = jax.tree.map(lambda v: v + 0.1, variables)
  pairs = [(f"conv{i}", f"bn{i}") for i in range(2 * BLOCKS + 1)]
  folded = {"params": nj.fold_linen_params(variables["params"], variables["batch_stats"], pairs)}
  plain_fn = jax.jit(Net().apply)
  folded_fn = jax.jit(Net(fold=True).apply)
  y = plain_fn(variables, x)
  err = float(jnp.max(jnp.abs(y - folded_fn(folded, x))) / jnp.max(jnp.abs(y)))
  t_plain = timed(plain_fn, variables, x, repeats=args.repeats)
  t_fold = timed(folded_fn, folded, x, repeats=args.repeats)
  table = (f"# Folding BatchNorm into Conv: ResNet-ish eval forward\n\n"
           f"backend {jax.default_backend()}, {os.cpu_count()} CPUs, batch {args.batch}, "
           f"{args.size}x{args.size}x3, {2 * BLOCKS + 1} conv+BN, best of {args.repeats}\n\n"
           f"| model | ms | ratio |\n|---|---|---|\n"
           f"| conv + BatchNorm | {1e3 * t_plain:.2f} | 1.00 |\n"
           f"| folded | {1e3 * t_fold:.2f} | {t_fold / t_plain:.2f} |\n\n"
           f"max |folded - unfolded| / max |unfolded| = {err:.1e}\n")
  print(table)
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "fold.md")
  with open(path, "w") as f:
    f.write(table)


if __name__ == "__main__":
  main()
