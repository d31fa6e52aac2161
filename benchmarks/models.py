"""Whole-model cases: a pre-LN transformer block stack, a ResNet-style CNN, a DiT block and a
Gemma-style block.

Each model is one `flax.linen` module tree, built twice: with flax's own normalization class
and with `normjax.linen`'s namesake (`norm_class`), everything else identical. The variables are
initialised ONCE, with the flax build, and the same tree (params, and batch_stats for batch
norm) is fed to both builds; before timing, `check_agreement` asserts that the normjax build's
own `init` gives the same tree structure, shapes and dtypes, and that the eval forward outputs
(and the training loss and gradients) agree.

Two programs are timed per model and candidate, both `jax.jit`-compiled once up front:

* `fwd`: the eval forward (`train=False`; batch norm uses the running statistics);
* `train`: one full training step on a fixed batch: loss, `jax.value_and_grad`, an
  `optax.adamw` update of the params, and the new `batch_stats` for batch norm. The step is
  called with the same (params, opt_state, batch_stats, batch) each time (no donation), so
  every call does the same work.

Memory is XLA's own account of each compiled program (`compiled.memory_analysis()`): the temp
buffer, the arguments and the outputs, in bytes.

The two blocks of issue 28 (`python benchmarks/run.py --blocks`, results in
`models_blocks.{md,json}`) are built from normjax's layers and, on the flax side, from flax's
modules plus the modulation written by hand, with the same variable tree (names, shapes):

* `dit`: a DiT block (adaLN-Zero; Peebles & Xie, 2023) on `[B, T, D]` tokens and a `[B, D]`
  conditioning vector: `x + gate1 * attn(modulate(norm(x)))`, then `x + gate2 *
  mlp(modulate(norm(x)))` (GELU, `mlp_ratio`x). normjax: `normjax.linen.AdaptiveLayerNorm`
  (its Dense `modulation` on `silu(c)`, `shift, scale, gate`, one normalize step); flax:
  `nn.LayerNorm(use_scale=False, use_bias=False, epsilon=1e-6)`, a Dense `modulation` on
  `silu(c)` split the same way and `x * (1 + scale) + shift` by hand. float32.
* `gemma`: a Gemma-style block (pre-norm attention and GeGLU MLP, then the final norm) with
  zero-centered RMS norms (`w` initialised to zeros, applied as `1 + w`) and a float32
  residual stream around bfloat16 attention and MLP. normjax: `normjax.linen.RMSNorm(
  scale_offset=1.0)` on the stream, then `nj.add_rms_norm(..., scale_offset=1.0,
  residual_dtype=jnp.float32)` for each residual add + norm; flax: `nn.RMSNorm(
  use_scale=False)` times `(1 + w)` by hand in float32 on the float32 stream `h = h +
  delta.astype(float32)`, rounded to bfloat16.

Their all-zero parameters after flax's `init` (adaLN-Zero's modulation, Gemma's norm weights,
the Dense biases) are replaced by small random values (a trained block's, and gradients that
do not vanish); both builds run on the same variables, as the other models.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import normjax as nj
import normjax.linen as njnn

EPS = 1e-5
FWD_RTOL = 1e-4    # asserted: max |y_normjax - y_flax| <= FWD_RTOL * max(1, max |y_flax|)
GRAD_RTOL = 1e-3   # flagged (not asserted): max |g_normjax - g_flax| / max |g_flax|, per leaf
GRAD_FLOOR = 1e-2  # ... with max |g_flax| at least GRAD_FLOOR * the largest gradient of any leaf
BF16_FWD_RTOL = 3e-2   # the same, for the bfloat16 Gemma block (a few bfloat16 roundings apart)
BLOCKS = ("dit", "gemma")


@dataclasses.dataclass(frozen=True)
class ModelCase:
  """One model: `kind` transformer (norm layer | rms) or resnet (norm batch | group)."""
  kind: str
  norm: str
  batch: int
  # transformer
  blocks: int = 4
  d_model: int = 512
  heads: int = 8
  seq: int = 256
  mlp_ratio: int = 4
  fused: bool = False   # normjax build: residual add + norm as one AddLayerNorm/AddRMSNorm call
  # resnet
  image: int = 32
  widths: tuple = (16, 32, 64)
  blocks_per_stage: int = 2
  groups: int = 8
  classes: int = 10

  @property
  def name(self) -> str:
    if self.kind in BLOCKS:
      what = {"dit": "adaLN-Zero", "gemma": "zero-centered rms f32-residual bf16"}[self.kind]
      return (f"{self.kind} block {what} d{self.d_model} h{self.heads} s{self.seq} "
              f"b{self.batch}")
    if self.kind == "transformer":
      return (f"transformer {self.norm} {self.blocks}x d{self.d_model} h{self.heads} "
              f"s{self.seq} b{self.batch}" + (" fused" if self.fused else ""))
    w = "-".join(str(c) for c in self.widths)
    return (f"resnet {self.norm} {self.image}x{self.image}x3 w{w}x{self.blocks_per_stage} "
            f"b{self.batch}")

  @property
  def fwd_rtol(self) -> float:
    return BF16_FWD_RTOL if self.kind == "gemma" else FWD_RTOL

  @property
  def input_shape(self) -> tuple:
    if self.kind in BLOCKS or self.kind == "transformer":
      return (self.batch, self.seq, self.d_model)
    return (self.batch, self.image, self.image, 3)


def model_cases(quick: bool, blocks: bool = False) -> list[ModelCase]:
  """The model suite (`blocks`: the DiT and Gemma blocks instead); `quick` shrinks every model
  to a smoke-test size (same code paths)."""
  if quick:
    t = dict(batch=2, blocks=1, d_model=64, heads=2, seq=16)
    r = dict(batch=4, image=8, widths=(8, 16), blocks_per_stage=1, groups=4)
  else:
    t = dict(batch=8, blocks=4, d_model=512, heads=8, seq=256)
    r = dict(batch=32, image=32, widths=(16, 32, 64), blocks_per_stage=2, groups=8)
  if blocks:
    return [ModelCase(kind, norm, **dict(t, blocks=1))
            for kind, norm in (("dit", "adaln"), ("gemma", "rms"))]
  return ([ModelCase("transformer", n, **t) for n in ("layer", "rms")] +
          [ModelCase("resnet", n, **r) for n in ("batch", "group")])


# --- the models ---------------------------------------------------------------------------------

def norm_class(impl: str, norm: str) -> type:
  """The normalization class swapped between the two builds (same name, same attributes)."""
  lib = nn if impl == "flax" else njnn
  return {"layer": lib.LayerNorm, "rms": lib.RMSNorm, "batch": lib.BatchNorm,
          "group": lib.GroupNorm}[norm]


def _residual_norm(norm, add_norm, name, x, delta):
  """`(norm(x + delta), x + delta)` (`delta` None: nothing to add): one `add_norm` call (the
  fused `AddLayerNorm`/`AddRMSNorm`, same variables) when given, else the add then `norm`."""
  if delta is None:
    return norm(name=name)(x), x
  if add_norm is not None:
    return add_norm(name=name)(delta, x)
  x = x + delta
  return norm(name=name)(x), x


class Block(nn.Module):
  """Pre-LN transformer block: x + attn(norm(x)), then x + mlp(norm(x)) (GELU, `mlp_ratio`x).

  Takes and returns the residual stream as `(x, delta)` (its value is `x + delta`; `delta`
  None for the first block) so that every residual add can meet the following norm
  (`add_norm`); the values are the same either way."""
  norm: Callable[..., nn.Module]
  d_model: int
  heads: int
  mlp_ratio: int
  add_norm: Callable[..., nn.Module] | None = None

  @nn.compact
  def __call__(self, x, delta=None):
    h, x = _residual_norm(self.norm, self.add_norm, "norm1", x, delta)
    a = nn.MultiHeadDotProductAttention(num_heads=self.heads, deterministic=True,
                                        name="attn")(h, h)
    h, x = _residual_norm(self.norm, self.add_norm, "norm2", x, a)
    h = nn.gelu(nn.Dense(self.mlp_ratio * self.d_model, name="mlp_in")(h))
    return x, nn.Dense(self.d_model, name="mlp_out")(h)


class Transformer(nn.Module):
  """`blocks` pre-LN blocks and a final norm on `[batch, seq, d_model]` input (no embedding)."""
  norm: Callable[..., nn.Module]
  blocks: int
  d_model: int
  heads: int
  mlp_ratio: int
  add_norm: Callable[..., nn.Module] | None = None

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train   # no dropout, no batch statistics
    delta = None
    for i in range(self.blocks):
      x, delta = Block(self.norm, self.d_model, self.heads, self.mlp_ratio, self.add_norm,
                       name=f"block{i}")(x, delta)
    return _residual_norm(self.norm, self.add_norm, "norm_f", x, delta)[0]


class ResBlock(nn.Module):
  """conv3x3 -> norm -> relu -> conv3x3 -> norm, + shortcut (conv1x1 -> norm when the shape
  changes), -> relu."""
  norm: Callable[..., nn.Module]
  batch_norm: bool
  features: int
  strides: int

  def _norm(self, x, train, name):
    m = self.norm(name=name)
    return m(x, use_running_average=not train) if self.batch_norm else m(x)

  @nn.compact
  def __call__(self, x, train: bool):
    s = (self.strides, self.strides)
    y = nn.Conv(self.features, (3, 3), s, padding="SAME", use_bias=False, name="conv1")(x)
    y = nn.relu(self._norm(y, train, "norm1"))
    y = nn.Conv(self.features, (3, 3), padding="SAME", use_bias=False, name="conv2")(y)
    y = self._norm(y, train, "norm2")
    if self.strides != 1 or x.shape[-1] != self.features:
      x = nn.Conv(self.features, (1, 1), s, use_bias=False, name="proj")(x)
      x = self._norm(x, train, "proj_norm")
    return nn.relu(x + y)


class ResNet(nn.Module):
  """Stem conv3x3 -> norm -> relu, stages of `ResBlock`s (stride 2 entering every stage but the
  first), global average pool, dense classifier. NHWC input."""
  norm: Callable[..., nn.Module]
  batch_norm: bool
  widths: tuple
  blocks_per_stage: int
  classes: int

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(self.widths[0], (3, 3), padding="SAME", use_bias=False, name="stem")(x)
    m = self.norm(name="stem_norm")
    x = nn.relu(m(x, use_running_average=not train) if self.batch_norm else m(x))
    for i, w in enumerate(self.widths):
      for j in range(self.blocks_per_stage):
        x = ResBlock(self.norm, self.batch_norm, w, 2 if (i > 0 and j == 0) else 1,
                     name=f"stage{i}_block{j}")(x, train)
    return nn.Dense(self.classes, name="head")(jnp.mean(x, axis=(1, 2)))


class FlaxAdaLN(nn.Module):
  """adaLN-Zero written by hand with flax's modules: `(LayerNorm(x) * (1 + scale) + shift,
  gate)`, `shift, scale, gate` from a zero-initialised Dense `modulation` on `silu(cond)`
  (the variables of `normjax.linen.AdaptiveLayerNorm`)."""
  epsilon: float = 1e-6

  @nn.compact
  def __call__(self, x, cond):
    m = nn.Dense(3 * x.shape[-1], kernel_init=nn.initializers.zeros, name="modulation")(
        nn.silu(cond))
    shift, scale, gate = (p[:, None, :] for p in jnp.split(m, 3, axis=-1))
    y = nn.LayerNorm(epsilon=self.epsilon, use_scale=False, use_bias=False)(x)
    return y * (1 + scale) + shift, gate


class DiTBlock(nn.Module):
  """DiT block (adaLN-Zero) on `(x, cond)`: `x + gate * attn(adaLN(x))`, then `x + gate *
  mlp(adaLN(x))`; `ada` is `normjax.linen.AdaptiveLayerNorm` or `FlaxAdaLN`."""
  ada: Callable[..., nn.Module]
  heads: int
  mlp_ratio: int

  @nn.compact
  def __call__(self, inputs, train: bool = False):
    del train
    x, cond = inputs
    y, gate = self.ada(name="ada1")(x, cond)
    x = x + gate * nn.MultiHeadDotProductAttention(num_heads=self.heads, deterministic=True,
                                                   name="attn")(y, y)
    y, gate = self.ada(name="ada2")(x, cond)
    y = nn.Dense(self.mlp_ratio * x.shape[-1], name="mlp_in")(y)
    return x + gate * nn.Dense(x.shape[-1], name="mlp_out")(nn.gelu(y))


class ZeroRMS(nn.Module):
  """Gemma's RMS norm of the float32 stream `h`, `w` (`scale`, zeros at init) applied as
  `1 + w` in float32, the result in bfloat16; `(y, h)`. `delta` given: `h = h + delta` in
  float32 first. normjax (`delta` needed): `nj.add_rms_norm(..., scale_offset=1.0,
  residual_dtype=float32)`; flax: `nn.RMSNorm(use_scale=False)` and `1 + w` by hand."""
  impl: str
  epsilon: float = 1e-6

  @nn.compact
  def __call__(self, h, delta=None):
    w = self.param("scale", nn.initializers.zeros, (h.shape[-1],))
    if self.impl == "normjax":
      return nj.add_rms_norm(delta, h, w, eps=self.epsilon, scale_offset=1.0,
                             residual_dtype=jnp.float32)
    h = h if delta is None else h + delta.astype(jnp.float32)
    y = nn.RMSNorm(epsilon=self.epsilon, use_scale=False)(h) * (1 + w)
    return y.astype(jnp.bfloat16), h


class GemmaBlock(nn.Module):
  """Gemma-style block on the float32 stream `x`: `h = x + attn(norm(x))`, then `h + mlp(
  norm(h))` (GeGLU, bfloat16), then the final norm; the first norm is normjax's `RMSNorm(
  scale_offset=1.0)` or flax's by hand, the others `ZeroRMS` with the residual add inside."""
  impl: str
  heads: int
  mlp_ratio: int

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train
    bf16, d = jnp.bfloat16, x.shape[-1]
    if self.impl == "normjax":   # the same variable, norm1/scale
      y, h = njnn.RMSNorm(scale_offset=1.0, scale_init=nn.initializers.zeros, dtype=bf16,
                          name="norm1")(x), x
    else:
      y, h = ZeroRMS(self.impl, name="norm1")(x)
    a = nn.MultiHeadDotProductAttention(num_heads=self.heads, dtype=bf16, deterministic=True,
                                        name="attn")(y, y)
    y, h = ZeroRMS(self.impl, name="norm2")(h, a)
    gate = nn.Dense(self.mlp_ratio * d, dtype=bf16, name="mlp_gate")(y)
    up = nn.Dense(self.mlp_ratio * d, dtype=bf16, name="mlp_up")(y)
    m = nn.Dense(d, dtype=bf16, name="mlp_down")(nn.gelu(gate) * up)
    return ZeroRMS(self.impl, name="norm_f")(h, m)[0]


def make_model(case: ModelCase, impl: str) -> nn.Module:
  """The model of `case` with `impl`'s ("flax" or "normjax") normalization class."""
  if case.kind == "dit":
    ada = njnn.AdaptiveLayerNorm if impl == "normjax" else FlaxAdaLN
    return DiTBlock(ada, case.heads, case.mlp_ratio)
  if case.kind == "gemma":
    return GemmaBlock(impl, case.heads, case.mlp_ratio)
  cls = norm_class(impl, case.norm)
  if case.kind == "transformer":
    add_norm = None
    if case.fused and impl == "normjax":
      add_cls = {"layer": njnn.AddLayerNorm, "rms": njnn.AddRMSNorm}[case.norm]
      add_norm = functools.partial(add_cls, epsilon=EPS)
    return Transformer(functools.partial(cls, epsilon=EPS), case.blocks, case.d_model,
                       case.heads, case.mlp_ratio, add_norm)
  if case.norm == "batch":
    norm = functools.partial(cls, momentum=0.9, epsilon=EPS)
  else:
    norm = functools.partial(cls, num_groups=case.groups, epsilon=EPS)
  return ResNet(norm, case.norm == "batch", case.widths, case.blocks_per_stage, case.classes)


def make_batch(case: ModelCase, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """(input, target): a regression target for the transformer, class labels for the ResNet."""
  rng = np.random.default_rng(seed)
  x = rng.standard_normal(case.input_shape, dtype=np.float32)
  if case.kind == "dit":   # tokens and the conditioning vector (DiT's c: d_model features)
    cond = rng.standard_normal((case.batch, case.d_model), dtype=np.float32)
    return (x, cond), rng.standard_normal(case.input_shape, dtype=np.float32)
  if case.kind in ("transformer", "gemma"):
    return x, rng.standard_normal(case.input_shape, dtype=np.float32)
  return x, rng.integers(0, case.classes, case.batch).astype(np.int32)


def init_key() -> jax.Array:
  """The init key. `rbg`: flax's `init` with the default threefry key compiles for ~30 s on a
  loaded 2-core machine even for the smoke-test models (about 4 s with rbg)."""
  return jax.random.key(0, impl="rbg")


def init_variables(case: ModelCase, x: np.ndarray) -> dict:
  """The shared variables: flax's `init`; for batch norm, running statistics taken from one
  training-mode pass over the batch (so the eval forward does not divide by the initial 1)."""
  model = make_model(case, "flax")
  variables = jax.jit(lambda k, x: model.init(k, x, train=False))(init_key(), x)
  if "batch_stats" in variables:
    stats = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"])[1])
    variables = {**variables, "batch_stats": stats(variables, x)["batch_stats"]}
  if case.kind in BLOCKS:   # adaLN-Zero's modulation, Gemma's norm weights: trained values
    rng = np.random.default_rng(1)
    variables = {**variables, "params": jax.tree.map(
        lambda p: (jnp.asarray(0.05 * rng.standard_normal(p.shape), p.dtype)
                   if not np.any(np.asarray(p)) else p), variables["params"])}
  return variables


def loss_fn(case: ModelCase, model: nn.Module) -> Callable:
  """loss(params, batch_stats, x, target) -> (loss, new batch_stats)."""
  def loss(params, batch_stats, x, target):
    variables = {"params": params}
    if batch_stats is not None:
      variables["batch_stats"] = batch_stats
      out, upd = model.apply(variables, x, train=True, mutable=["batch_stats"])
      batch_stats = upd["batch_stats"]
    else:
      out = model.apply(variables, x, train=True)
    if case.kind != "resnet":
      value = jnp.mean((out.astype(jnp.float32) - target) ** 2)
    else:
      value = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(out, target))
    return value, batch_stats
  return loss


ADAM_B1 = 0.9
OPTIMIZER = optax.adamw(1e-3, b1=ADAM_B1, weight_decay=1e-4)


def programs(case: ModelCase, model: nn.Module) -> tuple[Callable, Callable]:
  """(fwd, train_step): the timed eval forward and training step."""
  loss = loss_fn(case, model)

  def fwd(variables, x):
    return model.apply(variables, x, train=False)

  def train_step(params, opt_state, batch_stats, x, target):
    (value, batch_stats), grads = jax.value_and_grad(loss, has_aux=True)(
        params, batch_stats, x, target)
    updates, opt_state = OPTIMIZER.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, batch_stats, value

  return fwd, train_step


# --- building, checking, timing -----------------------------------------------------------------

def memory(compiled) -> dict | None:
  """XLA's buffer account of a compiled program, in bytes (None where not reported)."""
  try:
    m = compiled.memory_analysis()
    return {"temp": int(m.temp_size_in_bytes), "argument": int(m.argument_size_in_bytes),
            "output": int(m.output_size_in_bytes), "alias": int(m.alias_size_in_bytes)}
  except Exception:  # pylint: disable=broad-except  # not every backend reports it
    return None


@dataclasses.dataclass
class BuiltModel:
  """One candidate's compiled programs, bound to the shared inputs."""
  fwd: Callable[[], Any]
  train: Callable[[], Any]
  fwd_out: np.ndarray
  loss: float          # of the training step's batch
  grads: Any           # recovered from adamw's first moment after the step (see `first_step`)
  compile_s: dict
  memory: dict


def build_model(case: ModelCase, impl: str, variables: dict, x, target, device) -> BuiltModel:
  """Compiles `impl`'s eval forward and training step on the shared `variables` and batch."""
  model = make_model(case, impl)
  fwd, train_step = programs(case, model)
  put = lambda t: jax.device_put(t, device)
  variables, x, target = put(variables), put(x), put(target)
  params, stats = variables["params"], variables.get("batch_stats")
  opt_state = put(OPTIMIZER.init(params))
  fargs, targs = (variables, x), (params, opt_state, stats, x, target)
  compile_s, mem = {}, {}
  t0 = time.perf_counter()
  cf = jax.jit(fwd).lower(*fargs).compile()
  compile_s["fwd"] = time.perf_counter() - t0
  t0 = time.perf_counter()
  ct = jax.jit(train_step).lower(*targs).compile()
  compile_s["train"] = time.perf_counter() - t0
  mem["fwd"], mem["train"] = memory(cf), memory(ct)
  fwd_out = np.asarray(jax.block_until_ready(cf(*fargs)), np.float32)
  loss, grads = first_step(jax.block_until_ready(ct(*targs)))
  return BuiltModel(fwd=lambda: jax.block_until_ready(cf(*fargs)),
                    train=lambda: jax.block_until_ready(ct(*targs)),
                    fwd_out=fwd_out, loss=loss, grads=grads, compile_s=compile_s, memory=mem)


def first_step(out) -> tuple[float, Any]:
  """(loss, gradients) of a training step's output from a fresh optimizer state: adam's first
  moment after one step is exactly `(1 - b1) * grads`, so the timed program itself gives the
  gradients to compare (no second compiled program)."""
  _, opt_state, _, loss = out
  mu = optax.tree_utils.tree_get(opt_state, "mu")
  return float(loss), jax.tree.map(lambda m: np.asarray(m) / (1 - ADAM_B1), mu)


def check_agreement(case: ModelCase, variables: dict, x: np.ndarray, built: dict) -> dict:
  """Same variable tree from both builds' `init`; eval outputs and loss agree; gradients
  compared.

  Raises AssertionError on a mismatch of the tree, the eval outputs or the loss (a benchmark of
  two different programs means nothing). The gradient difference (the worst leaf's, relative to
  that leaf's largest flax gradient, floored at `GRAD_FLOOR` x the largest of all leaves so that
  gradients that are zero in exact arithmetic, like an attention key bias's, do not count
  their roundoff) is recorded and flagged above `GRAD_RTOL`, not asserted:
  float32 gradients through a stack of normalizations legitimately differ in the last digits,
  and a larger gap is a numerical finding to report, not a reason to drop the timing.
  """
  ref = jax.eval_shape(lambda: variables)
  for impl in built:
    own = jax.eval_shape(lambda m=make_model(case, impl): m.init(init_key(), x,
                                                                 train=False))
    assert jax.tree.structure(own) == jax.tree.structure(ref), (impl, case.name)
    assert jax.tree.leaves(own) == jax.tree.leaves(ref), (impl, case.name)
  a, b = built["normjax"], built["flax"]
  scale = max(1.0, float(np.max(np.abs(b.fwd_out))))
  fwd_diff = float(np.max(np.abs(a.fwd_out - b.fwd_out)))
  assert fwd_diff <= case.fwd_rtol * scale, f"{case.name}: forward outputs differ by {fwd_diff}"
  (la, ga), (lb, gb) = (a.loss, a.grads), (b.loss, b.grads)
  assert jax.tree.structure(ga) == jax.tree.structure(gb), case.name
  loss_diff = abs(la - lb)
  assert loss_diff <= case.fwd_rtol * max(1.0, abs(float(lb))), f"{case.name}: loss {la} vs {lb}"
  gmax = max(float(np.max(np.abs(g))) for g in jax.tree.leaves(gb))
  grad_diff = max(float(np.max(np.abs(p - q)))
                  for p, q in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)))
  per_leaf = [(float(np.max(np.abs(p - q)) / max(float(np.max(np.abs(q))), GRAD_FLOOR * gmax,
                                                   1e-30)),
               jax.tree_util.keystr(k))
              for (k, q), p in zip(jax.tree_util.tree_flatten_with_path(gb)[0],
                                   jax.tree.leaves(ga))]
  worst, leaf = max(per_leaf)
  return {"fwd_max_abs_diff": fwd_diff, "fwd_max_abs": scale, "loss_abs_diff": loss_diff,
          "grad_max_abs_diff": grad_diff, "grad_max_abs": gmax, "grad_leaf_rel_diff": worst,
          "grad_worst_leaf": leaf, "grad_flag": worst > GRAD_RTOL}


def run_model_case(case: ModelCase, timer: Callable, rounds: int, target_s: float,
                   device: Any) -> dict:
  """Builds both candidates, checks them, times fwd and train interleaved; one JSON record."""
  x, target = make_batch(case)
  variables = init_variables(case, x)
  n_params = sum(int(np.size(p)) for p in jax.tree.leaves(variables["params"]))
  built = {impl: build_model(case, impl, variables, x, target, device)
           for impl in ("normjax", "flax")}
  agreement = check_agreement(case, variables, x, built)
  times = {op: timer({k: getattr(b, op) for k, b in built.items()}, rounds, target_s)
           for op in ("fwd", "train")}
  rec = {"case": case.name, "kind": case.kind, "norm": case.norm,
         "input_shape": list(case.input_shape), "params": n_params,
         "config": dataclasses.asdict(case), "times": times,
         "compile_s": {k: b.compile_s for k, b in built.items()},
         "memory": {k: b.memory for k, b in built.items()}, "agreement": agreement}
  ratios = {op: times[op]["normjax"]["median_s"] / times[op]["flax"]["median_s"]
            for op in times}
  for op in ("fwd", "train"):
    m = {k: rec["memory"][k][op] for k in built}
    if all(v is not None for v in m.values()):
      ratios[f"{op}_temp"] = m["normjax"]["temp"] / max(1, m["flax"]["temp"])
      total = {k: v["temp"] + v["argument"] + v["output"] for k, v in m.items()}
      ratios[f"{op}_total"] = total["normjax"] / max(1, total["flax"])
  rec["ratios"] = ratios
  return rec
