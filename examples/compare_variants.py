"""Which normalization should I use, and when does batch norm break? Train and see.

Trains the same small CNN on scikit-learn's bundled 8x8 digits (1,797 real images, no
download; a fixed stratified 1,347 / 450 train/test split) once per normalization -- none,
batch, layer, instance, group, RMS (and each further variant as normjax gains it) -- for a
sweep of batch sizes and several seeds, as in Wu & He (2018), "Group Normalization", Fig. 1.

Fairness: every run sees the same number of training examples and follows the same learning-
rate schedule as a function of the fraction of training done (linear warmup over 5%, cosine
decay to 0). The optimizer is SGD with momentum 0.9 and the linear scaling rule of Goyal et al.
(2017), which Wu & He also use: peak lr = base_lr * B / 32. So a small batch takes more, smaller
steps. For a given seed every run starts from the same weights and sees the same examples in
the same order. Batch norm is evaluated with its running statistics (`train=False`), as
deployed, with momentum 0.9 (PyTorch's default; flax's 0.99 would leave the running averages
partly at their initial values after the ~260 steps of batch size 64); a diagnostic row also
evaluates it with population statistics recomputed on the training set after training
("precise BN"), which separates bad running estimates from a badly trained model. The sweep
starts at batch size 1, where batch norm's training statistics are those of a single image.

Everything uses the functional API in a custom loop: one jitted program per batch size runs
any variant (a `lax.switch`), all seeds (`jax.vmap`) and all steps (`jax.lax.scan`), threading
the batch statistics explicitly, so there is no per-step Python dispatch.

Run (from the repository root, or anywhere once normjax is installed):

  python examples/compare_variants.py --quick          # every variant, reduced sweep, < 2 min
  python examples/compare_variants.py                  # the full sweep, < 20 min on 2 cores

Writes `results.md`, `results.json`, `accuracy_vs_batch_size.png` and `training_curves.png`
into `--out` (default `results/`).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402
import normjax as nj  # noqa: E402

Params = dict[str, Any]


class Variant(NamedTuple):
  """A normalization as the CNN uses it after each conv.

  Every variant sees the same per-layer parameters (`scale`, `bias`: `[C]`) and state (a
  `BatchStats`) and uses what it needs, so that all variants fit one compiled program (a
  `lax.switch` on the variant index) and only one compilation per batch size is needed.
  """
  name: str
  description: str
  apply: Callable[..., tuple[jax.Array, nj.BatchStats]]
  # apply(params, stats, h [N, H, W, C], train: bool) -> (normalized h, new stats)
  recalibrate: Callable[..., tuple[jax.Array, nj.BatchStats]] | None = None
  # running-statistics variants: the same norm with momentum 0; a train-mode pass of it over
  # the whole training set stores the population statistics as the new running statistics


def _per_channel(p: jax.Array) -> jax.Array:
  return p.reshape(1, 1, 1, -1)


def _batch_apply(momentum: float):
  def apply(p, stats, h, train):
    return nj.batch_norm(h, p["scale"], p["bias"], stats, train=train, momentum=momentum)
  return apply


def _batch_renorm_apply(momentum: float):
  def apply(p, stats, h, train):
    return nj.batch_renorm(h, p["scale"], p["bias"], stats, train=train, momentum=momentum)
  return apply


def _ghost_apply(momentum: float, group: int):
  def apply(p, stats, h, train):
    # Groups of `group` consecutive examples (fewer when the batch is smaller or not a
    # multiple), each normalized with its own statistics in training (Hoffer et al., 2017).
    k = math.gcd(h.shape[0], group)
    return nj.batch_norm(h, p["scale"], p["bias"], stats, train=train, momentum=momentum,
                         virtual_batch_size=k if train else None)
  return apply


def _layer(p, stats, h, train):
  # Wu & He's layer norm for CNNs: per example over (H, W, C), with a per-channel affine
  # (the same as group_norm with num_groups=1).
  y = nj.layer_norm(h, axis=(1, 2, 3))
  return y * _per_channel(p["scale"]) + _per_channel(p["bias"]), stats


def _rms(p, stats, h, train):
  y = nj.rms_norm(h, axis=(1, 2, 3))
  return y * _per_channel(p["scale"]), stats


def all_variants(bn_momentum: float = 0.9) -> dict[str, Variant]:
  """Every variant this version of normjax offers, by name, in table order."""
  variants = [
      Variant("none", "no normalization (conv bias only)", lambda p, s, h, train: (h, s)),
      Variant("batch", f"`nj.batch_norm` over (N, H, W), momentum {bn_momentum}; evaluated "
              "with the running statistics", _batch_apply(bn_momentum), _batch_apply(0.0))]
  if hasattr(nj, "batch_renorm"):   # the wider family, as the library gains it
    variants.append(Variant("batch_renorm", f"`nj.batch_renorm` (r_max 3, d_max 5), momentum "
                            f"{bn_momentum}", _batch_renorm_apply(bn_momentum),
                            _batch_renorm_apply(0.0)))
    variants.append(Variant("ghost_batch", "`nj.batch_norm(..., virtual_batch_size=k)`, "
                            f"statistics per group of k = gcd(B, 8) examples, momentum "
                            f"{bn_momentum}", _ghost_apply(bn_momentum, 8),
                            _batch_apply(0.0)))
  variants += [
      Variant("layer", "`nj.layer_norm` over (H, W, C) per example, per-channel affine", _layer),
      Variant("instance", "`nj.instance_norm` over (H, W) per example and channel",
              lambda p, s, h, train: (nj.instance_norm(h, p["scale"], p["bias"]), s)),
      Variant("group", f"`nj.group_norm`, {_common.NUM_GROUPS} groups, over (H, W, channels of "
              "the group) per example",
              lambda p, s, h, train: (nj.group_norm(h, p["scale"], p["bias"],
                                                    num_groups=_common.NUM_GROUPS), s)),
      Variant("rms", "`nj.rms_norm` over (H, W, C) per example (no centering), per-channel "
              "scale", _rms)]
  return {v.name: v for v in variants}


# ---------------------------------------------------------------------------------------------
# The model: conv -> norm -> relu, three times, then pool and classify.

def init_params(weights: Params) -> Params:
  """The CNN weights plus, per norm layer, `scale` (ones) and `bias` (zeros) of shape `[C]`."""
  params = dict(weights)
  for i, c in enumerate(_common.CNN_FEATURES):
    params[f"norm{i}"] = {"scale": np.ones((c,), np.float32), "bias": np.zeros((c,), np.float32)}
  return params


def init_state() -> Params:
  """Per norm layer, fresh running statistics (used by batch norm, carried by all)."""
  return {f"norm{i}": nj.init_batch_stats(c) for i, c in enumerate(_common.CNN_FEATURES)}


def forward(params: Params, state: Params, x: jax.Array, norms: Sequence[Callable[..., Any]],
            which: jax.Array, train: bool) -> tuple[jax.Array, Params]:
  """Logits `[N, 10]` and the new state; `norms[which]` is the normalization applied."""
  h, new_state = x, {}
  for i, stride in enumerate(_common.CNN_STRIDES):
    h = _common.conv(h, params[f"conv{i}"]["kernel"], params[f"conv{i}"]["bias"], stride)
    branches = [functools.partial(norm, train=train) for norm in norms]
    h, new_state[f"norm{i}"] = jax.lax.switch(which, branches, params[f"norm{i}"],
                                              state[f"norm{i}"], h)
    h = jax.nn.relu(h)
  return _common.head(h, params["head"]), new_state


# ---------------------------------------------------------------------------------------------
# One jitted program per batch size: any variant (an argument), all seeds, all steps.

class RunConfig(NamedTuple):
  batch_size: int
  num_chunks: int          # evaluation points along training (the training curves)
  steps_per_chunk: int
  peak_lr: float


def make_train_fn(variants: Sequence[Variant], cfg: RunConfig) -> Callable[..., Any]:
  """`train(which, params [S], order [S, E], x_train, y_train, x_test, y_test) -> metrics [S]`.

  `which` indexes `variants`; the seeds (initial `params` and example `order`, from
  `init_runs`) are vmapped, the steps scanned.
  """
  num_steps = cfg.num_chunks * cfg.steps_per_chunk
  optimizer = _common.make_optimizer(cfg.peak_lr, num_steps)
  norms = [v.apply for v in variants]
  recal = [v.recalibrate or v.apply for v in variants]

  def loss_fn(params, state, which, x, y):
    logits, new_state = forward(params, state, x, norms, which, train=True)
    loss, acc = _common.cross_entropy(logits, y)
    return loss, (new_state, acc)

  def evaluate(params, state, which, x, y):
    # train=False: batch norm uses the running statistics in `state`.
    logits, _ = forward(params, state, x, norms, which, train=False)
    return _common.cross_entropy(logits, y)

  def run(which, params, order, x_train, y_train, x_test, y_test):
    state = init_state()
    opt_state = optimizer.init(params)
    order = order.reshape(cfg.num_chunks, cfg.steps_per_chunk, cfg.batch_size)

    def step(carry, idx):
      params, state, opt_state = carry
      (loss, (state, acc)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
          params, state, which, x_train[idx], y_train[idx])
      updates, opt_state = optimizer.update(grads, opt_state, params)
      params = jax.tree.map(lambda p, u: p + u, params, updates)
      return (params, state, opt_state), (loss, acc)

    def chunk(carry, idx):
      carry, (losses, accs) = jax.lax.scan(step, carry, idx)
      params, state, _ = carry
      test_loss, test_acc = evaluate(params, state, which, x_test, y_test)
      return carry, {"train_loss": losses.mean(), "train_acc": accs.mean(),
                     "test_loss": test_loss, "test_acc": test_acc}

    (params, state, _), curves = jax.lax.scan(chunk, (params, state, opt_state), order)
    # Population ("precise") statistics: one train-mode pass over the whole training set with
    # momentum 0 stores each layer's mean/var (given the layers below) as the running stats.
    # For variants without running statistics this is the same evaluation again.
    _, pop_state = forward(params, state, x_train, recal, which, train=True)
    pop_acc = evaluate(params, pop_state, which, x_test, y_test)[1]
    return {"curves": curves, "test_acc": curves["test_acc"][-1], "test_acc_pop_stats": pop_acc}

  return jax.jit(jax.vmap(run, in_axes=(None, 0, 0, None, None, None, None)))


def init_runs(seeds: Sequence[int], num_train: int, num_examples: int) -> tuple[Params, Any]:
  """Per seed, stacked: initial weights, and the order of the `num_examples` examples seen.

  The order does not depend on the batch size: every batch size sees the same examples in the
  same order, and every variant starts from the same weights for a given seed.
  """
  runs = []
  for seed in seeds:
    rng = np.random.default_rng(seed)
    params = init_params(_common.init_cnn_weights(rng))
    runs.append((params, _common.example_order(rng, num_train, num_examples)))
  return jax.tree.map(lambda *a: jnp.asarray(np.stack(a)), *runs)


def run_sweep(variants: Sequence[Variant], batch_sizes: Sequence[int], seeds: Sequence[int],
              examples: int, num_chunks: int, base_lr: float, data: _common.Digits,
              progress: bool = True) -> list[dict[str, Any]]:
  """Trains every (variant, batch size) for every seed; returns one record per pair."""
  from tqdm.auto import tqdm

  arrays = tuple(jnp.asarray(a) for a in data)
  params, order = init_runs(seeds, len(data.y_train), examples)
  records = []
  bar = tqdm(total=len(variants) * len(batch_sizes), desc="training", unit="run",
             disable=not progress, dynamic_ncols=True)
  for batch_size in batch_sizes:
    steps = examples // (num_chunks * batch_size)
    cfg = RunConfig(batch_size, num_chunks, steps, _common.linear_scaled_lr(base_lr, batch_size))
    bar.set_postfix_str(f"compiling B={batch_size}")
    t0 = time.perf_counter()
    which = jnp.zeros((), jnp.int32)
    compiled = make_train_fn(variants, cfg).lower(which, params, order, *arrays).compile()
    compile_s = time.perf_counter() - t0
    for i, variant in enumerate(variants):
      bar.set_postfix_str(f"{variant.name} B={batch_size}")
      t0 = time.perf_counter()
      out = jax.block_until_ready(compiled(jnp.asarray(i, jnp.int32), params, order, *arrays))
      train_s = time.perf_counter() - t0
      out = jax.tree.map(np.asarray, out)
      acc = out["test_acc"]
      rec = {"variant": variant.name, "batch_size": batch_size, "steps": steps * num_chunks,
             "peak_lr": cfg.peak_lr, "seeds": list(seeds),
             "test_acc": acc.tolist(), "test_acc_mean": float(acc.mean()),
             "test_acc_std": float(acc.std()), "train_s": train_s,
             "compile_s_shared": compile_s,
             "curves": {k: v.mean(axis=0).tolist() for k, v in out["curves"].items()},
             "curve_examples": [examples * (c + 1) // num_chunks for c in range(num_chunks)]}
      if variant.recalibrate is not None:
        pop = out["test_acc_pop_stats"]
        rec.update(test_acc_pop_stats=pop.tolist(), test_acc_pop_stats_mean=float(pop.mean()),
                   test_acc_pop_stats_std=float(pop.std()))
      records.append(rec)
      bar.update()
  bar.close()
  return records


# ---------------------------------------------------------------------------------------------
# Reporting: table, findings, JSON, plots.

def _cell(mean: float, std: float) -> str:
  return f"{100 * mean:.1f} ± {100 * std:.1f}"


def table_rows(records: list[dict[str, Any]], variants: Sequence[str],
               batch_sizes: Sequence[int]) -> list[tuple[str, list[str], str]]:
  """(row name, cells per batch size, time) for the markdown/console table."""
  by = {(r["variant"], r["batch_size"]): r for r in records}
  rows = []
  for name in variants:
    recs = [by[(name, b)] for b in batch_sizes]
    cells = [_cell(r["test_acc_mean"], r["test_acc_std"]) for r in recs]
    secs = sum(r["train_s"] for r in recs)
    rows.append((name, cells, f"{secs:.0f} s"))
    if "test_acc_pop_stats_mean" in recs[0]:
      cells = [_cell(r["test_acc_pop_stats_mean"], r["test_acc_pop_stats_std"]) for r in recs]
      rows.append((f"{name} (pop. stats)*", cells, "(same runs)"))
  return rows


def findings(records: list[dict[str, Any]], variants: Sequence[str],
             batch_sizes: Sequence[int]) -> list[str]:
  """Plain statements computed from the numbers: how much each variant loses at small batch."""
  by = {(r["variant"], r["batch_size"]): r for r in records}
  small, large = min(batch_sizes), max(batch_sizes)
  lines = []
  for name in variants:
    means = [by[(name, b)]["test_acc_mean"] for b in batch_sizes]
    best = int(np.argmax(means))
    a_small, a_large = by[(name, small)], by[(name, large)]
    delta = a_small["test_acc_mean"] - a_large["test_acc_mean"]
    noise = math.hypot(a_small["test_acc_std"], a_large["test_acc_std"])
    lines.append(f"- **{name}**: {100 * a_small['test_acc_mean']:.1f}% at B={small} vs "
                 f"{100 * a_large['test_acc_mean']:.1f}% at B={large} "
                 f"(change {100 * delta:+.1f} points; seed spread ±{100 * noise:.1f}); "
                 f"best at B={batch_sizes[best]} ({100 * means[best]:.1f}%).")
  if "batch" in variants:
    r = by[("batch", small)]
    if "test_acc_pop_stats_mean" in r:
      lines.append(f"- **batch, B={small}, population statistics**: "
                   f"{100 * r['test_acc_pop_stats_mean']:.1f}% (vs "
                   f"{100 * r['test_acc_mean']:.1f}% with the running statistics).")
  return lines


def write_markdown(path: str, records, variants, batch_sizes, config, wall_s) -> str:
  rows = table_rows(records, variants, batch_sizes)
  head = "| variant | " + " | ".join(f"B={b}" for b in batch_sizes) + " | train time |"
  sep = "|---|" + "---:|" * len(batch_sizes) + "---:|"
  lines = [
      "# Normalization variants on digits: test accuracy (%) vs batch size",
      "",
      f"Mean ± std over {len(config['seeds'])} seeds ({', '.join(map(str, config['seeds']))}); "
      f"{config['examples']} training examples seen per run "
      f"(≈{config['examples'] / config['n_train']:.1f} epochs of {config['n_train']}); "
      f"test set {config['n_test']} images.",
      "",
      head, sep,
      *[f"| {name} | " + " | ".join(cells) + f" | {t} |" for name, cells, t in rows],
      "",
      "\\* Batch norm evaluated with population statistics recomputed after training (one "
      "train-mode pass over the training set, momentum 0), instead of the running averages: a "
      "diagnostic, not a separate training run.",
      "",
      "## What the numbers say",
      "",
      *findings(records, variants, batch_sizes),
      "",
      "## Setup",
      "",
      f"- Model: {config['model']}",
      f"- Optimizer: {config['optimizer']}",
      f"- Learning rate: {config['lr_rule']}",
      f"- Batch norm: {config['bn']}",
      *[f"- `{name}`: {desc}" for name, desc in config["variant_descriptions"].items()],
      f"- Data: {config['data']}",
      f"- Train time: summed over the batch sizes, all seeds at once (vmapped), without "
      f"compilation; compiling took {config['compile_s']:.0f} s in all (one program per batch "
      f"size, shared by the variants).",
      f"- Wall time: {wall_s:.0f} s in all; machine: {config['machine']['cpu_count']} CPUs "
      f"({config['machine']['platform']}), jax {config['machine']['jax']} on "
      f"{config['machine']['backend']}.",
      f"- Command: `{config['command']}`",
      "",
  ]
  text = "\n".join(lines)
  with open(path, "w") as f:
    f.write(text)
  return text


def print_table(records, variants, batch_sizes) -> None:
  rows = table_rows(records, variants, batch_sizes)
  names = ["variant"] + [r[0] for r in rows]
  w0 = max(map(len, names))
  cols = [f"B={b}" for b in batch_sizes]
  widths = [max(len(c), *(len(r[1][i]) for r in rows)) for i, c in enumerate(cols)]
  print("test accuracy (%), mean ± std over seeds")
  print(f"{'variant':<{w0}}  " + "  ".join(f"{c:>{w}}" for c, w in zip(cols, widths))
        + "  train time")
  for name, cells, t in rows:
    print(f"{name:<{w0}}  " + "  ".join(f"{c:>{w}}" for c, w in zip(cells, widths)) + f"  {t}")


def plot(out_dir: str, records, variants, batch_sizes) -> list[str]:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import matplotlib.ticker

  by = {(r["variant"], r["batch_size"]): r for r in records}
  colors = dict(zip(variants, plt.get_cmap("tab10").colors))
  paths = []

  fig, ax = plt.subplots(figsize=(6.4, 4.2))
  for name in variants:
    m = np.array([100 * (1 - by[(name, b)]["test_acc_mean"]) for b in batch_sizes])
    s = np.array([100 * by[(name, b)]["test_acc_std"] for b in batch_sizes])
    ax.errorbar(batch_sizes, m, yerr=s, marker="o", ms=4, capsize=3, label=name,
                color=colors[name])
    if "test_acc_pop_stats_mean" in by[(name, batch_sizes[0])]:
      m = [100 * (1 - by[(name, b)]["test_acc_pop_stats_mean"]) for b in batch_sizes]
      ax.plot(batch_sizes, m, ls=":", marker="x", ms=4, color=colors[name],
              label=f"{name} (pop. stats)")
  ax.set_xscale("log", base=2)
  ax.set_xticks(batch_sizes, [str(b) for b in batch_sizes])
  ax.set_yscale("log")
  ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
  ax.set_xlabel("batch size (images per batch)")
  ax.set_ylabel("test error (%, log scale)")
  ax.set_title("Digits CNN: test error vs batch size (mean ± std over seeds)", fontsize=10)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8, ncol=2)
  fig.tight_layout()
  paths.append(os.path.join(out_dir, "accuracy_vs_batch_size.png"))
  fig.savefig(paths[-1], dpi=100)
  plt.close(fig)

  shown = sorted({min(batch_sizes), max(batch_sizes)})
  fig, axes = plt.subplots(2, len(shown), figsize=(5.2 * len(shown), 6.4), squeeze=False)
  for j, b in enumerate(shown):
    for name in variants:
      r = by[(name, b)]
      xs = np.array(r["curve_examples"]) / 1000
      axes[0, j].plot(xs, r["curves"]["train_loss"], label=name, color=colors[name])
      axes[1, j].plot(xs, 100 * (1 - np.array(r["curves"]["test_acc"])), label=name,
                      color=colors[name])
    axes[0, j].set_title(f"batch size {b}", fontsize=10)
    axes[0, j].set_yscale("log")
    axes[0, j].set_ylabel("training loss (train mode)")
    axes[1, j].set_yscale("log")
    axes[1, j].yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    axes[1, j].set_ylabel("test error (%, eval mode, log scale)")
    axes[1, j].set_xlabel("training examples seen (thousands)")
    for a in axes[:, j]:
      a.grid(alpha=0.3)
  axes[0, 0].legend(fontsize=8, ncol=2)
  fig.suptitle("Training curves (mean over seeds)", fontsize=11)
  fig.tight_layout()
  paths.append(os.path.join(out_dir, "training_curves.png"))
  fig.savefig(paths[-1], dpi=90)
  plt.close(fig)
  return paths


# ---------------------------------------------------------------------------------------------

FULL = dict(batch_sizes=(1, 2, 4, 8, 16, 32, 64), seeds=(0, 1, 2), examples=16000,
            num_chunks=20)
QUICK = dict(batch_sizes=(1, 32), seeds=(0, 1), examples=4000, num_chunks=8)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--quick", action="store_true",
                 help=f"reduced sweep over every variant: {QUICK}")
  p.add_argument("--out", default="results", help="output directory")
  p.add_argument("--batch-sizes", type=int, nargs="+", help=f"default {FULL['batch_sizes']}")
  p.add_argument("--seeds", type=int, nargs="+", help=f"default {FULL['seeds']}")
  p.add_argument("--examples", type=int,
                 help=f"training examples seen per run (rounded up so that every batch size "
                 f"divides it evenly); default {FULL['examples']}")
  p.add_argument("--num-chunks", type=int, help="evaluation points along each training run")
  p.add_argument("--variants", nargs="+", help="subset of variants (default: all)")
  p.add_argument("--base-lr", type=float, default=0.1,
                 help="peak SGD learning rate at batch size 32; scaled linearly with B")
  p.add_argument("--bn-momentum", type=float, default=0.9,
                 help="batch-norm running-average momentum (flax convention)")
  p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
  args = p.parse_args(argv)
  preset = QUICK if args.quick else FULL
  for k, v in preset.items():
    if getattr(args, k, None) is None:
      setattr(args, k, v)
  return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  args = parse_args(argv)
  t_start = time.perf_counter()
  available = all_variants(args.bn_momentum)
  names = list(args.variants or available)
  unknown = [n for n in names if n not in available]
  if unknown:
    raise SystemExit(f"unknown variant(s) {unknown}; choose from {list(available)}")
  batch_sizes = sorted(args.batch_sizes)
  step = math.lcm(*batch_sizes) * args.num_chunks
  examples = -(-args.examples // step) * step

  data = _common.load_digits()
  n_train, n_test = len(data.y_train), len(data.y_test)
  print(f"digits: {n_train} train / {n_test} test images; {len(names)} variants x "
        f"{len(batch_sizes)} batch sizes x {len(args.seeds)} seeds; {examples} examples per run")
  records = run_sweep([available[n] for n in names], batch_sizes, args.seeds, examples,
                      args.num_chunks, args.base_lr, data, progress=not args.no_progress)
  wall_s = time.perf_counter() - t_start

  command = "python examples/compare_variants.py " + " ".join(
      sys.argv[1:] if argv is None else list(argv))
  config = {
      "command": command.strip(), "quick": args.quick, "batch_sizes": batch_sizes,
      "seeds": list(args.seeds), "examples": examples, "num_chunks": args.num_chunks,
      "n_train": n_train, "n_test": n_test,
      "data": "sklearn.datasets.load_digits, stratified train_test_split(test_size=0.25, "
              "random_state=0), standardized with the training mean/std",
      "model": " - ".join(f"conv3x3{'/2' if s == 2 else ''}({c}) - norm - relu" for c, s in
                          zip(_common.CNN_FEATURES, _common.CNN_STRIDES))
               + " - global average pool - dense(10); He-normal init",
      "optimizer": "optax.sgd, momentum 0.9, no weight decay; cross-entropy loss",
      "lr_rule": f"linear scaling rule, peak lr = {args.base_lr} * B / 32; linear warmup over "
                 "the first 5% of steps, cosine decay to 0 at the end; identical as a function "
                 "of examples seen for every batch size",
      "bn": f"momentum {args.bn_momentum} (new = m * old + (1 - m) * batch), eps 1e-5, "
            "evaluated with the running statistics",
      "variant_descriptions": {n: available[n].description for n in names},
      "machine": _common.machine_info(), "wall_s": wall_s,
      "compile_s": sum({r["batch_size"]: r["compile_s_shared"] for r in records}.values()),
  }
  os.makedirs(args.out, exist_ok=True)
  print()
  print_table(records, names, batch_sizes)
  print()
  print("\n".join(findings(records, names, batch_sizes)))
  md = write_markdown(os.path.join(args.out, "results.md"), records, names, batch_sizes, config,
                      wall_s)
  with open(os.path.join(args.out, "results.json"), "w") as f:
    json.dump({"config": config, "results": records}, f, indent=1)
  pngs = plot(args.out, records, names, batch_sizes)
  print(f"\nwrote {os.path.join(args.out, 'results.md')}, results.json, "
        f"{', '.join(os.path.basename(p) for p in pngs)}; wall time {wall_s:.0f} s")
  return {"config": config, "results": records, "markdown": md, "plots": pngs}


if __name__ == "__main__":
  main()
