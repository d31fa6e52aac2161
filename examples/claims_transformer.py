"""The claims lab's transformer experiment: where the norm goes, and which norm (a small model).

Tests three claims on a generated counting task (nothing downloaded):

- Xiong et al. (2020), "On Layer Normalization in the Transformer Architecture": post-LN needs
  learning-rate warmup at the learning rates that pre-LN trains with; pre-LN trains without it.
- Zhang & Sennrich (2019), "Root Mean Square Layer Normalization": RMS norm matches layer norm.
- Zhu et al. (2025), "Transformers without Normalization": dynamic tanh,
  `DyT(x) = scale * tanh(alpha * x) + bias` (a learned scalar `alpha`, initialised to 0.5),
  matches layer norm; "none" (no normalization) is the reference it improves on.

The task ("histogram", Weiss et al. 2021, RASP): a sequence of `length` tokens drawn uniformly
from `vocab`; at every position, predict how many times that position's token occurs in the whole
sequence. A token's other occurrences are Binomial(length - 1, 1 / vocab) whatever the token and
the position, so a model that does not compare positions (no attention) cannot beat the most
frequent count (`chance`: 0.380 at 16 tokens of 16, where counts 1 and 2 are equally likely);
attention to the equal tokens solves it. A tiny model learns it in a few hundred steps (an
associative-recall task stayed on its copy-any-context-value plateau within this budget). The
model is a bidirectional encoder (learned position embeddings, `blocks` attention + MLP blocks)
in plain JAX; the norms are normjax's, the pre-LN residual adds the fused `nj.add_layer_norm` /
`nj.add_rms_norm`, and the post-LN add-then-norm the same calls (their normalized output); DyT
is written here. Each run sees `steps * batch` training sequences (less than one epoch).

Protocol: every arm starts from the same NumPy-drawn weights for a seed and sees the same batches
in the same order (paired seeds). Each arm's peak learning rate is chosen from `LR_GRID` on the
validation accuracy (mean over seeds); the test set is used only for the reported numbers. Every
arm is also reported at one shared learning rate, the one chosen for pre-LN layer norm with
warmup. Everything is one jitted program (`jax.vmap` over seeds x learning rates, `lax.scan`
over steps and blocks, `lax.switch` over the architectures), called once per arm.

  from claims_transformer import run, ARMS
  result = run(seeds=range(5))          # dict of plain floats and lists (see `run`)
  python examples/claims_transformer.py [--quick]   # prints a summary per arm

Cost on the shared 2-core machine (2026-12-04, never quiet): the full run (5 seeds, 7 arms x 3
lrs, 560 steps) 154 s of CPU (user + sys), 136 s wall at load 2.6-3.9; `quick` (2 seeds, 240
steps) 36 s CPU, 26 s wall at load 2.5. Results are bit-identical from run to run. The quick run
is a smoke test: at 240 steps most arms are still near chance.
"""

from __future__ import annotations

import functools
import math
import os
import time
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import normjax as nj

Params = dict[str, Any]

# Architectures: (placement of the norm, the norm). One `lax.switch` branch each.
_ARCHS: tuple[tuple[str, str], ...] = (
    ("pre", "layer"), ("pre", "rms"), ("pre", "none"), ("pre", "dyt"), ("post", "layer"))

# arm -> (index into _ARCHS, warmup on?)
_ARM_SPEC: dict[str, tuple[int, bool]] = {
    "pre_layer": (0, True),
    "pre_rms": (1, True),
    "pre_none": (2, True),
    "pre_dyt": (3, True),
    "pre_layer_nowarmup": (0, False),
    "post_layer": (4, True),
    "post_layer_nowarmup": (4, False),
}
ARMS: tuple[str, ...] = tuple(_ARM_SPEC)
SHARED_ARM = "pre_layer"     # the shared learning rate is the one chosen for this arm

LR_GRID: tuple[float, ...] = (3e-3, 1e-2, 3e-2)   # Adam peak learning rates


class Settings(NamedTuple):
  """Everything static about the experiment (one compiled program per Settings and run count)."""
  steps: int = 560             # optimizer steps per run
  batch: int = 8               # sequences per step
  chunks: int = 8              # validation points along training (the curves)
  warmup_frac: float = 0.25    # linear warmup over this fraction of steps (arms with warmup)
  d_model: int = 32
  heads: int = 2
  blocks: int = 4
  mlp: int = 64                # hidden width of each block's MLP
  pos_std: float = 0.1         # position embeddings' initial std (token embeddings': 1)
  vocab: int = 16              # token alphabet
  length: int = 16             # sequence length (also the number of count classes)
  n_train: int = 8192
  n_val: int = 256
  n_test: int = 512
  data_seed: int = 0           # the fixed NumPy seed of the three data sets


FULL = Settings()
QUICK = Settings(steps=240)


# ---------------------------------------------------------------------------------------------
# The task.

class Split(NamedTuple):
  tokens: np.ndarray    # [N, length] int32 in 0..vocab-1
  labels: np.ndarray    # [N, length] int32: how often the token at each position occurs, minus 1


def make_split(rng: np.random.Generator, n: int, s: Settings) -> Split:
  """`n` uniform random sequences; the label at each position is its token's count, minus one."""
  tokens = rng.integers(0, s.vocab, (n, s.length)).astype(np.int32)
  counts = (tokens[:, :, None] == tokens[:, None, :]).sum(axis=2)
  return Split(tokens, (counts - 1).astype(np.int32))


def make_data(s: Settings) -> tuple[Split, Split, Split]:
  """Train, validation and test sets from the fixed `data_seed` (independent draws)."""
  rng = np.random.default_rng(s.data_seed)
  return make_split(rng, s.n_train, s), make_split(rng, s.n_val, s), make_split(rng, s.n_test, s)


def chance(s: Settings) -> float:
  """The best accuracy without reading other positions: the most frequent count.

  A token's other occurrences are Binomial(length - 1, 1 / vocab) whatever the token and its
  position, so no per-token or per-position guess does better than the mode.
  """
  n, p = s.length - 1, 1.0 / s.vocab
  return max(math.comb(n, k) * p ** k * (1 - p) ** (n - k) for k in range(n + 1))


def task_line(s: Settings) -> str:
  return (f"histogram: {s.length} tokens drawn uniformly from {s.vocab}; at every position "
          f"predict how many times that position's token occurs in the sequence (1..{s.length}); "
          f"chance (the most frequent count) {chance(s):.3f}")


# ---------------------------------------------------------------------------------------------
# The model. Weights drawn with NumPy: the same for every arm of a seed.

def _norm_params(rng: np.random.Generator, shape: tuple[int, ...]) -> Params:
  del rng
  return {"scale": np.ones(shape, np.float32), "bias": np.zeros(shape, np.float32),
          "alpha": np.full(shape[:-1], 0.5, np.float32)}   # alpha: DyT only (Zhu et al. init)


def init_params(rng: np.random.Generator, s: Settings) -> Params:
  """LeCun-normal kernels, zero biases, N(0, 1) token and position embeddings, unit norms."""
  d, l, m = s.d_model, s.blocks, s.mlp
  vocab, length = s.vocab, s.length
  dense = lambda fan_in, shape: (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)
  zeros = lambda *shape: np.zeros(shape, np.float32)
  return {
      "embed": rng.standard_normal((vocab, d)).astype(np.float32),
      "pos": (s.pos_std * rng.standard_normal((length, d))).astype(np.float32),
      "blocks": {"qkv": dense(d, (l, d, 3 * d)), "qkv_b": zeros(l, 3 * d),
                 "out": dense(d, (l, d, d)), "out_b": zeros(l, d),
                 "fc1": dense(d, (l, d, m)), "fc1_b": zeros(l, m),
                 "fc2": dense(m, (l, m, d)), "fc2_b": zeros(l, d),
                 "norm1": _norm_params(rng, (l, d)), "norm2": _norm_params(rng, (l, d))},
      "final_norm": _norm_params(rng, (d,)),
      "head": dense(d, (d, length)), "head_b": zeros(length),
  }


def dynamic_tanh(x: jax.Array, alpha: jax.Array, scale: jax.Array, bias: jax.Array) -> jax.Array:
  """DyT (Zhu et al., 2025): `scale * tanh(alpha * x) + bias`; `alpha` a scalar, features last."""
  feature = (1,) * (x.ndim - 1) + (-1,)
  return jnp.tanh(alpha * x) * scale.reshape(feature) + bias.reshape(feature)


def add_norm(kind: str, p: Params, x: jax.Array,
             residual: jax.Array) -> tuple[jax.Array, jax.Array]:
  """`h = x + residual` and `(norm(h), h)`; `norm` is `kind` with the parameters `p`."""
  if kind == "layer":
    return nj.add_layer_norm(x, residual, p["scale"], p["bias"])
  if kind == "rms":
    return nj.add_rms_norm(x, residual, p["scale"])
  h = x + residual
  if kind == "dyt":
    return dynamic_tanh(h, p["alpha"], p["scale"], p["bias"]), h
  if kind == "none":
    return h, h
  raise ValueError(f"unknown norm {kind!r}")


def _row(v: jax.Array) -> jax.Array:
  """A feature vector `[D]` as `[1, 1, D]`, to add to `[N, T, D]` (no implicit rank promotion)."""
  return v.reshape(1, 1, -1)


def attention(p: Params, y: jax.Array, heads: int) -> jax.Array:
  """Bidirectional multi-head self-attention: `[N, T, D] -> [N, T, D]`."""
  n, t, d = y.shape
  qkv = (y @ p["qkv"] + _row(p["qkv_b"])).reshape(n, t, 3, heads, d // heads)
  q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]                      # [N, T, H, Dh]
  logits = jnp.einsum("nqhd,nkhd->nhqk", q, k) / np.float32(np.sqrt(d // heads))
  out = jnp.einsum("nhqk,nkhd->nqhd", jax.nn.softmax(logits, axis=-1), v).reshape(n, t, d)
  return out @ p["out"] + _row(p["out_b"])


def mlp(p: Params, y: jax.Array) -> jax.Array:
  return jax.nn.gelu(y @ p["fc1"] + _row(p["fc1_b"])) @ p["fc2"] + _row(p["fc2_b"])


def pre_ln_blocks(kind: str, params: Params, h: jax.Array, heads: int) -> jax.Array:
  """Pre-LN: `h += attn(norm1(h)); h += mlp(norm2(h))` per block, then the final norm.

  Each block's adds are fused with the following norm: the carry is the stream `h` and the
  branch output `r` not yet added (zero before the first block).
  """
  def block(carry, p):
    h, r = carry
    y, h = add_norm(kind, p["norm1"], r, h)
    y, h = add_norm(kind, p["norm2"], attention(p, y, heads), h)
    return (h, mlp(p, y)), None

  (h, r), _ = jax.lax.scan(block, (h, jnp.zeros_like(h)), params["blocks"])
  y, _ = add_norm(kind, params["final_norm"], r, h)
  return y


def post_ln_blocks(kind: str, params: Params, h: jax.Array, heads: int) -> jax.Array:
  """Post-LN (Vaswani et al., 2017): `h = norm1(h + attn(h)); h = norm2(h + mlp(h))` per block."""
  def block(h, p):
    h, _ = add_norm(kind, p["norm1"], attention(p, h, heads), h)
    h, _ = add_norm(kind, p["norm2"], mlp(p, h), h)
    return h, None

  h, _ = jax.lax.scan(block, h, params["blocks"])
  return h


def forward(params: Params, tokens: jax.Array, arch: int | jax.Array, s: Settings) -> jax.Array:
  """Logits of the counts 1..length at every position, `[N, length, length]`; `arch` indexes
  `_ARCHS`."""
  h = params["embed"][tokens] + params["pos"][None]
  branches = [functools.partial(pre_ln_blocks if place == "pre" else post_ln_blocks, kind)
              for place, kind in _ARCHS]
  branches = [functools.partial(b, heads=s.heads) for b in branches]
  if isinstance(arch, int):                 # a static architecture: that branch alone
    h = branches[arch](params, h)
  else:
    h = jax.lax.switch(arch, branches, params, h)
  return h @ params["head"] + _row(params["head_b"])


def _loss_acc(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  return loss, (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32).mean()


def schedule(peak_lr: jax.Array, warmup: jax.Array, steps: int) -> optax.Schedule:
  """Linear warmup over `warmup` steps (0: none), then linear decay to 0 at `steps`."""
  def lr(count):
    t = jnp.asarray(count).astype(jnp.float32)
    w = warmup.astype(jnp.float32)
    ramp = (t + 1.0) / jnp.maximum(w, 1.0)
    decay = jnp.clip((steps - t) / jnp.maximum(steps - w, 1.0), 0.0, 1.0)
    return peak_lr * jnp.where(t < w, ramp, decay)
  return lr


# ---------------------------------------------------------------------------------------------
# Training: one jitted program; vmapped over runs (seed x learning rate), scanned over steps.

@functools.lru_cache(maxsize=None)
def make_train(s: Settings):
  """`train(arch, warmup, params [R], order [R, steps, B], lr [R], data) -> metrics [R]`."""
  per_chunk = s.steps // s.chunks

  def one_run(arch, warmup, params, order, lr, data):
    x_tr, y_tr, x_val, y_val, x_te, y_te = data
    opt = optax.adam(schedule(lr, warmup, s.steps), b1=0.9, b2=0.98, eps=1e-9)  # Xiong et al.

    def loss_fn(params, x, y):
      return _loss_acc(forward(params, x, arch, s), y)[0]

    def step(carry, idx):
      params, opt_state = carry
      loss, grads = jax.value_and_grad(loss_fn)(params, x_tr[idx], y_tr[idx])
      updates, opt_state = opt.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state), loss

    def chunk(carry, idx):
      carry, losses = jax.lax.scan(step, carry, idx)
      _, val_acc = _loss_acc(forward(carry[0], x_val, arch, s), y_val)
      return carry, (losses.mean(), jnp.all(jnp.isfinite(losses)), val_acc)

    carry = (params, opt.init(params))
    (params, _), (losses, finite, curve) = jax.lax.scan(
        chunk, carry, order.reshape(s.chunks, per_chunk, s.batch))
    _, test_acc = _loss_acc(forward(params, x_te, arch, s), y_te)
    return {"train_loss": losses[-1], "diverged": ~jnp.all(finite), "curve_val": curve,
            "val_acc": curve[-1], "test_acc": test_acc}

  return jax.jit(jax.vmap(one_run, in_axes=(None, None, 0, 0, 0, None)))


def _runs(seeds: Sequence[int], s: Settings):
  """Per run `r = seed_index * len(LR_GRID) + lr_index`: stacked weights, batch order, lr."""
  params, orders = [], []
  for seed in seeds:
    p = init_params(np.random.default_rng([1, seed]), s)
    rng = np.random.default_rng([2, seed])
    n = s.steps * s.batch
    order = np.concatenate([rng.permutation(s.n_train) for _ in range(-(-n // s.n_train))])[:n]
    params += [p] * len(LR_GRID)
    orders += [order.reshape(s.steps, s.batch).astype(np.int32)] * len(LR_GRID)
  params = jax.tree.map(lambda *a: np.stack(a), *params)
  lrs = np.array(list(LR_GRID) * len(seeds), np.float32)
  return params, np.stack(orders), lrs


def _floats(a) -> list:
  return np.asarray(a).tolist()


def setup_line(s: Settings, n_seeds: int) -> str:
  return (f"Bidirectional transformer encoder: learned token (N(0, 1)) and position "
          f"(N(0, {s.pos_std}^2)) embeddings, {s.blocks} blocks of {s.heads}-head self-attention "
          f"and a GELU MLP ({s.d_model} -> "
          f"{s.mlp} -> {s.d_model}), LeCun-normal weights, a linear head at every position; "
          f"the norm pre-LN (with a final norm) or post-LN (Xiong et al. 2020), layer norm and RMS "
          f"norm from normjax (nj.add_layer_norm / nj.add_rms_norm fuse the residual adds), DyT "
          f"(alpha init 0.5) inline, or none. Task: {task_line(s)}; {s.n_train} training, "
          f"{s.n_val} validation and {s.n_test} test sequences from NumPy seed {s.data_seed}. "
          f"Adam (b1 0.9, b2 0.98, eps 1e-9), batch {s.batch}, {s.steps} steps, linear warmup over "
          f"the first {s.warmup_frac:.0%} of steps (none in the *_nowarmup arms) then linear "
          f"decay to 0; no gradient clipping, no weight decay, no dropout. Peak lr per arm from "
          f"{list(LR_GRID)} by mean validation accuracy over {n_seeds} seeds; the shared lr is "
          f"{SHARED_ARM}'s choice. Each seed fixes the initial weights and batch order, the same "
          f"in every arm. A diverged run (non-finite loss) keeps its NaN-logit accuracy (argmax 0, "
          f"i.e. about chance).")


def run(seeds: Sequence[int], quick: bool = False, *, settings: Settings | None = None,
        bar: Any = None) -> dict:
  """Trains every arm at every learning rate of `LR_GRID` for every seed; see the module doc.

  Args:
    seeds: the seeds (paired: index `s` is the same seed, weights and batches, in every arm).
    quick: a shorter run (`QUICK`: fewer steps) instead of `FULL`.
    settings: overrides `FULL` / `QUICK` (tests use a tiny one).
    bar: a tqdm-like object whose `update(1)` is called once per arm; None: an own tqdm bar
      (disabled when the environment has `CLAIMS_NO_PROGRESS=1`).

  Returns:
    `{"task", "setup", "chance", "lr_grid", "shared_lr", "arms": {arm: {"lr", "val_by_lr":
    {str(lr): [S]}, "tuned": {"val_acc", "test_acc", "train_loss", "diverged", "curve_val"},
    "shared": {same}}}, "curve_steps", "wall_s"}`, every value a plain Python float, bool or
    list (per seed, in the order of `seeds`; `curve_val` is `[S][chunks]`, the validation
    accuracy at `curve_steps`; `train_loss` the mean over the last chunk's steps; `diverged`
    whether any training loss was non-finite).
  """
  start = time.perf_counter()
  seeds = list(seeds)
  s = settings or (QUICK if quick else FULL)
  if s.steps % s.chunks:
    raise ValueError(f"steps ({s.steps}) must be a multiple of chunks ({s.chunks})")
  train, val, test = make_data(s)
  data = (train.tokens, train.labels, val.tokens, val.labels, test.tokens, test.labels)
  params, orders, lrs = _runs(seeds, s)
  fn = make_train(s)
  warmup_steps = round(s.warmup_frac * s.steps)

  own = bar is None
  if own:
    from tqdm.auto import tqdm
    bar = tqdm(total=len(ARMS), desc="transformer", unit="arm", dynamic_ncols=True,
               disable=os.environ.get("CLAIMS_NO_PROGRESS") == "1")
  raw = {}
  try:
    for arm in ARMS:
      arch, warm = _ARM_SPEC[arm]
      # optax's Adam bias correction (`decay ** count`, an int count) needs standard promotion;
      # the normjax tests run with strict promotion.
      with jax.numpy_dtype_promotion("standard"):
        out = fn(np.int32(arch), np.int32(warmup_steps if warm else 0), params, orders, lrs, data)
      raw[arm] = jax.tree.map(lambda a: np.asarray(a).reshape(len(seeds), len(LR_GRID),
                                                              *a.shape[1:]), out)
      bar.update(1)
  finally:
    if own:
      bar.close()

  def pick(arm: str, j: int) -> dict:
    r = raw[arm]
    return {"val_acc": _floats(r["val_acc"][:, j]), "test_acc": _floats(r["test_acc"][:, j]),
            "train_loss": _floats(r["train_loss"][:, j]),
            "diverged": [bool(v) for v in r["diverged"][:, j]],
            "curve_val": _floats(r["curve_val"][:, j])}

  def best(arm: str) -> int:
    # Mean validation accuracy over seeds; ties to the smaller lr (first in the grid).
    return int(np.argmax(raw[arm]["val_acc"].mean(axis=0)))

  shared_j = best(SHARED_ARM)
  arms = {}
  for arm in ARMS:
    j = best(arm)
    arms[arm] = {"lr": float(LR_GRID[j]),
                 "val_by_lr": {str(lr): _floats(raw[arm]["val_acc"][:, i])
                               for i, lr in enumerate(LR_GRID)},
                 "tuned": pick(arm, j), "shared": pick(arm, shared_j)}
  per_chunk = s.steps // s.chunks
  return {"task": task_line(s), "setup": setup_line(s, len(seeds)), "chance": chance(s),
          "lr_grid": [float(v) for v in LR_GRID], "shared_lr": float(LR_GRID[shared_j]),
          "arms": arms, "curve_steps": [per_chunk * (i + 1) for i in range(s.chunks)],
          "wall_s": time.perf_counter() - start}


if __name__ == "__main__":
  import argparse
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--seeds", type=int, default=None)
  args = parser.parse_args()
  result = run(range(args.seeds or (2 if args.quick else 5)), quick=args.quick)
  for arm, r in result["arms"].items():
    t, sh = r["tuned"], r["shared"]
    print(f"{arm:20s} lr {r['lr']:.0e} val {np.mean(t['val_acc']):.3f} test "
          f"{np.mean(t['test_acc']):.3f} | shared: val {np.mean(sh['val_acc']):.3f} "
          f"div {sum(sh['diverged'])} | by lr " +
          " ".join(f"{np.mean(v):.3f}" for v in r["val_by_lr"].values()))
  print(f"chance {result['chance']:.3f}, shared lr {result['shared_lr']}, "
        f"wall {result['wall_s']:.1f} s")
