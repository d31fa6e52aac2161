"""Benchmark cases and the candidates timed on each: normjax, flax.linen, PyTorch, the floors.

A case is one (variant, op, shape, dtype, layout). Every candidate of a case is built from the
same input values and returns a zero-argument callable that runs one call to completion
(`block_until_ready` for JAX, the call itself for PyTorch/NumPy), so the timer needs no
knowledge of the framework.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

import normjax as nj

GROUPS = 32
EPS = {"layer": 1e-5, "rms": 1e-6, "batch_train": 1e-5, "batch_eval": 1e-5, "group": 1e-5,
       "instance": 1e-5}


@dataclasses.dataclass(frozen=True)
class Case:
  variant: str     # layer | rms | batch_train | batch_eval | group | instance
  op: str          # fwd | fwdbwd
  shape: tuple     # x.shape as laid out in memory
  dtype: str       # float32 | bfloat16
  layout: str      # "N..C" (channels last) or "NC.." (channels first)

  @property
  def name(self) -> str:
    dims = "x".join(str(s) for s in self.shape)
    dt = "" if self.dtype == "float32" else f" {self.dtype.replace('float', 'f').replace('bf', 'bf')}"
    lay = " NCHW" if self.layout == "NC.." else ""
    return f"{self.variant} {self.op} {dims}{dt}{lay}"

  @property
  def channel_axis(self) -> int:
    return 1 if self.layout == "NC.." else -1

  @property
  def num_channels(self) -> int:
    return self.shape[self.channel_axis]

  @property
  def nbytes(self) -> int:
    return math.prod(self.shape) * np.dtype(jnp.dtype(self.dtype)).itemsize

  @property
  def bytes_moved(self) -> int:
    """One-pass traffic: read x, write y (2N); the backward adds read x, g, write dx (3N)."""
    return (2 if self.op == "fwd" else 5) * self.nbytes


def all_cases(quick: bool) -> list[Case]:
  """The suite. `quick` keeps two small shapes and the two ops, for a smoke run."""
  if quick:
    return [Case("layer", op, (8, 128, 256), "float32", "N..C") for op in ("fwd", "fwdbwd")] + [
        Case("group", op, (8, 16, 16, 64), "float32", "N..C") for op in ("fwd", "fwdbwd")] + [
        Case("batch_train", "fwd", (8, 16, 16, 64), "float32", "N..C")]
  t1, t2, odd, small = (8, 512, 1024), (4, 2048, 4096), (8, 512, 1023), (1, 128, 768)
  c1, c2, nchw = (64, 32, 32, 64), (32, 56, 56, 256), (32, 64, 56, 56)
  cases = []
  for op in ("fwd", "fwdbwd"):
    for shape, dtype in ((t1, "float32"), (t2, "float32"), (odd, "float32"), (small, "float32"),
                         (t1, "bfloat16")):
      cases.append(Case("layer", op, shape, dtype, "N..C"))
    for shape, dtype in ((t1, "float32"), (t2, "float32"), (small, "float32"), (t1, "bfloat16")):
      cases.append(Case("rms", op, shape, dtype, "N..C"))
    for variant in ("batch_train", "group", "instance"):
      for shape in (c1, c2):
        cases.append(Case(variant, op, shape, "float32", "N..C"))
      cases.append(Case(variant, op, nchw, "float32", "NC.."))
    cases.append(Case("group", op, c1, "bfloat16", "N..C"))
  cases += [Case("batch_eval", "fwd", s, "float32", "N..C") for s in (c1, c2)]
  return cases


# --- inputs -------------------------------------------------------------------------------------

def make_inputs(case: Case, seed: int = 0) -> dict[str, np.ndarray]:
  """Host (NumPy, float32) values shared by every candidate: x, the cotangent g, scale, bias."""
  rng = np.random.default_rng(seed)
  c = case.num_channels if case.variant not in ("layer", "rms") else case.shape[-1]
  return {
      "x": (rng.standard_normal(case.shape, dtype=np.float32) * 2.0 + 0.5),
      "g": rng.standard_normal(case.shape, dtype=np.float32),
      "scale": (1.0 + 0.1 * rng.standard_normal(c)).astype(np.float32),
      "bias": (0.1 * rng.standard_normal(c)).astype(np.float32),
      "mean": (0.1 * rng.standard_normal(c)).astype(np.float32),
      "var": (1.0 + 0.1 * rng.random(c)).astype(np.float32),
  }


# --- JAX candidates -----------------------------------------------------------------------------

@dataclasses.dataclass
class Built:
  """A candidate ready to time: `call()` runs it once; compile time and memory on the side."""
  call: Callable[[], Any]
  compile_s: float | None = None
  residual_bytes: int | None = None   # bytes the backward keeps from the forward
  temp_bytes: int | None = None       # XLA temp buffer of the compiled program
  output: Any = None                  # one output, for a sanity check of agreement


def _jax_fn(case: Case, impl: str) -> tuple[Callable, Callable[[dict], tuple]]:
  """Returns `(f, args_of)`: f(x, *params) -> y (or (y, aux)), and how to get its params."""
  ca, eps, v = case.channel_axis, EPS[case.variant], case.variant
  dt = jnp.dtype(case.dtype)
  if impl == "normjax":
    if v == "layer":
      return (lambda x, s, b: nj.layer_norm(x, s, b, eps=eps)), _sb
    if v == "rms":
      return (lambda x, s: nj.rms_norm(x, s, eps=eps)), _s
    if v == "group":
      return (lambda x, s, b: nj.group_norm(x, s, b, num_groups=GROUPS, channel_axis=ca,
                                            eps=eps)), _sb
    if v == "instance":
      return (lambda x, s, b: nj.instance_norm(x, s, b, channel_axis=ca, eps=eps)), _sb
    if v in ("batch_train", "batch_eval"):
      train = v == "batch_train"
      def bn(x, s, b, mean, var):
        stats = nj.BatchStats(mean, var, jnp.zeros((), jnp.int32))
        y, new = nj.batch_norm(x, s, b, stats, train=train, channel_axis=ca, eps=eps)
        return y, (new.mean, new.var)
      return bn, _sbmv
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  fast = impl == "flax"
  if v == "layer":
    m = nn.LayerNorm(epsilon=eps, dtype=dt, use_fast_variance=fast)
    return (lambda x, s, b: m.apply({"params": {"scale": s, "bias": b}}, x)), _sb
  if v == "rms":
    m = nn.RMSNorm(epsilon=eps, dtype=dt, use_fast_variance=fast)
    return (lambda x, s: m.apply({"params": {"scale": s}}, x)), _s
  if v == "group":
    if ca != -1:
      return None, None   # flax.linen.GroupNorm is channels-last only
    m = nn.GroupNorm(num_groups=GROUPS, epsilon=eps, dtype=dt, use_fast_variance=fast)
    return (lambda x, s, b: m.apply({"params": {"scale": s, "bias": b}}, x)), _sb
  if v == "instance":
    m = nn.InstanceNorm(epsilon=eps, dtype=dt, feature_axes=ca, use_fast_variance=fast)
    return (lambda x, s, b: m.apply({"params": {"scale": s, "bias": b}}, x)), _sb
  if v in ("batch_train", "batch_eval"):
    train = v == "batch_train"
    m = nn.BatchNorm(use_running_average=not train, axis=ca, momentum=0.99, epsilon=eps, dtype=dt,
                     use_fast_variance=fast)
    def bn(x, s, b, mean, var):
      variables = {"params": {"scale": s, "bias": b}, "batch_stats": {"mean": mean, "var": var}}
      if not train:
        return m.apply(variables, x), (mean, var)
      y, upd = m.apply(variables, x, mutable=["batch_stats"])
      return y, (upd["batch_stats"]["mean"], upd["batch_stats"]["var"])
    return bn, _sbmv
  raise ValueError(f"unknown variant {v!r}")


def _sb(h):
  return (h["scale"], h["bias"])


def _s(h):
  return (h["scale"],)


def _sbmv(h):
  return (h["scale"], h["bias"], h["mean"], h["var"])


# The variants the Pallas kernels cover (the rows plan: layer/RMS norm, NCHW instance norm).
PALLAS_VARIANTS = ("layer", "rms", "instance")


def _pallas_fn(case: Case) -> tuple[Callable | None, Callable[[dict], tuple]]:
  """normjax's function traced under `nj.implementation("pallas")` (None where no kernel)."""
  f, args_of = _jax_fn(case, "normjax")
  if case.variant not in PALLAS_VARIANTS or (case.variant == "instance"
                                             and case.layout != "NCHW"):
    return None, args_of

  def traced(*args):
    with nj.implementation("pallas"):
      return f(*args)
  return traced, args_of


def build_jax(case: Case, impl: str, host: dict, device: Any) -> Built | None:
  """normjax, normjax's Pallas kernels ("pallas") or flax ("flax" = default fast variance,
  "flax_slow" = use_fast_variance=False)."""
  f, args_of = _pallas_fn(case) if impl == "pallas" else _jax_fn(case, impl)
  if f is None:
    return None
  put = lambda a: jax.device_put(a, device)
  x = put(host["x"].astype(jnp.dtype(case.dtype)))
  g = put(host["g"].astype(jnp.dtype(case.dtype)))
  params = tuple(put(p) for p in args_of(host))
  has_aux = case.variant.startswith("batch")
  n_diff = min(len(params), 2)   # differentiate x, scale, bias (not running stats)

  if case.op == "fwd":
    program = f
    args = (x,) + params
  else:
    def program(x, g, *params):
      diff, rest = params[:n_diff], params[n_diff:]
      fx = lambda x, *d: f(x, *d, *rest)
      if has_aux:
        y, vjp, aux = jax.vjp(fx, x, *diff, has_aux=True)
        return y, vjp(g), aux
      y, vjp = jax.vjp(fx, x, *diff)
      return y, vjp(g)
    args = (x, g) + params
  t0 = time.perf_counter()
  compiled = jax.jit(program).lower(*args).compile()
  compile_s = time.perf_counter() - t0
  out = compiled(*args)
  jax.block_until_ready(out)
  residual = temp = None
  if case.op == "fwdbwd":
    diff, rest = params[:n_diff], params[n_diff:]
    fx = (lambda x, *d: f(x, *d, *rest)[0]) if has_aux else (lambda x, *d: f(x, *d, *rest))
    residual = residual_bytes(fx, x, *diff)
  try:
    temp = int(compiled.memory_analysis().temp_size_in_bytes)
  except Exception:  # pylint: disable=broad-except  # not every backend reports it
    temp = None
  return Built(call=lambda: jax.block_until_ready(compiled(*args)), compile_s=compile_s,
               residual_bytes=residual, temp_bytes=temp,
               output=np.asarray(jax.tree.leaves(out)[0], np.float32))


def residual_bytes(f: Callable, *args) -> int:
  """Bytes of everything `jax.vjp` keeps for the backward (the leaves of the VJP closure).

  The same set `jax.ad_checkpoint.print_saved_residuals` lists; inputs kept as residuals (`x`)
  count, since they must stay alive until the backward runs.
  """
  leaves = jax.eval_shape(lambda *a: jax.tree.leaves(jax.vjp(f, *a)[1]), *args)
  return int(sum(math.prod(l.shape) * jnp.dtype(l.dtype).itemsize for l in leaves))


def build_floor(case: Case, host: dict, device: Any) -> Built:
  """`jit(x * c)` (and `g * c` for the backward): the cheapest XLA program moving these bytes."""
  dt = jnp.dtype(case.dtype)
  x = jax.device_put(host["x"].astype(dt), device)
  g = jax.device_put(host["g"].astype(dt), device)
  c = jnp.asarray(1.5, dt)
  if case.op == "fwd":
    compiled = jax.jit(lambda x: x * c).lower(x).compile()
    args = (x,)
  else:
    compiled = jax.jit(lambda x, g: jax.vjp(lambda x: x * c, x)[1](g) + (x * c,)).lower(x, g).compile()
    args = (x, g)
  jax.block_until_ready(compiled(*args))
  return Built(call=lambda: jax.block_until_ready(compiled(*args)))


def build_roofline(case: Case, host: dict) -> Built:
  """A NumPy copy of the same bytes into a preallocated buffer (read N, write N).

  The time is scaled by the bytes the op must move (`Case.bytes_moved / (2 N)`) when reported.
  """
  src = host["x"].astype(jnp.dtype(case.dtype))
  dst = np.empty_like(src)
  np.copyto(dst, src)
  return Built(call=lambda: np.copyto(dst, src))


# --- PyTorch ------------------------------------------------------------------------------------

def build_torch(case: Case, host: dict, device: str) -> Built | None:
  """`torch.nn.functional` on the same bytes: channels-last conv inputs are passed as a
  `channels_last` view (logical NCHW, memory NHWC), which PyTorch's native kernels support."""
  try:
    import torch  # pylint: disable=import-outside-toplevel
    import torch.nn.functional as F  # pylint: disable=import-outside-toplevel
  except ImportError:
    return None
  dt = {"float32": torch.float32, "bfloat16": torch.bfloat16}[case.dtype]
  dev = torch.device(device)
  def tensor(a, grad=False):
    t = torch.from_numpy(np.array(a)).to(dev).to(dt if a.ndim > 1 else torch.float32)
    return t.requires_grad_(grad)
  conv_nhwc = case.variant not in ("layer", "rms") and case.layout == "N..C"
  def logical(t):
    return t.permute(0, 3, 1, 2) if conv_nhwc else t   # NHWC memory seen as NCHW
  bwd = case.op == "fwdbwd"
  x = tensor(host["x"], bwd)
  g = logical(tensor(host["g"]))
  s = torch.from_numpy(np.array(host["scale"])).to(dev).to(dt).requires_grad_(bwd)
  b = torch.from_numpy(np.array(host["bias"])).to(dev).to(dt).requires_grad_(bwd)
  rm, rv = tensor(host["mean"]), tensor(host["var"])
  eps, v, c = EPS[case.variant], case.variant, case.shape[-1]
  if v == "layer":
    fn = lambda: F.layer_norm(x, (c,), s, b, eps)
  elif v == "rms":
    fn = lambda: F.rms_norm(x, [c], s, eps)
  elif v == "group":
    fn = lambda: F.group_norm(logical(x), GROUPS, s, b, eps)
  elif v == "instance":
    fn = lambda: F.instance_norm(logical(x), None, None, s, b, True, 0.1, eps)
  elif v == "batch_train":
    fn = lambda: F.batch_norm(logical(x), rm, rv, s, b, True, 0.01, eps)
  elif v == "batch_eval":
    fn = lambda: F.batch_norm(logical(x), rm, rv, s, b, False, 0.01, eps)
  else:
    raise ValueError(v)
  sync = (lambda: torch.cuda.synchronize()) if dev.type == "cuda" else (lambda: None)
  leaves = [t for t in (x, s, b) if t.requires_grad]
  if bwd:
    def call():
      y = fn()
      y.backward(g)
      for t in leaves:
        t.grad = None
      sync()
      return y
  else:
    def call():
      with torch.no_grad():
        y = fn()
      sync()
      return y
  y = call()
  out = y.detach().float()
  out = out.permute(0, 2, 3, 1) if conv_nhwc else out
  return Built(call=call, output=out.cpu().numpy())
