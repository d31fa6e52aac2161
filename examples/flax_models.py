"""A small CNN built from `normjax.linen` and from `normjax.nnx` modules, with optax.

How to compose normjax into Flax models: the norm layers of `normjax.linen` / `normjax.nnx` take
the attributes of their `flax.linen` / `flax.nnx` namesakes and keep their parameter and
collection names (`scale`, `bias`; `batch_stats` with `mean`, `var`), so swapping
`from flax import linen as nn` for `normjax.linen` in the norm layers is all it takes, and
variables made by the Flax modules load unchanged. The script

1. builds a CNN for the 8x8 digits (three 3x3 convs of 8, 16 and 32 channels, the second of
   stride 2, each followed by a norm and a ReLU, global average pooling, a dense classifier)
   once per norm and per API,
2. checks that the normjax-built model, given the variables of the same model built from
   Flax's own norm modules, computes the same logits (training and evaluation mode),
3. trains it on the digits with optax in the idiomatic loop of each API (linen: `apply` with
   `mutable=["batch_stats"]`; nnx: `nnx.Optimizer`, `model.train()` / `model.eval()`), and
   prints test accuracy.

Run: `python examples/flax_models.py` (107 s on 2 CPU cores in the committed run,
`docs/flax_models`; `--impl flax` runs the same with Flax's own norm modules,
for comparison; `--norms batch group --epochs 2` for a shorter run).
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402
import normjax.linen  # noqa: E402
import normjax.nnx  # noqa: E402

NORMS = ("batch", "layer", "instance", "group", "rms")
IMPLS = {"normjax": (normjax.linen, normjax.nnx), "flax": (nn, nnx)}
BN_MOMENTUM = 0.9


def _key(seed: int) -> jax.Array:
  # The "rbg" generator: the default threefry kernels of the initializers take many seconds to
  # compile on a CPU; any key works here.
  return jax.random.key(seed, impl="rbg")


# ---------------------------------------------------------------------------------------------
# linen

def linen_norm(lib: Any, kind: str, train: bool) -> nn.Module:
  """A norm layer from `lib` (`normjax.linen` or `flax.linen`), configured as in the CNN."""
  if kind == "batch":
    return lib.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM)
  if kind == "layer":     # per example over (H, W, C), per-channel scale and bias
    return lib.LayerNorm(reduction_axes=(1, 2, 3), feature_axes=-1)
  if kind == "instance":
    return lib.InstanceNorm()
  if kind == "group":
    return lib.GroupNorm(num_groups=_common.NUM_GROUPS)
  if kind == "rms":
    return lib.RMSNorm(reduction_axes=(1, 2, 3), feature_axes=-1)
  raise ValueError(f"unknown norm {kind!r}; choose from {NORMS}")


class LinenCNN(nn.Module):
  norm: str
  impl: str = "normjax"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    for features, stride in zip(_common.CNN_FEATURES, _common.CNN_STRIDES):
      x = nn.Conv(features, (3, 3), strides=stride, padding=1)(x)
      x = linen_norm(IMPLS[self.impl][0], self.norm, train)(x)
      x = nn.relu(x)
    return nn.Dense(_common.NUM_CLASSES)(x.mean(axis=(1, 2)))


def train_linen(kind: str, impl: str, data: _common.Digits, epochs: int, batch_size: int,
                lr: float, seed: int) -> float:
  model = LinenCNN(kind, impl)
  variables = model.init(_key(seed), jnp.asarray(data.x_train[:2]), train=False)
  params, batch_stats = variables["params"], variables.get("batch_stats", {})
  steps_per_epoch = len(data.y_train) // batch_size
  tx = _common.make_optimizer(lr, epochs * steps_per_epoch)
  opt_state = tx.init(params)

  @jax.jit
  def train_step(params, batch_stats, opt_state, x, y):
    def loss_fn(params):
      logits, updates = model.apply({"params": params, "batch_stats": batch_stats}, x,
                                    train=True, mutable=["batch_stats"])
      return _common.cross_entropy(logits, y)[0], updates.get("batch_stats", {})
    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), batch_stats, opt_state, loss

  rng = np.random.default_rng(seed)
  for _ in range(epochs):
    order = rng.permutation(len(data.y_train))
    for i in range(steps_per_epoch):
      idx = order[i * batch_size:(i + 1) * batch_size]
      params, batch_stats, opt_state, _ = train_step(params, batch_stats, opt_state,
                                                     data.x_train[idx], data.y_train[idx])
  logits = model.apply({"params": params, "batch_stats": batch_stats}, data.x_test, train=False)
  return float(_common.cross_entropy(logits, jnp.asarray(data.y_test))[1])


# ---------------------------------------------------------------------------------------------
# nnx

def nnx_norm(lib: Any, kind: str, features: int, rngs: nnx.Rngs) -> nnx.Module:
  """A norm layer from `lib` (`normjax.nnx` or `flax.nnx`), configured as in the CNN."""
  if kind == "batch":
    return lib.BatchNorm(features, momentum=BN_MOMENTUM, rngs=rngs)
  if kind == "layer":
    return lib.LayerNorm(features, reduction_axes=(1, 2, 3), feature_axes=-1, rngs=rngs)
  if kind == "instance":
    return lib.InstanceNorm(features, rngs=rngs)
  if kind == "group":
    return lib.GroupNorm(features, num_groups=_common.NUM_GROUPS, rngs=rngs)
  if kind == "rms":
    return lib.RMSNorm(features, reduction_axes=(1, 2, 3), feature_axes=-1, rngs=rngs)
  raise ValueError(f"unknown norm {kind!r}; choose from {NORMS}")


class NnxCNN(nnx.Module):
  def __init__(self, norm: str, *, rngs: nnx.Rngs, impl: str = "normjax"):
    convs, norms, c_in = [], [], 1
    for features, stride in zip(_common.CNN_FEATURES, _common.CNN_STRIDES):
      convs.append(nnx.Conv(c_in, features, (3, 3), strides=stride, padding=1, rngs=rngs))
      norms.append(nnx_norm(IMPLS[impl][1], norm, features, rngs))
      c_in = features
    self.convs, self.norms = nnx.List(convs), nnx.List(norms)
    self.head = nnx.Linear(c_in, _common.NUM_CLASSES, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    for conv, norm in zip(self.convs, self.norms):
      x = nnx.relu(norm(conv(x)))
    return self.head(x.mean(axis=(1, 2)))


def train_nnx(kind: str, impl: str, data: _common.Digits, epochs: int, batch_size: int,
              lr: float, seed: int) -> float:
  model = NnxCNN(kind, rngs=nnx.Rngs(_key(seed)), impl=impl)
  steps_per_epoch = len(data.y_train) // batch_size
  optimizer = nnx.Optimizer(model, _common.make_optimizer(lr, epochs * steps_per_epoch),
                            wrt=nnx.Param)

  @nnx.jit
  def train_step(model, optimizer, x, y):
    def loss_fn(model):
      return _common.cross_entropy(model(x), y)[0]
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)      # batch stats were updated in place by model(x)
    return loss

  model.train()                         # BatchNorm: batch statistics, update running ones
  rng = np.random.default_rng(seed)
  for _ in range(epochs):
    order = rng.permutation(len(data.y_train))
    for i in range(steps_per_epoch):
      idx = order[i * batch_size:(i + 1) * batch_size]
      train_step(model, optimizer, data.x_train[idx], data.y_train[idx])
  model.eval()                          # BatchNorm: running statistics
  logits = nnx.jit(lambda m, x: m(x))(model, data.x_test)
  return float(_common.cross_entropy(logits, jnp.asarray(data.y_test))[1])


# ---------------------------------------------------------------------------------------------

def max_logit_gap(kind: str, x: jax.Array) -> dict[str, float]:
  """normjax-built vs Flax-built CNN on the same variables: max |logits difference|."""
  out = {}
  ref, ours = LinenCNN(kind, "flax"), LinenCNN(kind, "normjax")
  variables = jax.jit(functools.partial(ref.init, train=False))(_key(0), x)
  for train in (True, False):
    mutable = ["batch_stats"] if train else False
    a, b = (jax.jit(functools.partial(m.apply, train=train, mutable=mutable))(variables, x)
            for m in (ref, ours))
    a, b = (a[0], b[0]) if train else (a, b)
    out[f"linen {'train' if train else 'eval'}"] = float(jnp.abs(a - b).max())
  ref = NnxCNN(kind, rngs=nnx.Rngs(_key(0)), impl="flax")
  ours = NnxCNN(kind, rngs=nnx.Rngs(_key(1)))
  nnx.update(ours, nnx.state(ref))      # the Flax model's variables, loaded unchanged
  call = nnx.jit(lambda m, x: m(x))
  for train in (True, False):
    for m in (ref, ours):
      m.train() if train else m.eval()
    out[f"nnx {'train' if train else 'eval'}"] = float(jnp.abs(call(ref, x) - call(ours, x)).max())
  return out


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  p = argparse.ArgumentParser(
      description=__doc__.split("\n\n")[0],
      epilog="Each norm trains twice (linen and nnx); the defaults reproduce docs/flax_models "
             "(107 s on 2 CPU cores). `--norms batch group --epochs 2` is a short run.")
  p.add_argument("--norms", nargs="+", default=list(NORMS), choices=NORMS, metavar="NORM",
                 help=f"which norm layers to build the CNN with, any of {', '.join(NORMS)} "
                      "(default: all)")
  p.add_argument("--impl", default="normjax", choices=tuple(IMPLS),
                 help="whose norm modules to train with: normjax's, or flax's own for "
                      "comparison (the logit check against flax runs either way; default: "
                      "%(default)s)")
  p.add_argument("--epochs", type=int, default=8,
                 help="passes over the 1,347 training digits (default: %(default)s)")
  p.add_argument("--batch-size", type=int, default=32,
                 help="images per SGD step (default: %(default)s)")
  p.add_argument("--base-lr", type=float, default=0.1,
                 help="peak SGD learning rate at batch size 32, scaled linearly with the batch "
                      "size, warmup + cosine (default: %(default)s)")
  p.add_argument("--seed", type=int, default=0,
                 help="seed of the initialization and the batch order (default: %(default)s)")
  p.add_argument("--out", default=os.path.join("results", "flax_models"),
                 help="folder for results.md and results.json (default: %(default)s)")
  args = p.parse_args(argv)
  t_start = time.perf_counter()
  data = _common.load_digits()
  lr = _common.linear_scaled_lr(args.base_lr, args.batch_size)
  print(f"digits: {len(data.y_train)} train / {len(data.y_test)} test; {args.epochs} epochs of "
        f"batch {args.batch_size}, SGD momentum 0.9, peak lr {lr:g}; norm modules from "
        f"{args.impl}")

  rows = []
  for kind in args.norms:
    row: dict[str, Any] = {"norm": kind}
    if args.impl == "normjax":
      row["max_logit_gap_vs_flax"] = max_logit_gap(kind, jnp.asarray(data.x_test[:16]))
    for api, train in (("linen", train_linen), ("nnx", train_nnx)):
      t0 = time.perf_counter()
      row[f"{api}_test_acc"] = train(kind, args.impl, data, args.epochs, args.batch_size, lr,
                                     args.seed)
      row[f"{api}_s"] = time.perf_counter() - t0
    gap = row.get("max_logit_gap_vs_flax")
    print(f"  {kind:<9} linen {100 * row['linen_test_acc']:5.1f}% ({row['linen_s']:.0f} s)   "
          f"nnx {100 * row['nnx_test_acc']:5.1f}% ({row['nnx_s']:.0f} s)" +
          (f"   max |logits - flax's| {max(gap.values()):.1e}" if gap else ""))
    rows.append(row)

  wall_s = time.perf_counter() - t_start
  os.makedirs(args.out, exist_ok=True)
  md = [f"# The digits CNN from {args.impl}.linen and {args.impl}.nnx modules", "",
        f"Digits, {args.epochs} epochs of batch {args.batch_size}, seed {args.seed}; "
        f"{wall_s:.0f} s.", "",
        "| norm | linen test acc (%) | nnx test acc (%) | max abs logit gap vs Flax modules |",
        "|---|---:|---:|---:|",
        *[f"| {r['norm']} | {100 * r['linen_test_acc']:.1f} | {100 * r['nnx_test_acc']:.1f} | "
          + (f"{max(r['max_logit_gap_vs_flax'].values()):.1e}"
             if "max_logit_gap_vs_flax" in r else "n/a") + " |" for r in rows], ""]
  return _common.write_results(args.out, md, {"args": vars(args), "rows": rows, "wall_s": wall_s},
                               wall_s)


if __name__ == "__main__":
  main()
