"""The claims lab's second, harder task: which normalization for a plain 1-D CNN on MNIST-1D?

MNIST-1D (Greydanus & Kobak; `_mnist1d_data.py`, generated offline from its templates) is a
10-class task on length-40 signals where a small MLP reaches about 60-70 % and a CNN about 90-95 %:
unlike the 8x8 digits, it separates models. Split: the reference's 4,000 training examples cut
into 3,200 train / 800 validation, and its 1,000 test examples.

The model is a plain (non-residual) 1-D CNN: four blocks `conv(kernel 5) -> normalization ->
ReLU`, 32 channels, strides 2, 2, 1, 1 (output lengths 20, 10, 10, 10; receptive field 45, so
the last block sees the whole signal), global average pooling and a dense layer. The
normalization is a runtime choice (`lax.switch`), so one compiled program per batch size trains
every variant (and one more evaluates them); `jax.vmap` runs seeds x learning rates at once
and `lax.scan` the steps. Per seed, every arm and learning rate starts from the same weights
(drawn with NumPy) and sees the same training examples in the same order (paired). SGD +
momentum 0.9, linear warmup over 5 % then cosine decay to 0 (`_common.make_optimizer`); at
batch size B the peak learning rate is lr * B / 32. Batch norm (momentum 0.9) is evaluated with
its running statistics.

Arms: every variant at B = 32, and batch, group and layer norm at B = 2 (the same number of
examples, 16x the steps). Each arm's learning rate is the grid point with the best mean
validation accuracy over the seeds; the test set only gives the reported numbers.

  python examples/claims_mnist1d.py --quick          # 2 seeds, fewer examples
  python examples/claims_mnist1d.py --json out.json  # 5 seeds
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402
import _mnist1d_data  # noqa: E402
import normjax as nj  # noqa: E402

ARMS: tuple[str, ...] = ("none@32", "batch@32", "layer@32", "group@32", "rms@32",
                         "batch@2", "group@2", "layer@2")
LR_GRID: tuple[float, ...] = (0.01, 0.03, 0.1, 0.3)     # peak lr at B = 32
BASE_BATCH = 32
KERNEL = 5
BN_MOMENTUM = 0.9
NUM_GROUPS = 8                                          # group norm: 8 groups of 4 channels


class Settings(NamedTuple):
  """Everything static about one study."""
  examples: int                  # training examples seen per run (a multiple of 32 * chunks)
  chunks: int                    # validation evaluations along training (the curves)
  lr_grid: tuple[float, ...] = LR_GRID
  width: int = 32
  strides: tuple[int, ...] = (2, 2, 1, 1)
  arms: tuple[str, ...] = ARMS


# Measured on the shared 2-core machine, user + sys CPU time: FULL (5 seeds) 94 s, QUICK (2
# seeds) 25 s (wall 212 s and 73 s there, under a load average of 6-12 from other jobs).
FULL = Settings(examples=32 * 4 * 100, chunks=4)         # 12,800 examples = 4 epochs
QUICK = Settings(examples=32 * 4 * 25, chunks=4)         # 3,200 examples = 1 epoch


# ---------------------------------------------------------------------------------------------
# The normalizations on `[N, L, C]`: `f(p, stats, h, train) -> (h, stats)`.

def _c(v: jax.Array) -> jax.Array:
  return v.reshape(1, 1, -1)                            # [C] -> [1, 1, C]


def _none(p, s, h, train):
  return h, s


def _batch(p, s, h, train):
  return nj.batch_norm(h, p["scale"], p["shift"], s, train=train, momentum=BN_MOMENTUM)


def _layer(p, s, h, train):
  return nj.layer_norm(h, axis=(1, 2)) * _c(p["scale"]) + _c(p["shift"]), s


def _group(p, s, h, train):
  return nj.group_norm(h, p["scale"], p["shift"], num_groups=NUM_GROUPS), s


def _rms(p, s, h, train):
  return nj.rms_norm(h, axis=(1, 2)) * _c(p["scale"]), s


VARIANTS = {"none": _none, "batch": _batch, "layer": _layer, "group": _group, "rms": _rms}
NAMES = tuple(VARIANTS)


def parse_arm(arm: str) -> tuple[str, int]:
  name, batch = arm.split("@")
  if name not in VARIANTS:
    raise ValueError(f"unknown variant {name!r} in arm {arm!r}")
  return name, int(batch)


# ---------------------------------------------------------------------------------------------
# The model.

def init_params(rng: np.random.Generator, s: Settings) -> list[dict[str, np.ndarray]]:
  """He-normal conv kernels, LeCun-normal head, zero biases, unit scales (NumPy, per seed)."""
  params, c_in = [], 1
  for _ in s.strides:
    std = np.sqrt(2.0 / (KERNEL * c_in))
    kernel = std * rng.standard_normal((KERNEL, c_in, s.width))
    params.append({"kernel": kernel.astype(np.float32),
                   "bias": np.zeros((s.width,), np.float32),
                   "scale": np.ones((s.width,), np.float32),
                   "shift": np.zeros((s.width,), np.float32)})
    c_in = s.width
  params.append({"kernel": (rng.standard_normal((c_in, 10)) / np.sqrt(c_in)).astype(np.float32),
                 "bias": np.zeros((10,), np.float32)})
  return params


def conv1d(x: jax.Array, kernel: jax.Array, bias: jax.Array, stride: int) -> jax.Array:
  """`[N, L, Ci]` * `[K, Ci, Co]`, 'same' padding, stride: a sum of K shifted matmuls (plain
  batched matmuls under `jax.vmap` over runs with per-run kernels; a vmapped `lax.conv` with
  per-run kernels becomes a slow grouped convolution on CPU)."""
  length, k = x.shape[1], kernel.shape[0]
  out = -(-length // stride)
  xp = jnp.pad(x, ((0, 0), (k // 2, k // 2), (0, 0)))
  y = sum(xp[:, i:i + stride * (out - 1) + 1:stride] @ kernel[i] for i in range(k))
  return y + _c(bias)


def forward(params, state, x, which, strides: tuple[int, ...], train: bool):
  """Logits `[N, 10]` and the new running statistics (one `BatchStats` per block); `which`
  indexes `NAMES` (a traced int)."""
  branches = [functools.partial(VARIANTS[n], train=train) for n in NAMES]
  h, new_state = x, []
  for p, stats, stride in zip(params[:-1], state, strides):
    h = conv1d(h, p["kernel"], p["bias"], stride)
    h, stats = jax.lax.switch(which, branches, p, stats, h)
    h = jax.nn.relu(h)
    new_state.append(stats)
  head = params[-1]
  return h.mean(axis=1) @ head["kernel"] + head["bias"].reshape(1, -1), new_state


EVAL_CHUNK = 200   # examples per evaluation call (divides 800, 1,000 and 3,200)
EVAL_MICRO = 25    # ... computed 25 at a time: small activations stay in cache (3x faster)


@functools.lru_cache(maxsize=None)
def make_eval(strides: tuple[int, ...]):
  """`correct(which, params [R], state [R], x [EVAL_CHUNK, 40, 1], y) -> [R]` correct counts
  in eval mode, jitted; one program for every batch size, evaluation point and split."""
  def correct(which, params, state, x, y):
    def micro(xy):
      logits, _ = forward(params, state, xy[0], which, strides, False)
      return (jnp.argmax(logits, axis=-1) == xy[1]).astype(jnp.float32).sum()
    m = EVAL_CHUNK // EVAL_MICRO
    return jax.lax.map(micro, (x.reshape(m, EVAL_MICRO, *x.shape[1:]),
                               y.reshape(m, EVAL_MICRO))).sum()
  return jax.jit(jax.vmap(correct, in_axes=(None, 0, 0, None, None)))


def accuracy(which, params, state, x, y, s: Settings) -> np.ndarray:
  """Eval-mode accuracy `[R]` on all of `x`, `EVAL_CHUNK` examples a call."""
  fn, n = make_eval(s.strides), len(y)
  if n % EVAL_CHUNK:
    raise ValueError(f"{n} examples is not a multiple of {EVAL_CHUNK}")
  counts = [fn(which, params, state, x[i:i + EVAL_CHUNK], y[i:i + EVAL_CHUNK])
            for i in range(0, n, EVAL_CHUNK)]
  return np.sum(jax.device_get(counts), axis=0, dtype=np.float64) / n


def make_train(s: Settings, batch_size: int):
  """`train(which, params [R], order [R, E], lr [R], x_train, y_train) -> (params, state)`,
  jitted; each `[R, chunks, ...]`: the weights and running statistics at each evaluation point."""
  return _make_train(s.strides, s.width, s.examples, s.chunks, batch_size)


@functools.lru_cache(maxsize=None)
def _make_train(strides, width, examples, chunks, batch_size):
  num_steps = examples // batch_size
  steps_per_chunk = num_steps // chunks

  def run(which, params, order, lr, x_train, y_train):
    optimizer = _common.make_optimizer(lr, num_steps)
    state = [nj.init_batch_stats(width) for _ in strides]

    def loss_fn(params, state, x, y):
      logits, state = forward(params, state, x, which, strides, True)
      loss, _ = _common.cross_entropy(logits, y)
      return loss, state

    def step(carry, idx):
      params, state, opt_state = carry
      (_, state), grads = jax.value_and_grad(loss_fn, has_aux=True)(
          params, state, x_train[idx], y_train[idx])
      updates, opt_state = optimizer.update(grads, opt_state, params)
      params = jax.tree.map(lambda p, u: p + u, params, updates)
      return (params, state, opt_state), None

    def chunk(carry, idx):
      carry, _ = jax.lax.scan(step, carry, idx)
      return carry, (carry[0], carry[1])

    carry = (params, state, optimizer.init(params))
    order = order.reshape(chunks, steps_per_chunk, batch_size)
    _, snapshots = jax.lax.scan(chunk, carry, order)
    return snapshots

  return jax.jit(jax.vmap(run, in_axes=(None, 0, 0, 0, None, None)))


# ---------------------------------------------------------------------------------------------
# The study.

def _bar(total: int, desc: str):
  from tqdm.auto import tqdm
  return tqdm(total=total, desc=desc, leave=False,
              disable=os.environ.get("CLAIMS_NO_PROGRESS") == "1")


def _check(s: Settings) -> None:
  for arm in s.arms:
    _, b = parse_arm(arm)
    if s.examples % (b * s.chunks) or s.examples % (BASE_BATCH * s.chunks):
      raise ValueError(f"examples {s.examples} is not a multiple of {b} x {s.chunks} chunks")


def study(seeds: Sequence[int], s: Settings) -> dict[str, Any]:
  """Every arm of `s` at every grid lr and seed; returns `run`'s dictionary."""
  start = time.perf_counter()
  seeds = [int(x) for x in seeds]
  if not seeds:
    raise ValueError("at least one seed")
  _check(s)
  d = _mnist1d_data.load()
  x_train, y_train = jnp.asarray(d.x_train), jnp.asarray(d.y_train)
  n_train, n_lr = len(d.y_train), len(s.lr_grid)
  # Per seed: the weights and the example order, the same for every arm and learning rate.
  inits = [init_params(np.random.default_rng([seed, 0]), s) for seed in seeds]
  orders = [_common.example_order(np.random.default_rng([seed, 1]), n_train, s.examples)
            for seed in seeds]
  # Runs: learning rate major, seed minor (run r = i_lr * S + i_seed).
  params = jax.tree.map(lambda *a: jnp.asarray(np.stack(a)), *[inits[i] for _ in s.lr_grid
                                                               for i in range(len(seeds))])
  order = jnp.asarray(np.stack([orders[i] for _ in s.lr_grid for i in range(len(seeds))]),
                      dtype=jnp.int32)
  arms = {}
  with _bar(len(s.arms), "MNIST-1D arms") as bar:
    for arm in s.arms:
      name, b = parse_arm(arm)
      lr = jnp.asarray([_common.linear_scaled_lr(lr, b, BASE_BATCH) for lr in s.lr_grid
                        for _ in seeds], jnp.float32)
      which = NAMES.index(name)
      snapshots = jax.device_get(make_train(s, b)(which, params, order, lr, x_train, y_train))
      at = lambda t: jax.tree.map(lambda a: a[:, t], snapshots)     # NumPy: nothing to compile
      curve = np.stack([accuracy(which, *at(t), d.x_val, d.y_val, s)
                        for t in range(s.chunks)], axis=-1)               # [R, T]
      final = at(s.chunks - 1)
      out = {"curve_val": curve, "val_acc": curve[:, -1],
             "test_acc": accuracy(which, *final, d.x_test, d.y_test, s),
             "train_acc": accuracy(which, *final, d.x_train, d.y_train, s)}
      out = {k: v.reshape(n_lr, len(seeds), *v.shape[1:]) for k, v in out.items()}
      best = int(np.argmax(out["val_acc"].mean(axis=1)))    # first of equals: the smaller lr
      arms[arm] = {
          "lr": float(s.lr_grid[best]),
          "val_by_lr": {str(lr): out["val_acc"][i].tolist() for i, lr in enumerate(s.lr_grid)},
          "tuned": {"val_acc": out["val_acc"][best].tolist(),
                    "test_acc": out["test_acc"][best].tolist(),
                    "train_acc": out["train_acc"][best].tolist(),
                    "curve_val": out["curve_val"][best].tolist()}}
      bar.update(1)
  epochs = s.examples / n_train
  batches = sorted({parse_arm(arm)[1] for arm in s.arms}, reverse=True)
  steps = ", ".join(f"{s.examples // b} steps at B={b}" for b in batches)
  setup = (
      f"MNIST-1D (Greydanus & Kobak), generated offline with the reference generator's defaults "
      f"(seed 42; 5,000 length-40 signals, 10 classes, standardized over all 5,000 as the "
      f"reference does): its 4,000 training examples split into {n_train} train / "
      f"{len(d.y_val)} validation, and its {len(d.y_test)} test examples. Model: a plain 1-D "
      f"CNN, {len(s.strides)} blocks conv(kernel {KERNEL}, {s.width} channels, strides "
      f"{', '.join(map(str, s.strides))}) -> normalization -> ReLU, global average pooling, "
      f"dense; He-normal init drawn per seed with NumPy. Batch norm: momentum {BN_MOMENTUM}, "
      f"evaluated with running statistics; group norm: {NUM_GROUPS} groups; layer norm and RMS "
      f"norm over (length, channels), then a per-channel scale and shift (RMS: scale only). "
      f"Optimizer: SGD + momentum 0.9, linear warmup over 5 % of the steps then cosine decay to "
      f"0; {s.examples:,} training examples seen per run ({epochs:g} epochs; {steps}), the same "
      f"examples in the same order and the same initial weights for every arm and lr of a "
      f"seed. Learning rate: peak lr at B=32 from the grid {list(s.lr_grid)}, applied as "
      f"lr*B/32 (linear scaling), chosen per arm by the mean final validation accuracy over "
      f"{len(seeds)} seeds {seeds}; 'lr' and 'val_by_lr' are in B=32 units. Test accuracy is "
      f"reported at the chosen lr only and never used for a choice; train accuracy is in eval "
      f"mode on all {n_train} training examples. Curves: validation accuracy at {s.chunks} "
      f"points.")
  return {"task": "MNIST-1D", "setup": setup, "chance": 0.1,
          "lr_grid": [float(x) for x in s.lr_grid], "arms": arms,
          "curve_examples": [int(s.examples * (i + 1) // s.chunks) for i in range(s.chunks)],
          "wall_s": time.perf_counter() - start}


def run(seeds: Sequence[int], quick: bool = False) -> dict:
  """The study: `FULL` (or `QUICK`) settings over `seeds`; plain JSON-serializable values."""
  return study(seeds, QUICK if quick else FULL)


def markdown(result: dict) -> str:
  lines = ["| arm | lr (B=32 units) | val acc | test acc | train acc |", "|---|---|---|---|---|"]
  ms = lambda v: f"{100 * np.mean(v):.1f} ± {100 * np.std(v, ddof=1) if len(v) > 1 else 0:.1f}"
  for arm, r in result["arms"].items():
    t = r["tuned"]
    lines.append(f"| {arm} | {r['lr']:g} | {ms(t['val_acc'])} | {ms(t['test_acc'])} | "
                 f"{ms(t['train_acc'])} |")
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--quick", action="store_true", help="2 seeds, fewer examples")
  ap.add_argument("--seeds", type=int, default=None, help="number of seeds (default 5, quick 2)")
  ap.add_argument("--json", default=None, help="write the result dictionary here")
  args = ap.parse_args(argv)
  result = run(range(args.seeds or (2 if args.quick else 5)), quick=args.quick)
  print(result["setup"], "\n")
  print(markdown(result))
  print(f"\nmean ± sample std over seeds; wall {result['wall_s']:.1f} s")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=1)
  return result


if __name__ == "__main__":
  main()
