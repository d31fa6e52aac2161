"""The claims lab's model and training loop: the part to copy into your own code.

A plain (non-residual) CNN for 8x8 images -- a linear 3x3 stride-2 stem conv to `width`
channels, then `depth` blocks `conv3x3 -> normalization -> activation` at 4x4, global average
pooling and a dense layer -- and a tanh RNN that reads an image as a sequence of rows. The
normalization is a runtime choice (`lax.switch` over `VARIANTS`), so one compiled program trains
every variant; the blocks are a `lax.scan` over stacked per-layer weights, so compile time does
not grow with depth. Training is one jitted function: `jax.vmap` over runs (seeds, and a
per-run learning rate, dropout rate or init scale), `lax.scan` over steps, the batch statistics
threaded explicitly as a pytree (`nj.BatchStats`). Plain JAX + optax + normjax.
"""

from __future__ import annotations

import functools
import math
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
  width: int = 16          # channels of every block
  model: str = "cnn"       # "cnn", or "rnn" (rows as a sequence)
  ghost_size: int = 8      # ghost batch norm: examples per virtual batch (capped at B)
  dropout: bool = False    # whether the per-run dropout rate is applied (after each block)
  bn_momentum: float = 0.9
  groups: int = 4          # group norm: groups of width // groups channels


# ---------------------------------------------------------------------------------------------
# The normalizations. Each is `f(p, stats, h, cfg, train) -> (normalized h, new stats)` where
# `h` is `[N, H, W, C]` (CNN) or `[N, C]` (one RNN time step), `p` holds `scale`, `bias` and
# `tau` (`[C]`) and `stats` is an `nj.BatchStats`; a variant uses what it needs.

def _batch(p, s, h, cfg, train):
  return nj.batch_norm(h, p["scale"], p["bias"], s, train=train, momentum=cfg.bn_momentum)


def _renorm(p, s, h, cfg, train):
  # Ioffe (2017): r_max 3, d_max 5, after 5% of the steps of plain batch norm (so that the
  # running statistics that r and d are measured against have settled).
  warmup = max(1, (cfg.num_chunks * cfg.steps_per_chunk) // 20)
  return nj.batch_renorm(h, p["scale"], p["bias"], s, train=train, momentum=cfg.bn_momentum,
                         r_max=3.0, d_max=5.0, warmup_steps=warmup)


def _ghost(p, s, h, cfg, train):
  k = math.gcd(h.shape[0], cfg.ghost_size)     # virtual batches of k examples
  return nj.batch_norm(h, p["scale"], p["bias"], s, train=train, momentum=cfg.bn_momentum,
                       virtual_batch_size=k if train else None)


def _features(h):
  return tuple(range(1, h.ndim))               # per example: (H, W, C), or (C,) in the RNN


def _channels(v, h):
  return v.reshape((1,) * (h.ndim - 1) + (-1,))   # [C] -> [1, ..., 1, C]


def _layer(p, s, h, cfg, train):
  y = nj.layer_norm(h, axis=_features(h))         # per-channel affine, as in Wu & He (2018)
  return y * _channels(p["scale"], h) + _channels(p["bias"], h), s


def _rms(p, s, h, cfg, train):
  return nj.rms_norm(h, axis=_features(h)) * _channels(p["scale"], h), s


def _instance(p, s, h, cfg, train):
  return nj.instance_norm(h, p["scale"], p["bias"]), s


def _group(p, s, h, cfg, train):
  return nj.group_norm(h, p["scale"], p["bias"], num_groups=cfg.groups), s


def _frn(p, s, h, cfg, train):
  # Filter response norm + TLU, max(y, tau): the TLU replaces the ReLU.
  return nj.filter_response_norm(h, p["scale"], p["bias"], p["tau"]), s


def _none(p, s, h, cfg, train):
  return h, s


class Variant(NamedTuple):
  norm: Callable[..., Any]
  relu: bool = True                   # False: the norm ends in its own activation (FRN's TLU)
  standardize_weights: bool = False   # weight standardization of the conv kernels (Qiao 2019)


VARIANTS: dict[str, Variant] = {
    "none": Variant(_none),
    "batch": Variant(_batch),
    "batch_renorm": Variant(_renorm),
    "ghost_batch": Variant(_ghost),
    "layer": Variant(_layer),
    "instance": Variant(_instance),
    "group": Variant(_group),
    "rms": Variant(_rms),
    "frn": Variant(_frn, relu=False),
    "group_ws": Variant(_group, standardize_weights=True),
}
RNN_VARIANTS = ("none", "batch", "layer", "rms")   # per-timestep statistics for "batch"


# ---------------------------------------------------------------------------------------------
# Parameters, drawn with NumPy (deterministic per seed, nothing to compile).

def _norm_params(shape: tuple[int, ...]) -> Params:
  return {"scale": np.ones(shape, np.float32), "bias": np.zeros(shape, np.float32),
          "tau": np.zeros(shape, np.float32)}


def init_params(rng: np.random.Generator, cfg: Config, init_scale: float = 1.0) -> Params:
  """He-normal conv kernels times `init_scale`, LeCun-normal head, zero biases."""
  c, d = cfg.width, cfg.depth
  if cfg.model == "rnn":
    return {"w_x": (init_scale * rng.standard_normal((8, c)) / np.sqrt(8)).astype(np.float32),
            "w_h": (init_scale * rng.standard_normal((c, c)) / np.sqrt(c)).astype(np.float32),
            "b": np.zeros((c,), np.float32), "norm": _norm_params((c,)),
            "head": {"kernel": (rng.standard_normal((c, 10)) / np.sqrt(c)).astype(np.float32),
                     "bias": np.zeros((10,), np.float32)}}
  he = lambda fan_in, shape: init_scale * np.sqrt(2.0 / fan_in) * rng.standard_normal(shape)
  return {
      "stem": {"kernel": he(9, (3, 3, 1, c)).astype(np.float32), "bias": np.zeros((c,), np.float32)},
      "blocks": {"kernel": he(9 * c, (d, 3, 3, c, c)).astype(np.float32),
                 "bias": np.zeros((d, c), np.float32), **_norm_params((d, c))},
      "head": {"kernel": (rng.standard_normal((c, 10)) / np.sqrt(c)).astype(np.float32),
               "bias": np.zeros((10,), np.float32)}}


def init_state(cfg: Config) -> nj.BatchStats:
  """Running statistics per block (CNN) or per time step (RNN), stacked on axis 0."""
  stats = nj.init_batch_stats(cfg.width)
  n = 8 if cfg.model == "rnn" else cfg.depth
  return jax.tree.map(lambda a: jnp.stack([a] * n), stats)


# ---------------------------------------------------------------------------------------------
# The models: `forward(params, state, x, which, cfg, train, drop) -> (logits [N, 10], state)`.
# `which` indexes `names` (a traced int); `drop` is `(rate, key)` or None.

def conv3x3(x: jax.Array, kernel: jax.Array, bias: jax.Array, stride: int = 1) -> jax.Array:
  """3x3 convolution, padding 1: `[N, H, W, Ci]`, `[3, 3, Ci, Co]` -> `[N, H/stride, W/stride, Co]`.

  The nine shifted views concatenated and one matmul (equal to `lax.conv_general_dilated`,
  faster for 8x8 images on CPU, and a plain batched matmul under `jax.vmap` over seeds).
  """
  n, h, w, c = x.shape
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  taps = [xp[:, i:i + h:stride, j:j + w:stride] for i in range(3) for j in range(3)]
  return jnp.concatenate(taps, axis=-1) @ kernel.reshape(9 * c, -1) + bias.reshape(1, 1, 1, -1)


def cnn_forward(params, state, x, which, names, cfg, train, drop=None):
  def branch(v, p, stats, h):
    kernel = nj.weight_standardize(p["kernel"]) if v.standardize_weights else p["kernel"]
    y, stats = v.norm(p, stats, conv3x3(h, kernel, p["bias"]), cfg, train)
    return (jax.nn.relu(y) if v.relu else y), stats

  def block(h, layer):
    p, stats, i = layer
    branches = [functools.partial(branch, VARIANTS[n]) for n in names]
    h, stats = jax.lax.switch(which, branches, p, stats, h)
    if drop is not None:
      rate, key = drop
      keep = jax.random.bernoulli(jax.random.fold_in(key, i), 1.0 - rate, h.shape)
      h = jnp.where(keep, h / (1.0 - rate), 0.0)
    return h, stats

  h = conv3x3(x, params["stem"]["kernel"], params["stem"]["bias"], 2)   # [N, 4, 4, C]
  h, state = jax.lax.scan(block, h, (params["blocks"], state, jnp.arange(cfg.depth)))
  return _common.head(h, params["head"]), state


def rnn_forward(params, state, x, which, names, cfg, train, drop=None):
  """x `[N, 8, 8, 1]` read row by row: `h_t = tanh(norm(x_t W_x + h_{t-1} W_h + b))`."""
  branches = [functools.partial(VARIANTS[n].norm, cfg=cfg, train=train) for n in names]

  def step(h, inputs):
    row, stats = inputs                                   # [N, 8], BatchStats of this step
    pre = row @ params["w_x"] + h @ params["w_h"] + params["b"].reshape(1, -1)
    y, stats = jax.lax.switch(which, branches, params["norm"], stats, pre)
    return jnp.tanh(y), stats

  rows = jnp.moveaxis(x[..., 0], 1, 0)                    # [8, N, 8]
  h0 = jnp.zeros((x.shape[0], cfg.width), x.dtype)
  h, state = jax.lax.scan(step, h0, (rows, state))
  return _common.head(h[:, None, None, :], params["head"]), state


# ---------------------------------------------------------------------------------------------
# Training: one jitted program per Config; vmapped over runs, scanned over steps.

def make_train(names: Sequence[str], cfg: Config) -> Callable[..., Any]:
  """`train(which, params [R], order [R, E], lr [R], drop_rate [R], data) -> metrics [R]`.

  `order` holds the indices of the `E = num_chunks * steps_per_chunk * batch_size` training
  examples each run sees; `data` is `(x_train, y_train, x_test, y_test)`. Returns the curves
  (`[R, num_chunks]` train loss/accuracy in train mode, test loss/accuracy in eval mode) and the
  final eval-mode accuracy on the whole training and test sets.
  """
  forward = rnn_forward if cfg.model == "rnn" else cnn_forward
  num_steps = cfg.num_chunks * cfg.steps_per_chunk

  def run(which, params, order, lr, drop_rate, data):
    x_train, y_train, x_test, y_test = data
    optimizer = _common.make_optimizer(lr, num_steps)     # SGD + momentum, warmup + cosine
    opt_state = optimizer.init(params)
    key = jax.random.key(0)

    def loss_fn(params, state, x, y, step):
      drop = (drop_rate, jax.random.fold_in(key, step)) if cfg.dropout else None
      logits, state = forward(params, state, x, which, names, cfg, True, drop)
      loss, acc = _common.cross_entropy(logits, y)
      return loss, (state, acc)

    def train_step(carry, idx):
      params, state, opt_state, step = carry
      (loss, (state, acc)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
          params, state, x_train[idx], y_train[idx], step)
      updates, opt_state = optimizer.update(grads, opt_state, params)
      params = jax.tree.map(lambda p, u: p + u, params, updates)
      return (params, state, opt_state, step + 1), (loss, acc)

    def evaluate(params, state, x, y):
      logits, _ = forward(params, state, x, which, names, cfg, False)
      return _common.cross_entropy(logits, y)

    def chunk(carry, idx):
      carry, (losses, accs) = jax.lax.scan(train_step, carry, idx)
      test_loss, test_acc = evaluate(carry[0], carry[1], x_test, y_test)
      return carry, {"train_loss": losses.mean(), "train_acc": accs.mean(),
                     "test_loss": test_loss, "test_acc": test_acc}

    carry = (params, init_state(cfg), opt_state, jnp.zeros((), jnp.int32))
    order = order.reshape(cfg.num_chunks, cfg.steps_per_chunk, cfg.batch_size)
    (params, state, _, _), curves = jax.lax.scan(chunk, carry, order)
    return {"curves": curves, "test_acc": curves["test_acc"][-1],
            "train_acc": evaluate(params, state, x_train, y_train)[1]}

  return jax.jit(jax.vmap(run, in_axes=(None, 0, 0, 0, 0, None)))
