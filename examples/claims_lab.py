"""The claims lab: which normalization, and when? Nine claims from the literature, tested.

Each experiment is a small, fair, seeded sweep on scikit-learn's bundled 8x8 digits (1,797
real images, no download; a fixed stratified 1,347 / 450 split), training the plain CNN (or,
for claim 7, the row-by-row RNN) of `claims_model.py` once per normalization. Within an
experiment every run sees the same examples in the same order (per seed), starts from the same
weights (per seed), and follows the same schedule (SGD + momentum 0.9, linear warmup over 5 %
then cosine decay to 0; the peak learning rate scaled linearly with the batch size, lr * B / 32).
Batch-statistics variants are evaluated with their running statistics (momentum 0.9), as
deployed. Verdicts come from the numbers by the rule in `_claims_report.RULE`.

Run (from the repository root):

  python examples/claims_lab.py --quick      # every experiment, reduced: 104 s measured
  python examples/claims_lab.py              # the full run: 371 s measured (500 s busier)
  python examples/claims_lab.py --only depth # one experiment

Writes `claims.md` (the claims table, then one section per experiment), `results.json` and a
plot per experiment into `--out` (default `results/`).
"""

from __future__ import annotations

import argparse
import functools
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
import _claims_report as report  # noqa: E402
import _common  # noqa: E402
import claims_model as cm  # noqa: E402
from _claims_report import Comparison, Table  # noqa: E402

# Peak learning rate at batch size 32, unless an experiment sweeps it: the best of the
# `learning_rate` sweep for the unnormalized net, so that no baseline is handicapped by a
# learning rate only normalization can take (batch norm is best at 0.1 there).
BASE_LR = 0.03


class Settings(NamedTuple):
  seeds: tuple[int, ...]
  examples: int        # training examples seen per run (rounded to fit every batch size)
  chunks: int          # evaluation points along training
  quick: bool


# ---------------------------------------------------------------------------------------------
# Training many runs: every variant, every sweep point x seed (vmapped) of one Config.

@functools.lru_cache(maxsize=None)
def _train_fn(program: tuple[str, ...], cfg: cm.Config):
  return cm.make_train(program, cfg)


_RESULTS: dict[tuple, dict[str, np.ndarray]] = {}   # shared runs are trained once per process


class Column(NamedTuple):
  """One setting of a sweep: the Config, a point (`lr`: peak lr at B = 32, `drop`: dropout
  rate, `init_scale`), and the task's data (None: the digits)."""
  cfg: cm.Config
  point: tuple[tuple[str, float], ...] = ()
  data: _common.Digits | None = None
  task: str = "digits"


def sweep(names: Sequence[str], columns: dict[Any, Column], data: _common.Digits, s: Settings,
          desc: str, program: Sequence[str] | None = None) -> dict[tuple[str, Any], dict]:
  """`train` for every column; returns per (variant, column key) the seeds' results."""
  res = {}
  with _bar(len(names) * len(columns), desc) as bar:
    for key, col in columns.items():
      out = train(names, col.cfg, col.data or data, s, dict(col.point), bar, col.task, program)
      res.update({(n, key): r for n, r in out.items()})
  return res


def rows_of(res, names: Sequence[str], keys: Sequence[Any], metric: str = "test_acc"):
  """{variant: [(mean, std) over seeds of `metric`, per column key]}."""
  return {n: [ms(res[(n, k)][metric]) for k in keys] for n in names}


def train(names: Sequence[str], cfg: cm.Config, data: _common.Digits, s: Settings,
          point: dict[str, float], bar=None, task: str = "digits",
          program: Sequence[str] | None = None) -> dict[str, dict]:
  """Trains each variant, all seeds at once (vmapped); returns per variant the seeds' final
  test/train accuracies (`[seeds]`) and test-accuracy curves (`[seeds, chunks]`).

  The compiled
  program holds every variant of `program` (default: all CNN variants, or the RNN's), so that
  experiments sharing a Config share one compilation, and identical runs are trained once.
  """
  program = tuple(program or (cm.RNN_VARIANTS if cfg.model == "rnn" else CNN_MAIN))
  fn = _train_fn(program, cfg)
  examples = cfg.batch_size * cfg.steps_per_chunk * cfg.num_chunks
  stack = lambda trees: jax.tree.map(lambda *a: jnp.asarray(np.stack(a)), *trees)
  # The example order depends on the seed only: the same for every batch size and variant.
  order = stack([_common.example_order(np.random.default_rng([seed, 1]), len(data.y_train),
                                       examples) for seed in s.seeds])
  arrays = tuple(jnp.asarray(a) for a in data)
  out = {}
  for name in names:
    if bar is not None:
      bar.set_postfix_str(f"{name} B={cfg.batch_size} depth={cfg.depth}")
    key = (name, program, cfg, tuple(sorted(point.items())), s.seeds, task)
    if key not in _RESULTS:
      params = stack([cm.init_params(np.random.default_rng(seed), cfg,
                                     point.get("init_scale", 1.0)) for seed in s.seeds])
      lr = _common.linear_scaled_lr(point.get("lr", BASE_LR), cfg.batch_size)
      per_run = lambda v: jnp.full((len(s.seeds),), v, jnp.float32)
      res = jax.device_get(fn(jnp.asarray(program.index(name), jnp.int32), params, order,
                              per_run(lr), per_run(point.get("drop", 0.0)), arrays))
      _RESULTS[key] = {"test_acc": res["test_acc"], "train_acc": res["train_acc"],
                       "curve": res["curves"]["test_acc"]}
    out[name] = _RESULTS[key]
    if bar is not None:
      bar.update()
  return out


def config(s: Settings, batch_size: int = 32, **kw) -> cm.Config:
  """A Config that sees `s.examples` examples (rounded up to a multiple of 32 * chunks)."""
  per_chunk = -(-s.examples // (32 * s.chunks)) * 32
  return cm.Config(batch_size=batch_size, steps_per_chunk=per_chunk // batch_size,
                   num_chunks=s.chunks, **kw)


def ms(values) -> tuple[float, float]:
  v = np.asarray(values, np.float64)
  return float(v.mean()), float(v.std())


def _bar(total: int, desc: str):
  from tqdm.auto import tqdm
  return tqdm(total=total, desc=desc, unit="variant", dynamic_ncols=True,
              disable=os.environ.get("CLAIMS_NO_PROGRESS") == "1")


# ---------------------------------------------------------------------------------------------
# The experiments. Each returns a dict: result (for the claims table), tables, comparisons.

CNN_MAIN = ("none", "batch", "batch_renorm", "ghost_batch", "layer", "instance", "group", "rms",
            "frn", "group_ws")


def convergence(data, s: Settings, out: str) -> dict[str, Any]:
  """Claim 1: test accuracy along training at one shared learning rate; examples to 90 %."""
  names = CNN_MAIN
  cfg = config(s)
  res = sweep(names, {0: Column(cfg)}, data, s, "convergence")
  target = 0.9
  per_chunk = cfg.batch_size * cfg.steps_per_chunk
  examples = [per_chunk * (c + 1) for c in range(cfg.num_chunks)]

  def to_target(curve):   # examples until test accuracy first >= target; censored: one past end
    hit = np.nonzero(curve >= target)[0]
    return examples[hit[0]] if len(hit) else examples[-1] + per_chunk

  steps = {n: ms([to_target(c) for c in res[(n, 0)]["curve"]]) for n in names}
  half = cfg.num_chunks // 4
  early = {n: ms(res[(n, 0)]["curve"][:, half - 1]) for n in names}
  plot = "convergence_curves.png"
  report.plot_curves(os.path.join(out, plot), f"Depth-{cfg.depth} CNN, lr {BASE_LR}, B=32 "
                     "(mean over seeds)", examples,
                     {n: res[(n, 0)]["curve"].mean(0) for n in names}, target)
  rows = {n: [early[n], ms(res[(n, 0)]["test_acc"])] for n in names}
  table = Table("Test accuracy early and at the end of training", "examples seen",
                [examples[half - 1], examples[-1]], rows)
  comps = [Comparison("examples to 90 % test accuracy, none minus batch (thousands)",
                      steps["none"][0] / 1000, steps["none"][1] / 1000,
                      steps["batch"][0] / 1000, steps["batch"][1] / 1000,
                      min_effect=per_chunk / 1000)]
  def show(n):
    m, sd = steps[n]
    return f"{m:.0f} ± {sd:.0f}" if m <= examples[-1] else f"> {examples[-1]} (not every seed)"
  lines = [f"| {n} | {show(n)} |" for n in names]
  return dict(
      result=f"examples to reach 90 % test accuracy (of {examples[-1]}): batch {show('batch')}, "
             f"none {show('none')}",
      tables=[table], units="thousands", extra_plots=[plot],
      extra_md=["Examples seen until the test accuracy first reaches 90 % (a run that never "
                f"does counts as {examples[-1] + per_chunk}):", "", "| variant | examples |",
                "|---|---:|", *lines],
      comparisons=comps,
      setup=f"Every variant at the same peak lr {BASE_LR} (the best for 'none' in the "
            f"`learning_rate` sweep), batch size 32, "
            f"{examples[-1]} examples (~{examples[-1] / len(data.y_train):.1f} epochs), depth "
            f"{cfg.depth}; test accuracy measured {cfg.num_chunks} times along training.")


def learning_rate(data, s: Settings, out: str) -> dict[str, Any]:
  """Claim 2: final test accuracy vs peak learning rate."""
  names = ("none", "batch", "layer", "group", "group_ws", "frn")
  lrs = (0.01, 0.1, 1.0) if s.quick else (0.01, 0.03, 0.1, 0.3, 1.0)   # includes BASE_LR
  cfg = config(s)
  res = sweep(names, {lr: Column(cfg, (("lr", lr),)) for lr in lrs}, data, s, "learning_rate")
  rows = rows_of(res, names, lrs)
  top = len(lrs) - 1

  def usable(n):   # largest lr within 5 points of the variant's best mean accuracy
    means = [m for m, _ in rows[n]]
    return max(lr for lr, m in zip(lrs, means) if m >= max(means) - 0.05)

  comps = [Comparison(f"accuracy at the highest lr {lrs[top]}, batch minus none",
                      *rows["batch"][top], *rows["none"][top]),
           Comparison("largest usable lr (within 5 points of own best), log10 batch minus none",
                      math.log10(usable("batch")), 0.0, math.log10(usable("none")), 0.0,
                      min_effect=0.4)]
  return dict(
      result=f"at lr {lrs[top]}: batch {report.pct(*rows['batch'][top])}, none "
             f"{report.pct(*rows['none'][top])}; largest usable lr batch {usable('batch')}, "
             f"none {usable('none')}",
      tables=[Table("Final test accuracy vs peak learning rate", "lr", list(lrs), rows,
                    log_x=True, plot="accuracy_vs_lr.png")],
      comparisons=comps, units=["pct", "log"],
      setup=f"Peak lr (at B=32, warmup + cosine) swept over {lrs}; depth {cfg.depth}, batch size "
            f"32, {cfg.batch_size * cfg.steps_per_chunk * cfg.num_chunks} examples. The "
            "'usable' lr is the largest whose mean accuracy is within 5 points of the "
            "variant's best.")


def init_scale(data, s: Settings, out: str) -> dict[str, Any]:
  """Claim 3: final test accuracy vs a factor on every initial conv kernel (He init = 1)."""
  names = ("none", "batch", "layer", "group")
  scales = (0.5, 1.0, 2.0) if s.quick else (0.25, 0.5, 1.0, 2.0, 4.0)
  cfg = config(s)
  res = sweep(names, {g: Column(cfg, (("init_scale", g),)) for g in scales}, data, s,
              "init_scale")
  rows = rows_of(res, names, scales)
  worst = {n: min(rows[n]) for n in names}
  comps = [Comparison(f"worst accuracy over init scales, {n} minus none", *worst[n], *worst["none"])
           for n in ("batch",)]
  spread = {n: max(m for m, _ in rows[n]) - worst[n][0] for n in names}
  return dict(
      result=f"worst over scales {scales[0]}-{scales[-1]}: batch {report.pct(*worst['batch'])}, "
             f"none {report.pct(*worst['none'])} (spread {100 * spread['batch']:.1f} vs "
             f"{100 * spread['none']:.1f} points)",
      tables=[Table("Final test accuracy vs init scale", "init scale", list(scales), rows,
                    log_x=True, plot="accuracy_vs_init_scale.png")],
      comparisons=comps,
      setup=f"Every conv kernel (stem and {cfg.depth} blocks) drawn He-normal and multiplied by "
            f"the init scale {scales}; lr {BASE_LR}, batch size 32.")


def regularization(data, s: Settings, out: str) -> dict[str, Any]:
  """Claim 4: train-test gap (eval mode) with and without dropout."""
  names = ("none", "batch", "group")
  drops = (0.0, 0.1)
  cfg = config(s._replace(examples=2 * s.examples), depth=4, dropout=True)
  res = sweep(names, {d: Column(cfg, (("drop", d),)) for d in drops}, data, s, "regularization")
  gap = {n: [ms(res[(n, d)]["train_acc"] - res[(n, d)]["test_acc"]) for d in drops]
         for n in names}
  test, train_acc = rows_of(res, names, drops), rows_of(res, names, drops, "train_acc")
  # Dropout's benefit to test accuracy, per variant: (mean, std) of a difference of means.
  benefit = {n: (test[n][1][0] - test[n][0][0], math.hypot(test[n][1][1], test[n][0][1]))
             for n in names}
  comps = [Comparison("train-test gap without dropout, none minus batch",
                      *gap["none"][0], *gap["batch"][0]),
           Comparison("dropout's test-accuracy gain, none minus batch",
                      *benefit["none"], *benefit["batch"])]
  return dict(
      result=f"gap without dropout: batch {report.pct(*gap['batch'][0])}, none "
             f"{report.pct(*gap['none'][0])} points; dropout 0.1 changes test acc. by "
             f"{100 * benefit['batch'][0]:+.1f} (batch), {100 * benefit['none'][0]:+.1f} (none)",
      tables=[Table("Train-test gap (eval mode)", "dropout", list(drops), gap,
                    y_label="train minus test accuracy (points)", plot="train_test_gap.png"),
              Table("Test accuracy", "dropout", list(drops), test),
              Table("Training-set accuracy (eval mode)", "dropout", list(drops), train_acc,
                    y_label="training-set accuracy (%)")],
      comparisons=comps,
      setup=f"Depth {cfg.depth} (so that every variant fits the training set), lr {BASE_LR}, "
            f"batch size 32, {cfg.batch_size * cfg.steps_per_chunk * cfg.num_chunks} examples "
            f"(~{cfg.batch_size * cfg.steps_per_chunk * cfg.num_chunks / len(data.y_train):.0f} "
            "epochs); dropout (rate 0 or 0.1) after every block in training. The gap is "
            "training-set minus test-set accuracy, both in eval mode after training.")


def batch_size(data, s: Settings, out: str) -> dict[str, Any]:
  """Claim 5: final test accuracy vs batch size (Wu & He, 2018, Fig. 1)."""
  names = ("none", "batch", "batch_renorm", "layer", "instance", "group", "rms", "frn",
           "group_ws")
  sizes = (2, 32) if s.quick else (1, 2, 8, 32)
  res = sweep(names, {b: Column(config(s, b)) for b in sizes}, data, s, "batch_size")
  rows = rows_of(res, names, sizes)
  lo, hi = 0, len(sizes) - 1
  comps = [Comparison(f"batch norm, B={sizes[hi]} minus B={sizes[lo]}", *rows["batch"][hi],
                      *rows["batch"][lo]),
           Comparison(f"B={sizes[lo]}, group minus batch", *rows["group"][lo], *rows["batch"][lo]),
           Comparison(f"B={sizes[lo]}, layer minus batch", *rows["layer"][lo], *rows["batch"][lo])]
  return dict(
      result=f"batch {report.pct(*rows['batch'][lo])} at B={sizes[lo]} vs "
             f"{report.pct(*rows['batch'][hi])} at B={sizes[hi]}; at B={sizes[lo]} group "
             f"{report.pct(*rows['group'][lo])}, layer {report.pct(*rows['layer'][lo])}",
      tables=[Table("Final test accuracy vs batch size", "B", list(sizes), rows, log_x=True,
                    plot="accuracy_vs_batch_size.png")],
      comparisons=comps,
      setup=f"Batch sizes {sizes}, the same {config(s).steps_per_chunk * 32 * s.chunks} "
            f"examples for each, peak lr {BASE_LR} * B / 32; depth {config(s).depth}.")


def depth(data, s: Settings, out: str) -> dict[str, Any]:
  """Claim 6: final test accuracy vs depth of the plain CNN."""
  names = ("none", "batch", "layer", "group", "group_ws")
  depths = (2, 8) if s.quick else (2, 4, 8, 16)
  res = sweep(names, {d: Column(config(s, depth=d)) for d in depths}, data, s, "depth")
  rows = rows_of(res, names, depths)
  deep = len(depths) - 1
  comps = [Comparison(f"none, depth {depths[0]} minus depth {depths[deep]}", *rows["none"][0],
                      *rows["none"][deep]),
           Comparison(f"depth {depths[deep]}, batch minus none", *rows["batch"][deep],
                      *rows["none"][deep]),
           Comparison(f"depth {depths[deep]}, group minus none", *rows["group"][deep],
                      *rows["none"][deep])]
  return dict(
      result=f"depth {depths[deep]}: none {report.pct(*rows['none'][deep])}, batch "
             f"{report.pct(*rows['batch'][deep])}, group {report.pct(*rows['group'][deep])}; "
             f"none at depth {depths[0]}: {report.pct(*rows['none'][0])}",
      tables=[Table("Final test accuracy vs depth (plain CNN)", "depth", list(depths), rows,
                    plot="accuracy_vs_depth.png")],
      comparisons=comps,
      setup=f"Depth (normalized conv blocks after the stem) {depths}; lr {BASE_LR}, batch size "
            "32; He init for every depth.")


def recurrent(data, s: Settings, out: str) -> dict[str, Any]:
  """Claim 7: a tanh RNN over the 8 rows; layer norm vs per-time-step batch norm vs none."""
  names = cm.RNN_VARIANTS
  sizes = (4, 32)
  res = sweep(names, {b: Column(config(s, b, model="rnn", width=64), (("lr", 0.1),))
                      for b in sizes}, data, s, "recurrent")
  rows = rows_of(res, names, sizes)
  comps = [Comparison(f"B={b}, layer minus batch (per time step)", *rows["layer"][j],
                      *rows["batch"][j]) for j, b in enumerate(sizes)]
  comps.append(Comparison("B=32, layer minus none", *rows["layer"][1], *rows["none"][1]))
  return dict(
      result=f"B=4: layer {report.pct(*rows['layer'][0])}, batch "
             f"{report.pct(*rows['batch'][0])}, none {report.pct(*rows['none'][0])}; B=32: "
             f"layer {report.pct(*rows['layer'][1])}, batch {report.pct(*rows['batch'][1])}, "
             f"none {report.pct(*rows['none'][1])}",
      tables=[Table("RNN on rows: final test accuracy", "B", list(sizes), rows,
                    plot="rnn_accuracy.png")],
      comparisons=comps,
      setup="Each image read as 8 time steps of 8 pixels by `h_t = tanh(norm(x_t W_x + h_{t-1} "
            "W_h + b))` with 64 hidden units, classified from the last state. Batch norm keeps "
            "separate running statistics per time step (Cooijmans et al., 2017); layer and RMS "
            "norm normalize each example's 64 pre-activations. Peak lr 0.1 * B / 32.")


def small_batch_fixes(data, s: Settings, out: str) -> dict[str, Any]:
  """Claim 8: batch renorm and ghost batch norm vs batch norm with few examples per statistic."""
  ks = (2,) if s.quick else (2, 8)
  small = sweep(("batch", "batch_renorm"), {k: Column(config(s, k)) for k in ks}, data, s,
                "small_batch_fixes")
  ghost = {}
  for k in ks:   # a program of its own unless k is the default group size
    cfg = config(s, ghost_size=k)
    ghost.update(sweep(("ghost_batch",), {k: Column(cfg)}, data, s, f"ghost_batch k={k}",
                       program=None if cfg == config(s) else ("ghost_batch",)))
  big = sweep(("batch",), {32: Column(config(s))}, data, s, "batch B=32")
  rows = {"batch (B=k)": [ms(small[("batch", k)]["test_acc"]) for k in ks],
          "batch_renorm (B=k)": [ms(small[("batch_renorm", k)]["test_acc"]) for k in ks],
          "ghost_batch (B=32, groups of k)": [ms(ghost[("ghost_batch", k)]["test_acc"])
                                              for k in ks],
          "batch (B=32)": [ms(big[("batch", 32)]["test_acc"])] * len(ks)}
  comps = [Comparison(f"k={ks[0]}, batch_renorm minus batch", *rows["batch_renorm (B=k)"][0],
                      *rows["batch (B=k)"][0]),
           Comparison(f"k={ks[0]}, ghost_batch minus batch",
                      *rows["ghost_batch (B=32, groups of k)"][0], *rows["batch (B=k)"][0])]
  r = rows
  return dict(
      result=f"k={ks[0]}: batch {report.pct(*r['batch (B=k)'][0])}, renorm "
             f"{report.pct(*r['batch_renorm (B=k)'][0])}, ghost "
             f"{report.pct(*r['ghost_batch (B=32, groups of k)'][0])} (batch at B=32: "
             f"{report.pct(*r['batch (B=32)'][0])})",
      tables=[Table("Statistics over k examples: final test accuracy", "k", list(ks), rows,
                    log_x=True, plot="small_batch_fixes.png")],
      comparisons=comps,
      setup="Batch norm and batch renorm (r_max 3, d_max 5, after 5 % of the steps) trained at "
            "batch size k; ghost batch norm at batch size 32 with statistics per group of k "
            "(the optimizer's batch stays large while the statistics are as small). Same "
            f"examples, lr {BASE_LR} * B / 32, depth {config(s).depth}.")


def contrast_task(data: _common.Digits) -> _common.Digits:
  """The same images, each shown at a contrast 0.5 or 2 (fixed random choice); label = which."""
  rng = np.random.default_rng(123)
  def make(x):
    hi = rng.integers(0, 2, len(x)).astype(np.int32)
    c = np.where(hi == 1, 2.0, 0.5).astype(np.float32)[:, None, None, None]
    return (c * x).astype(np.float32), hi
  xtr, ytr = make(data.x_train)
  xte, yte = make(data.x_test)
  return _common.Digits(xtr, ytr, xte, yte)


def instance_contrast(data, s: Settings, out: str) -> dict[str, Any]:
  """Claim 9: instance norm on digit classification, and on a task that needs the contrast."""
  names = ("none", "batch", "layer", "instance", "group", "frn")
  tasks = {"digits (10 classes)": data, "contrast (2 classes)": contrast_task(data)}
  columns = {t: Column(config(s), (), d, "digits" if d is data else t) for t, d in tasks.items()}
  rows = rows_of(sweep(names, columns, data, s, "instance_contrast"), names, tasks)
  others = [n for n in names if n not in ("instance", "none")]
  best = {j: max(others, key=lambda n: rows[n][j][0]) for j in range(2)}
  comps = [Comparison(f"contrast task, best other ({best[1]}) minus instance",
                      *rows[best[1]][1], *rows["instance"][1]),
           Comparison(f"digits, best other ({best[0]}) minus instance", *rows[best[0]][0],
                      *rows["instance"][0])]
  return dict(
      result=f"contrast task: instance {report.pct(*rows['instance'][1])} (chance 50), "
             f"{best[1]} {report.pct(*rows[best[1]][1])}; digits: instance "
             f"{report.pct(*rows['instance'][0])}, {best[0]} {report.pct(*rows[best[0]][0])}",
      tables=[Table("Final test accuracy per task", "task", list(tasks), rows,
                    plot="instance_contrast.png")],
      comparisons=comps,
      setup="Two tasks on the same images and network: the digits, and 'contrast': every image "
            "multiplied by 0.5 or 2 (a fixed random choice per image), the label being which. "
            "With the conv biases at their initial zeros, a per-example normalization after the "
            "(linear) stem and first conv divides this factor out exactly, so its gradient "
            f"never sees it. lr {BASE_LR}, batch size 32, depth {config(s).depth}.")


class Experiment(NamedTuple):
  claim: int
  text: str
  run: Callable[..., dict[str, Any]]
  discussion: str      # what the setup may do differently from the paper's


EXPERIMENTS: dict[str, Experiment] = {
    "convergence": Experiment(
        1, "Batch norm speeds up convergence", convergence,
        "How this differs from the paper: Ioffe & Szegedy (2015) report 14x fewer steps for an "
        "Inception net on ImageNet; here a plain CNN on 8x8 digits, every variant at one "
        "shared learning rate (the curves and the learning-rate sweep show the rest)."),
    "learning_rate": Experiment(
        2, "Batch norm allows much higher learning rates", learning_rate,
        "How this differs from the paper: plain SGD + momentum without gradient clipping or "
        "weight decay, a short warmup, and a grid spaced by about 3x; 'much higher' is read as "
        "at least one grid step (0.4 in log10)."),
    "init_scale": Experiment(
        3, "Batch norm makes training less sensitive to weight initialization", init_scale,
        "How this differs from the paper: batch norm is invariant to the scale of the weights "
        "before it, but a larger weight also lowers the effective learning rate, so within a "
        "fixed budget accuracy can still drift with the init scale."),
    "regularization": Experiment(
        4, "Batch norm regularizes (smaller train-test gap, less need for dropout)",
        regularization,
        "How this differs from the paper: the regularizing effect comes from the noise of "
        "batch statistics, which is small at B=32 with 16 channels of 4x4 positions; digits is "
        "small and easy, and a shallower net (depth 4) is used so that 'none' fits too."),
    "batch_size": Experiment(
        5, "Batch norm degrades at small batch sizes; group and layer norm do not", batch_size,
        "How this differs from the paper: Wu & He (2018) train ResNet-50 on ImageNet; here the "
        "statistics per channel at B=1 still cover 16 positions of one image, and a fixed "
        "number of examples with the linear scaling rule gives B=32 the fewest steps."),
    "depth": Experiment(
        6, "Deep plain networks train only with normalization", depth,
        "How this differs from the paper: He initialization already preserves a plain ReLU "
        "net's signal scale, and the training budget is short, so 'only' is read as: no "
        "normalization falls clearly behind as depth grows."),
    "recurrent": Experiment(
        7, "Layer norm suits recurrent networks, where batch statistics fit poorly", recurrent,
        "How this differs from the paper: Ba et al. (2016) use long sequences and LSTMs; 8 "
        "time steps of a small tanh RNN are short, so a plain RNN trains well too."),
    "small_batch_fixes": Experiment(
        8, "Batch renorm and ghost batch norm repair batch norm at small batches",
        small_batch_fixes,
        "How this differs from the paper: Ioffe (2017) shows renorm helping at micro-batches "
        "of 4 on ImageNet; ghost batch norm (Hoffer et al., 2017) was proposed for large "
        "batches, and here it is tested as the way to keep the statistics small while the "
        "optimizer's batch stays large."),
    "instance_contrast": Experiment(
        9, "Instance norm removes per-image contrast (style) information, which hurts "
        "classification", instance_contrast,
        "How this differs from the paper: style transfer (Ulyanov et al., 2016) wants this "
        "invariance; on digits the class does not depend on contrast, so the loss on digits "
        "likely comes from instance norm on 4x4 maps also removing each channel's mean and scale."),
}


def run_experiment(name: str, data: _common.Digits, s: Settings, out: str) -> dict[str, Any]:
  exp = EXPERIMENTS[name]
  t0 = time.perf_counter()
  r = exp.run(data, s, out)
  units = r.pop("units", "pct")
  units = units if isinstance(units, list) else [units] * len(r["comparisons"])
  comps = r["comparisons"]
  r.update(name=name, claim=exp.claim, claim_text=exp.text, discussion=exp.discussion,
           verdict=report.verdict(comps), wall_s=time.perf_counter() - t0,
           comparisons_text=[report.describe(c, u) for c, u in zip(comps, units)],
           comparisons=[c._asdict() | {"holds": c.holds} for c in comps])
  return r


FULL = Settings(seeds=(0, 1, 2), examples=4800, chunks=10, quick=False)
QUICK = Settings(seeds=(0, 1), examples=2000, chunks=6, quick=True)


def parse_args(argv):
  p = argparse.ArgumentParser(
      description="The claims lab: each claim about normalization tested on digits, with a "
                  "verdict. Measured on 2 CPU cores shared with other jobs: --quick 104 s, the "
                  "full run 371 s (500 s when busier).", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--quick", action="store_true", help="every experiment, reduced")
  p.add_argument("--only", choices=list(EXPERIMENTS), action="append",
                 help="run only this experiment (repeatable)")
  p.add_argument("--out", default="results", help="output directory")
  p.add_argument("--seeds", type=int, nargs="+", help="seeds (default 0 1 2; quick 0 1)")
  p.add_argument("--examples", type=int, help="training examples per run (default 4800; "
                 "quick 2000)")
  return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  args = parse_args(argv)
  s = QUICK if args.quick else FULL
  if args.seeds:
    s = s._replace(seeds=tuple(args.seeds))
  if args.examples:
    s = s._replace(examples=args.examples)
  t0 = time.perf_counter()
  os.makedirs(args.out, exist_ok=True)
  data = _common.load_digits()
  outcomes = [run_experiment(n, data, s, args.out) for n in (args.only or EXPERIMENTS)]
  wall = time.perf_counter() - t0
  command = "python examples/claims_lab.py " + " ".join(sys.argv[1:] if argv is None else argv)
  cfg = {"command": command.strip(), "seeds": list(s.seeds), "examples per run": s.examples,
         "evaluation points": s.chunks, "wall time (s)": round(wall),
         "model": "plain CNN: conv3x3/2 stem (1 -> 16 channels, 8x8 -> 4x4), then `depth` "
                  "blocks conv3x3 (16) - norm - ReLU, global average pool, dense(10); He init",
         "optimizer": "optax.sgd, momentum 0.9, no weight decay; peak lr * B / 32, linear "
                      "warmup 5 %, cosine decay to 0; cross-entropy",
         "batch norm": "momentum 0.9, eps 1e-5, evaluated with the running statistics; group "
                       "norm 4 groups; ghost batch norm groups of 8 unless stated",
         "data": "sklearn.datasets.load_digits, stratified split (1347 / 450, random_state 0), "
                 "standardized with the training mean/std",
         "machine": f"{os.cpu_count()} CPUs, jax {jax.__version__} on {jax.default_backend()}"}
  text = report.write_report(args.out, outcomes, cfg)
  print("\n".join(report.claims_table(text)))
  print(f"\nwrote {args.out}/claims.md, results.json and plots; wall time {wall:.0f} s")
  return {"outcomes": outcomes, "markdown": text, "wall_s": wall}


if __name__ == "__main__":
  main()
