"""The claims lab's model and training loop: the part to copy into your own code.

A plain (non-residual) CNN for 8x8 images -- a linear 3x3 stride-2 stem conv to `width`
channels, then `depth` blocks `conv3x3 -> normalization -> activation` at 4x4, global average
pooling and a dense layer -- and a tanh RNN that reads an image as a sequence (8 rows of 8
pixels, or 64 single pixels). The normalization is a runtime choice (`lax.switch` over
`VARIANTS`), so one compiled program trains every variant; the blocks are a `lax.scan` over
stacked per-layer weights, so compile time does not grow with depth. Training is one jitted
function: `jax.vmap` over runs (seeds x a per-run learning rate, dropout rate or init scale),
`lax.scan` over steps, the batch statistics threaded explicitly as a pytree (`nj.BatchStats`).
Plain JAX + optax + normjax.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402
import normjax as nj  # noqa: E402

Params = dict[str, Any]


class Config(NamedTuple):
  """Everything static about a training program (one compilation each)."""
  batch_size: int
  steps_per_chunk: int
  num_chunks: int          # evaluation points along training (the training curves)
  depth: int = 8           # normalized conv blocks (CNN) after the stem
  width: int = 16          # channels of every block (CNN) or hidden units (RNN)
  model: str = "cnn"       # "cnn"; "rnn" (8 rows of 8 pixels); "rnn64" (64 single pixels)
  ghost_size: int = 8      # ghost batch norm: examples per virtual batch (capped at B)
  dropout: bool = False    # whether the per-run dropout rate is applied (after each block)
  bn_momentum: float = 0.9   # runs of 100-800 steps: a horizon of ~10 steps
  groups: int = 4          # group norm: groups of width // groups channels
  padding: str = "zero"    # the convs' padding: "zero", or "wrap" (circular)
  population: bool = False  # internal: batch-type norms use the whole batch, momentum 0


class Ctx(NamedTuple):
  """What a normalization may depend on besides its input: the step and a random key."""
  step: jax.Array          # int32 scalar, the optimizer step (0 at evaluation)
  num_steps: int           # the run's total steps (static)
  key: jax.Array | None    # a per-step, per-layer key in training; None in evaluation


# ---------------------------------------------------------------------------------------------
# The normalizations. Each is `f(p, stats, h, cfg, train, ctx) -> (normalized h, new stats)`
# where `h` is `[N, H, W, C]` (CNN) or `[N, C]` (one RNN time step), `p` holds `scale`, `bias`
# and `tau` (`[C]`) and `stats` is an `nj.BatchStats`; a variant uses what it needs.

def _population(p, s, h):
  # Statistics of the whole batch given (the training set), stored as the new running ones.
  return nj.batch_norm(h, p["scale"], p["bias"], s, train=True, momentum=0.0)


def _batch(p, s, h, cfg, train, ctx, k=None):
  if cfg.population:
    return _population(p, s, h)
  vbs = None if k is None or not train else min(k, h.shape[0])
  return nj.batch_norm(h, p["scale"], p["bias"], s, train=train, momentum=cfg.bn_momentum,
                       virtual_batch_size=vbs)


def _ramp(step, start, end, lo, hi):
  t = jnp.clip((step.astype(jnp.float32) - start) / max(1.0, end - start), 0.0, 1.0)
  return lo + (hi - lo) * t


def _renorm(p, s, h, cfg, train, ctx):
  # Ioffe (2017), section 4: plain batch norm first (r_max = 1, d_max = 0), then r_max ramped
  # to 3 and d_max to 5. Ioffe ramps over 5k-40k (r) and 5k-25k (d) of ~130k+ steps; here
  # over 5-40 % and 5-25 % of the run. Running statistics with Ioffe's momentum 0.99 where the
  # run has at least 500 steps (0.99^500 < 1 %: they have forgotten their initial values),
  # else batch norm's (in 100 steps, 0.99 would leave 37 % of the initial mean 0, var 1).
  if cfg.population:
    return _population(p, s, h)
  n = ctx.num_steps
  momentum = 0.99 if n >= 500 else cfg.bn_momentum
  r_max = _ramp(ctx.step, 0.05 * n, 0.40 * n, 1.0, 3.0)
  d_max = _ramp(ctx.step, 0.05 * n, 0.25 * n, 0.0, 5.0)
  return nj.batch_renorm(h, p["scale"], p["bias"], s, train=train, momentum=momentum,
                         r_max=r_max, d_max=d_max)


def _noisy_batch(p, s, h, cfg, train, ctx):
  # Santurkar et al. (2018), section 2.1: batch norm followed, in training only, by noise of
  # non-zero mean and non-unit variance whose distribution changes at every step: per step,
  # layer and channel a mean m ~ U(-0.5, 0.5) and a scale s ~ U(1, 1.5), and every activation
  # becomes s * y + m + 0.1 * N(0, 1) (i.i.d. per activation). The layer's input
  # distribution then moves at every step ("internal covariate shift") by design.
  y, s = _batch(p, s, h, cfg, train, ctx)
  if ctx.key is None or cfg.population:
    return y, s
  ka, kb, kc = jax.random.split(ctx.key, 3)
  c = h.shape[-1]
  scale = jax.random.uniform(ka, (c,), y.dtype, 1.0, 1.5)
  shift = jax.random.uniform(kb, (c,), y.dtype, -0.5, 0.5)
  noise = 0.1 * jax.random.normal(kc, y.shape, y.dtype)
  return y * _channels(scale, h) + _channels(shift, h) + noise, s


def _ghost(p, s, h, cfg, train, ctx):
  return _batch(p, s, h, cfg, train, ctx, k=cfg.ghost_size)


def _features(h):
  return tuple(range(1, h.ndim))               # per example: (H, W, C), or (C,) in the RNN


def _channels(v, h):
  return v.reshape((1,) * (h.ndim - 1) + (-1,))   # [C] -> [1, ..., 1, C]


def _layer(p, s, h, cfg, train, ctx):
  y = nj.layer_norm(h, axis=_features(h))         # per-channel affine, as in Wu & He (2018)
  return y * _channels(p["scale"], h) + _channels(p["bias"], h), s


def _rms(p, s, h, cfg, train, ctx):
  return nj.rms_norm(h, axis=_features(h)) * _channels(p["scale"], h), s


def _instance(p, s, h, cfg, train, ctx):
  return nj.instance_norm(h, p["scale"], p["bias"]), s


def _group(p, s, h, cfg, train, ctx):
  return nj.group_norm(h, p["scale"], p["bias"], num_groups=cfg.groups), s


def _frn(p, s, h, cfg, train, ctx):
  # Filter response norm + TLU, max(y, tau): the TLU replaces the ReLU.
  return nj.filter_response_norm(h, p["scale"], p["bias"], p["tau"]), s


def _none(p, s, h, cfg, train, ctx):
  return h, s


class Variant(NamedTuple):
  norm: Callable[..., Any]
  relu: bool = True                   # False: the norm ends in its own activation (FRN's TLU)
  standardize_weights: bool = False   # weight standardization of the conv kernels (Qiao 2019)
  uses_stats: bool = False            # keeps running statistics (evaluated with them)
  params: tuple[str, ...] = ("scale", "bias")   # per-channel parameters it uses


VARIANTS: dict[str, Variant] = {
    "none": Variant(_none, params=()),
    "batch": Variant(_batch, uses_stats=True),
    "batch_renorm": Variant(_renorm, uses_stats=True),
    "ghost_batch": Variant(_ghost, uses_stats=True),
    "layer": Variant(_layer),
    "instance": Variant(_instance),
    "group": Variant(_group),
    "rms": Variant(_rms, params=("scale",)),
    "frn": Variant(_frn, relu=False, params=("scale", "bias", "tau")),
    "group_ws": Variant(_group, standardize_weights=True),
    # Statistics over k examples of a batch of 32 (Wu & He, 2018's design), and noisy batch norm.
    **{f"batch_k{k}": Variant(functools.partial(_batch, k=k), uses_stats=True)
       for k in (1, 2, 4, 8, 32)},
    "noisy_batch": Variant(_noisy_batch, uses_stats=True),
}
RNN_VARIANTS = ("none", "batch", "layer")   # per-time-step statistics for "batch"


def sequence_length(cfg: Config) -> int:
  return {"rnn": 8, "rnn64": 64}[cfg.model]


# ---------------------------------------------------------------------------------------------
# Parameters, drawn with NumPy (deterministic per seed, nothing to compile).

def _norm_params(shape: tuple[int, ...], scale: float = 1.0) -> Params:
  return {"scale": np.full(shape, scale, np.float32), "bias": np.zeros(shape, np.float32),
          "tau": np.zeros(shape, np.float32)}


def init_params(rng: np.random.Generator, cfg: Config, init_scale: float = 1.0,
                norm_scale: float = 1.0) -> Params:
  """He-normal conv kernels times `init_scale` (LeCun-normal: `init_scale = 2 ** -0.5`),
  LeCun-normal head, zero biases; the norms' scale at `norm_scale` (Cooijmans et al. start
  recurrent batch norm at 0.1)."""
  c, d = cfg.width, cfg.depth
  head = {"kernel": (rng.standard_normal((c, 10)) / np.sqrt(c)).astype(np.float32),
          "bias": np.zeros((10,), np.float32)}
  if cfg.model.startswith("rnn"):
    f = 64 // sequence_length(cfg)                       # input features per time step
    w_h = np.linalg.qr(rng.standard_normal((c, c)))[0]   # orthogonal recurrent weights
    return {"w_x": (init_scale * rng.standard_normal((f, c)) / np.sqrt(f)).astype(np.float32),
            "w_h": (init_scale * w_h).astype(np.float32),
            "b": np.zeros((c,), np.float32), "norm": _norm_params((c,), norm_scale),
            "head": head}
  he = lambda fan_in, shape: init_scale * np.sqrt(2.0 / fan_in) * rng.standard_normal(shape)
  return {
      "stem": {"kernel": he(9, (3, 3, 1, c)).astype(np.float32), "bias": np.zeros((c,), np.float32)},
      "blocks": {"kernel": he(9 * c, (d, 3, 3, c, c)).astype(np.float32),
                 "conv_bias": np.zeros((d, c), np.float32), **_norm_params((d, c), norm_scale)},
      "head": head}


def init_state(cfg: Config) -> nj.BatchStats:
  """Running statistics per block (CNN) or per time step (RNN), stacked on axis 0."""
  stats = nj.init_batch_stats(cfg.width)
  n = sequence_length(cfg) if cfg.model.startswith("rnn") else cfg.depth
  return jax.tree.map(lambda a: jnp.stack([a] * n), stats)


# ---------------------------------------------------------------------------------------------
# The models: `forward(params, state, x, which, names, cfg, train, ctx, drop) -> (logits,
# state)`. `which` indexes `names` (a traced int), whose entries are keys of `VARIANTS` or
# `Variant`s; `drop` is a dropout rate or None.

def conv3x3(x: jax.Array, kernel: jax.Array, bias: jax.Array, stride: int = 1,
            padding: str = "zero") -> jax.Array:
  """3x3 convolution, padding 1: `[N, H, W, Ci]`, `[3, 3, Ci, Co]` -> `[N, H/stride, W/stride, Co]`.

  The nine shifted views concatenated and one matmul (equal to `lax.conv_general_dilated`,
  faster for 8x8 images on CPU, and a plain batched matmul under `jax.vmap` over seeds).
  `padding="zero"` (the default) pads with zeros; `"wrap"` pads circularly, so that a constant
  input gives a constant output (no border pattern; but with global pooling the net then
  cannot tell where on the torus a stroke is, which costs accuracy on digits).
  """
  n, h, w, c = x.shape
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="wrap" if padding == "wrap" else "constant")
  taps = [xp[:, i:i + h:stride, j:j + w:stride] for i in range(3) for j in range(3)]
  return jnp.concatenate(taps, axis=-1) @ kernel.reshape(9 * c, -1) + bias.reshape(1, 1, 1, -1)


def _variant(name: str | Variant) -> Variant:
  """A `names` entry: a key of `VARIANTS`, or a `Variant` of the caller's own."""
  return VARIANTS[name] if isinstance(name, str) else name


def _layer_ctx(ctx: Ctx, i) -> Ctx:
  return ctx if ctx.key is None else ctx._replace(key=jax.random.fold_in(ctx.key, i))


def cnn_forward(params, state, x, which, names, cfg, train, ctx, drop=None):
  def branch(v, p, stats, h, step, key):   # num_steps stays static (closed over)
    kernel = nj.weight_standardize(p["kernel"]) if v.standardize_weights else p["kernel"]
    c = ctx._replace(step=step, key=key)
    y, stats = v.norm(p, stats, conv3x3(h, kernel, p["conv_bias"], 1, cfg.padding), cfg, train,
                      c)
    return (jax.nn.relu(y) if v.relu else y), stats

  def block(h, layer):
    p, stats, i = layer
    c = _layer_ctx(ctx, i)
    branches = [functools.partial(branch, _variant(n)) for n in names]
    h, stats = jax.lax.switch(which, branches, p, stats, h, c.step, c.key)
    if drop is not None and c.key is not None:
      keep = jax.random.bernoulli(jax.random.fold_in(c.key, 7), 1.0 - drop, h.shape)
      h = jnp.where(keep, h / (1.0 - drop), 0.0)
    return h, stats

  h = conv3x3(x, params["stem"]["kernel"], params["stem"]["bias"], 2, cfg.padding)  # [N,4,4,C]
  h, state = jax.lax.scan(block, h, (params["blocks"], state, jnp.arange(cfg.depth)))
  return _common.head(h, params["head"]), state


def rnn_forward(params, state, x, which, names, cfg, train, ctx, drop=None):
  """x `[N, 8, 8, 1]` read as T steps: `h_t = tanh(norm(x_t W_x + h_{t-1} W_h + b))`."""
  t = sequence_length(cfg)
  def branch(v, p, stats, pre, step, key):
    return v.norm(p, stats, pre, cfg, train, ctx._replace(step=step, key=key))
  branches = [functools.partial(branch, _variant(n)) for n in names]

  def step(h, inputs):
    xt, stats, i = inputs                                 # [N, F], BatchStats of this step
    pre = xt @ params["w_x"] + h @ params["w_h"] + params["b"].reshape(1, -1)
    c = _layer_ctx(ctx, i)
    y, stats = jax.lax.switch(which, branches, params["norm"], stats, pre, c.step, c.key)
    return jnp.tanh(y), stats

  seq = jnp.moveaxis(x.reshape(x.shape[0], t, -1), 1, 0)  # [T, N, F]
  h0 = jnp.zeros((x.shape[0], cfg.width), x.dtype)
  h, state = jax.lax.scan(step, h0, (seq, state, jnp.arange(t)))
  return _common.head(h[:, None, None, :], params["head"]), state


def forward_fn(cfg: Config):
  return rnn_forward if cfg.model.startswith("rnn") else cnn_forward


# ---------------------------------------------------------------------------------------------
# Training: one jitted program per Config; vmapped over runs, scanned over steps.

def make_train(names: Sequence[str], cfg: Config) -> Callable[..., Any]:
  """`train(which, params [R], order [R, E], lr [R], drop_rate [R], data) -> metrics [R]`.

  `order` holds the indices of the `E = num_chunks * steps_per_chunk * batch_size` training
  examples each run sees; `data` is `(x_train, y_train, x_val, y_val, x_test, y_test)`.
  Returns per run the curves (`[R, num_chunks]`: train-mode loss and eval-mode test
  accuracy), the final eval-mode accuracies on the train, validation and test sets, the
  eval-mode training loss, and the test accuracy with each batch-norm layer's statistics
  recomputed over the whole training set after training ("population" statistics).
  """
  forward = forward_fn(cfg)
  num_steps = cfg.num_chunks * cfg.steps_per_chunk
  eval_ctx = Ctx(jnp.zeros((), jnp.int32), num_steps, None)

  def run(which, params, order, lr, drop_rate, data):
    x_train, y_train, x_val, y_val, x_test, y_test = data
    optimizer = _common.make_optimizer(lr, num_steps)     # SGD + momentum, warmup + cosine
    opt_state = optimizer.init(params)
    key = jax.random.key(0)

    def loss_fn(params, state, x, y, step):
      ctx = Ctx(step, num_steps, jax.random.fold_in(key, step))
      logits, state = forward(params, state, x, which, names, cfg, True, ctx,
                              drop_rate if cfg.dropout else None)
      loss, acc = _common.cross_entropy(logits, y)
      return loss, (state, acc)

    def train_step(carry, idx):
      params, state, opt_state, step = carry
      (loss, (state, acc)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
          params, state, x_train[idx], y_train[idx], step)
      updates, opt_state = optimizer.update(grads, opt_state, params)
      params = jax.tree.map(lambda p, u: p + u, params, updates)
      return (params, state, opt_state, step + 1), loss

    def evaluate(params, state, x, y, c=cfg):
      logits, _ = forward(params, state, x, which, names, c, False, eval_ctx)
      return _common.cross_entropy(logits, y)

    def chunk(carry, idx):
      carry, losses = jax.lax.scan(train_step, carry, idx)
      return carry, {"train_loss": losses.mean(),
                     "test_acc": evaluate(carry[0], carry[1], x_test, y_test)[1]}

    carry = (params, init_state(cfg), opt_state, jnp.zeros((), jnp.int32))
    order = order.reshape(cfg.num_chunks, cfg.steps_per_chunk, cfg.batch_size)
    (params, state, _, _), curves = jax.lax.scan(chunk, carry, order)
    train_loss, train_acc = evaluate(params, state, x_train, y_train)
    # Population statistics: one train-mode pass over the training set with momentum 0.
    pop = cfg._replace(population=True)
    _, pop_state = forward(params, init_state(cfg), x_train, which, names, pop, True, eval_ctx)
    return {"curves": curves, "val_acc": evaluate(params, state, x_val, y_val)[1],
            "test_acc": curves["test_acc"][-1], "train_acc": train_acc,
            "train_loss": train_loss,
            "test_acc_population": evaluate(params, pop_state, x_test, y_test)[1]}

  return jax.jit(jax.vmap(run, in_axes=(None, 0, 0, 0, 0, None)))


def make_grad_norms(names: Sequence[str], cfg: Config) -> Callable[..., Any]:
  """`grad_norms(which, params [R], x [N, 8, 8, 1], y [N]) -> [R, depth]`: the norm of the
  loss gradient with respect to each block's conv kernel at initialization (train mode)."""
  forward = forward_fn(cfg)
  ctx = Ctx(jnp.zeros((), jnp.int32), 1, None)

  def norms(which, params, x, y):
    def loss(p):
      logits, _ = forward(p, init_state(cfg), x, which, names, cfg, True, ctx)
      return _common.cross_entropy(logits, y)[0]
    g = jax.grad(loss)(params)["blocks"]["kernel"]
    return jnp.sqrt(jnp.sum(g.reshape(cfg.depth, -1) ** 2, axis=1))

  return jax.jit(jax.vmap(norms, in_axes=(None, 0, None, None)))


def make_step(names: Sequence[str], cfg: Config) -> Callable[..., Any]:
  """`step(which, params, state, x, y) -> (params, state)`: one plain SGD training step of one
  run (no vmap), for timing; and `infer(which, params, state, x) -> logits`."""
  forward = forward_fn(cfg)
  ctx = Ctx(jnp.zeros((), jnp.int32), 1000, jax.random.key(0))
  eval_ctx = ctx._replace(key=None)

  def step(which, params, state, x, y):
    def loss(p):
      logits, s = forward(p, state, x, which, names, cfg, True, ctx)
      return _common.cross_entropy(logits, y)[0], s
    g, state = jax.grad(loss, has_aux=True)(params)
    return jax.tree.map(lambda p, d: p - 0.01 * d, params, g), state

  def infer(which, params, state, x):
    return forward(params, state, x, which, names, cfg, False, eval_ctx)[0]

  return jax.jit(step), jax.jit(infer)
