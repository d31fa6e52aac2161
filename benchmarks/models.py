"""Whole-model cases: a pre-LN transformer block stack and a ResNet-style CNN.

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

import normjax.linen as njnn

EPS = 1e-5
FWD_RTOL = 1e-4    # asserted: max |y_normjax - y_flax| <= FWD_RTOL * max(1, max |y_flax|)
GRAD_RTOL = 1e-3   # flagged (not asserted): max |g_normjax - g_flax| / max |g_flax|, per leaf
GRAD_FLOOR = 1e-2  # ... with max |g_flax| at least GRAD_FLOOR * the largest gradient of any leaf


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
    if self.kind == "transformer":
      return (f"transformer {self.norm} {self.blocks}x d{self.d_model} h{self.heads} "
              f"s{self.seq} b{self.batch}" + (" fused" if self.fused else ""))
    w = "-".join(str(c) for c in self.widths)
    return (f"resnet {self.norm} {self.image}x{self.image}x3 w{w}x{self.blocks_per_stage} "
            f"b{self.batch}")

  @property
  def input_shape(self) -> tuple:
    if self.kind == "transformer":
      return (self.batch, self.seq, self.d_model)
    return (self.batch, self.image, self.image, 3)


def model_cases(quick: bool) -> list[ModelCase]:
  """The model suite; `quick` shrinks every model to a smoke-test size (same code paths)."""
  if quick:
    t = dict(batch=2, blocks=1, d_model=64, heads=2, seq=16)
    r = dict(batch=4, image=8, widths=(8, 16), blocks_per_stage=1, groups=4)
  else:
    t = dict(batch=8, blocks=4, d_model=512, heads=8, seq=256)
    r = dict(batch=32, image=32, widths=(16, 32, 64), blocks_per_stage=2, groups=8)
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


def make_model(case: ModelCase, impl: str) -> nn.Module:
  """The model of `case` with `impl`'s ("flax" or "normjax") normalization class."""
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
  if case.kind == "transformer":
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
    if case.kind == "transformer":
      value = jnp.mean((out - target) ** 2)
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
  assert fwd_diff <= FWD_RTOL * scale, f"{case.name}: forward outputs differ by {fwd_diff}"
  (la, ga), (lb, gb) = (a.loss, a.grads), (b.loss, b.grads)
  assert jax.tree.structure(ga) == jax.tree.structure(gb), case.name
  loss_diff = abs(la - lb)
  assert loss_diff <= FWD_RTOL * max(1.0, abs(float(lb))), f"{case.name}: loss {la} vs {lb}"
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
