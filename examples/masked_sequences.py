"""Variable-length sequences with padding: masked versus unmasked layer and batch norm.

A batch of sequences of different lengths is padded to a common length. A normalization whose
statistics run over the time axis -- a layer norm over (time, features) per sequence, a batch
norm over (batch, time) per feature -- then counts the padding as data unless it is told which
positions are real. With `mask=` (True for real tokens) normjax leaves the padding out of the
statistics, so the output on real tokens no longer depends on how much padding there is.
(A per-token layer norm over the features alone, as in transformers, never sees padding.)

Two parts:

1. Exact checks, no training: the masked norms on a padded batch equal the norms of each
   sequence alone, whatever the padding; the unmasked ones move with the padding, and an
   unmasked batch norm's statistics are pulled toward the padding value.
2. Training: a small per-token MLP with a norm before each layer and masked mean pooling,
   trained on sequences padded to 32 (lengths 8..32; the class is the shape of the token
   distribution, behind a random offset and gain per sequence), then evaluated on the test
   sequences padded to 32 (as in training), 64 and 128. Masked models score the same at every
   padding. The unmasked layer norm scores lower even at the training padding and loses more
   as the padding grows; batch norm cannot undo a per-sequence offset and gain at all, so it
   scores lower either way (its eval uses running statistics, which do not see the test
   padding; masking makes those statistics the real tokens' ones).

Run: `python examples/masked_sequences.py` (24 s on 2 CPU cores in the committed run,
`docs/masked_sequences`; `--steps` to shorten). Writes `results.md` and `results.json` into `--out` (default
`results/masked_sequences`).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402
import normjax as nj  # noqa: E402

FEATURES = 8        # D, features per token
HIDDEN = 32         # H, width of the per-token MLP
NUM_CLASSES = 4
MIN_LEN, MAX_LEN = 8, 32
PAD_VALUE = 0.0
EVAL_PADS = (32, 64, 128)


# ---------------------------------------------------------------------------------------------
# Data: the class is the *shape* of the distribution the tokens are drawn from (normal,
# uniform, right-skewed, left-skewed; all with mean 0 and variance 1), seen through a random
# offset and gain per sequence. Telling the shapes apart needs each token standardized by its
# own sequence's mean and spread: exactly what a layer norm over (time, features) does, if the
# padding stays out of its statistics.

def _draw(rng: np.random.Generator, label: int, shape: tuple[int, ...]) -> np.ndarray:
  if label == 0:
    return rng.standard_normal(shape)
  if label == 1:
    return rng.uniform(-np.sqrt(3.0), np.sqrt(3.0), shape)
  z = rng.exponential(1.0, shape) - 1.0
  return z if label == 2 else -z


def make_sequences(rng: np.random.Generator, n: int) -> tuple[list[np.ndarray], np.ndarray]:
  labels = rng.integers(0, NUM_CLASSES, n).astype(np.int32)
  seqs = []
  for c in labels:
    length = int(rng.integers(MIN_LEN, MAX_LEN + 1))
    offset, gain = rng.normal(5.0, 2.0), rng.uniform(0.5, 3.0)
    seqs.append((offset + gain * _draw(rng, int(c), (length, FEATURES))).astype(np.float32))
  return seqs, labels


def pad(seqs: Sequence[np.ndarray], length: int) -> tuple[np.ndarray, np.ndarray]:
  """`[N, length, D]` padded with PAD_VALUE, and the `[N, length]` mask (True = real token)."""
  x = np.full((len(seqs), length, FEATURES), PAD_VALUE, np.float32)
  mask = np.zeros((len(seqs), length), bool)
  for i, s in enumerate(seqs):
    x[i, :len(s)] = s
    mask[i, :len(s)] = True
  return x, mask


# ---------------------------------------------------------------------------------------------
# The two sequence norms, masked or not. `m` is the `[N, T]` mask; the norms get `[N, T, 1]`,
# which broadcasts over the features.

def seq_layer_norm(h, p, stats, m, *, masked: bool, train: bool):
  """Layer norm per sequence over (time, features), per-feature affine."""
  y = nj.layer_norm(h, axis=(1, 2), mask=m[..., None] if masked else None)
  return y * p["scale"].reshape(1, 1, -1) + p["bias"].reshape(1, 1, -1), stats


def seq_batch_norm(h, p, stats, m, *, masked: bool, train: bool):
  """Batch norm per feature over (batch, time), running statistics for evaluation."""
  return nj.batch_norm(h, p["scale"], p["bias"], stats, train=train, momentum=0.9,
                       mask=m[..., None] if masked else None)


NORMS = {"layer (time x features)": seq_layer_norm, "batch (batch x time)": seq_batch_norm}


def init(rng: np.random.Generator) -> tuple[dict[str, Any], dict[str, Any]]:
  dense = lambda i, o: {"kernel": (rng.standard_normal((i, o)) / np.sqrt(i)).astype(np.float32),
                        "bias": np.zeros((o,), np.float32)}
  affine = lambda c: {"scale": np.ones((c,), np.float32), "bias": np.zeros((c,), np.float32)}
  params = {"norm0": affine(FEATURES), "dense0": dense(FEATURES, HIDDEN),
            "norm1": affine(HIDDEN), "dense1": dense(HIDDEN, HIDDEN),
            "head": dense(HIDDEN, NUM_CLASSES)}
  state = {"norm0": nj.init_batch_stats(FEATURES), "norm1": nj.init_batch_stats(HIDDEN)}
  return jax.tree.map(jnp.asarray, params), state


def forward(params, state, x, m, norm, *, masked: bool, train: bool):
  """(norm -> dense -> relu) twice on each token, masked mean pooling, classifier."""
  h, new_state = x, {}
  for i in range(2):
    h, new_state[f"norm{i}"] = norm(h, params[f"norm{i}"], state[f"norm{i}"], m, masked=masked,
                                    train=train)
    d = params[f"dense{i}"]
    h = jax.nn.relu(h @ d["kernel"] + d["bias"].reshape(1, 1, -1))
  w = m.astype(h.dtype)[..., None]                          # pooling is always masked
  pooled = (h * w).sum(axis=1) / jnp.maximum(w.sum(axis=1), jnp.ones((), h.dtype))
  return pooled @ params["head"]["kernel"] + params["head"]["bias"].reshape(1, -1), new_state


def train(norm, masked: bool, data, steps: int, batch_size: int, lr: float, seed: int):
  """SGD with momentum (warmup + cosine decay), one jitted `lax.scan` over all steps.

  Returns the trained `(params, state)`.
  """
  x, m, y = data
  rng = np.random.default_rng(seed)
  params, state = init(rng)
  order = np.concatenate([rng.permutation(len(y)) for _ in range(-(-steps * batch_size // len(y)))])
  order = jnp.asarray(order[:steps * batch_size].reshape(steps, batch_size))
  optimizer = _common.make_optimizer(lr, steps)

  def loss_fn(params, state, xb, mb, yb):
    logits, state = forward(params, state, xb, mb, norm, masked=masked, train=True)
    return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean(), state

  @jax.jit
  def run(params, state, order, x, m, y):
    def step(carry, idx):
      params, state, opt_state = carry
      grads, state = jax.grad(loss_fn, has_aux=True)(params, state, x[idx], m[idx], y[idx])
      updates, opt_state = optimizer.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), state, opt_state), None
    (params, state, _), _ = jax.lax.scan(step, (params, state, optimizer.init(params)), order)
    return params, state

  return run(params, state, order, x, m, y)


# ---------------------------------------------------------------------------------------------

def exact_checks(seqs: Sequence[np.ndarray]) -> dict[str, float]:
  """Max deviations on real tokens, no training involved."""
  out = {}
  x32, m32 = pad(seqs, 32)
  x64, m64 = pad(seqs, 64)
  for masked in (True, False):
    kind = "masked" if masked else "unmasked"
    ln = lambda x, m: nj.layer_norm(jnp.asarray(x), axis=(1, 2),
                                    mask=jnp.asarray(m)[..., None] if masked else None)
    y32, y64 = np.asarray(ln(x32, m32)), np.asarray(ln(x64, m64))
    alone = [np.asarray(nj.layer_norm(jnp.asarray(s)[None], axis=(1, 2)))[0] for s in seqs]
    out[f"layer_norm {kind}: pad 32 vs pad 64"] = max(
        float(np.abs(y32[i, :len(s)] - y64[i, :len(s)]).max()) for i, s in enumerate(seqs))
    out[f"layer_norm {kind}: pad 32 vs each sequence alone"] = max(
        float(np.abs(y32[i, :len(s)] - alone[i]).max()) for i, s in enumerate(seqs))

    # Batch norm: one training step with momentum 0 stores this batch's statistics.
    tokens = np.concatenate(seqs)                                  # the real tokens only
    _, stats = nj.batch_norm(jnp.asarray(x32), None, None, nj.init_batch_stats(FEATURES),
                             train=True, momentum=0.0,
                             mask=jnp.asarray(m32)[..., None] if masked else None)
    out[f"batch_norm {kind}: running mean - mean of real tokens"] = float(
        np.abs(np.asarray(stats.mean) - tokens.mean(0)).max())
    out[f"batch_norm {kind}: running var / var of real tokens - 1"] = float(
        np.abs(np.asarray(stats.var) / tokens.var(0) - 1).max())
  return out


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  p = argparse.ArgumentParser(
      description=__doc__.split("\n\n")[0],
      epilog="Part 1 (the exact checks) has no options; these shape part 2, the training. "
             "Defaults reproduce docs/masked_sequences (24 s on 2 CPU cores).")
  p.add_argument("--steps", type=int, default=600,
                 help="SGD steps per model; 4 models are trained (layer/batch norm, masked or "
                      "not) and the run time scales with it (default: %(default)s)")
  p.add_argument("--batch-size", type=int, default=32,
                 help="sequences per training step, padded to 32 tokens (default: %(default)s)")
  p.add_argument("--lr", type=float, default=0.1,
                 help="peak SGD learning rate of the warmup + cosine schedule (default: "
                      "%(default)s)")
  p.add_argument("--train-size", type=int, default=2000,
                 help="synthetic training sequences, lengths 8..32 (default: %(default)s)")
  p.add_argument("--test-size", type=int, default=1000,
                 help="test sequences, evaluated padded to 32, 64 and 128 (default: %(default)s)")
  p.add_argument("--seed", type=int, default=0,
                 help="seed of the data, the initialization and the batch order "
                      "(default: %(default)s)")
  p.add_argument("--out", default=os.path.join("results", "masked_sequences"),
                 help="folder for results.md and results.json (default: %(default)s)")
  args = p.parse_args(argv)
  t0 = time.perf_counter()

  rng = np.random.default_rng(args.seed)
  train_seqs, y_train = make_sequences(rng, args.train_size)
  test_seqs, y_test = make_sequences(rng, args.test_size)
  x_train, m_train = pad(train_seqs, MAX_LEN)
  train_data = (jnp.asarray(x_train), jnp.asarray(m_train), jnp.asarray(y_train))
  print(f"{args.train_size} train / {args.test_size} test sequences, lengths {MIN_LEN}..{MAX_LEN},"
        f" padded with {PAD_VALUE} to {MAX_LEN} for training")

  checks = exact_checks(test_seqs[:16])
  print("\n1. Exact checks on 16 test sequences (max abs deviation on real tokens):")
  width = max(map(len, checks))
  for k, v in checks.items():
    print(f"  {k:<{width}}  {v:.2e}")

  print(f"\n2. Training ({args.steps} SGD steps of {args.batch_size}), then test accuracy with "
        f"the test sequences padded to {', '.join(map(str, EVAL_PADS))}:")
  rows = []
  test_padded = {t: tuple(map(jnp.asarray, pad(test_seqs, t))) for t in EVAL_PADS}
  for name, norm in NORMS.items():
    for masked in (True, False):
      params, state = train(norm, masked, train_data, args.steps, args.batch_size, args.lr,
                            args.seed)
      accs = {}
      for t, (x, m) in test_padded.items():
        logits, _ = forward(params, state, x, m, norm, masked=masked, train=False)
        accs[t] = float((np.asarray(logits).argmax(-1) == y_test).mean())
      rows.append({"norm": name, "masked": masked, "test_acc": accs})
      print(f"  {name:<24} {'masked' if masked else 'unmasked':<9} " +
            "  ".join(f"pad {t}: {100 * a:5.1f}%" for t, a in accs.items()))

  wall_s = time.perf_counter() - t0
  md = ["# Masked vs unmasked normalization on padded sequences", "",
        f"{args.train_size} train / {args.test_size} test synthetic sequences (4 classes, "
        f"lengths {MIN_LEN}..{MAX_LEN}, random offset and gain per sequence), trained padded "
        f"to {MAX_LEN}. Command: `" + " ".join(["python examples/masked_sequences.py",
                                              *(sys.argv[1:] if argv is None else argv)])
        + f"`; {wall_s:.0f} s.", "",
        "## Exact checks (max abs deviation on real tokens, 16 test sequences)", "",
        "| check | value |", "|---|---:|",
        *[f"| {k} | {v:.2e} |" for k, v in checks.items()], "",
        "## Test accuracy (%) by padding length at evaluation", "",
        "| norm | mask | " + " | ".join(f"pad {t}" for t in EVAL_PADS) + " |",
        "|---|---|" + "---:|" * len(EVAL_PADS),
        *[f"| {r['norm']} | {'masked' if r['masked'] else 'unmasked'} | " +
          " | ".join(f"{100 * a:.1f}" for a in r["test_acc"].values()) + " |" for r in rows], ""]
  result = {"checks": checks, "training": rows, "wall_s": wall_s, "args": vars(args)}
  return _common.write_results(args.out, md, result, wall_s)


if __name__ == "__main__":
  main()
