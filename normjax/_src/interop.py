"""Interop: folding an evaluation-mode batch norm into the preceding layer, and one PyTorch
normalization layer's `state_dict` entries to normjax's arguments and back.

Folding: `fold_batch_norm` and `fold_linen_params` (for inference).

PyTorch: one layer's `state_dict` entries to normjax's arguments and back.

No torch import: tensors are read with `.detach().cpu().numpy()` when they have it (duck
typing), anything else with `np.asarray`.

Semantics of the running statistics: PyTorch's `momentum=m` is `1 - m` here (ours is
`new = momentum * old + (1 - momentum) * batch`; PyTorch's default 0.1 is our 0.9), and
PyTorch stores the unbiased batch variance `n / (n - 1) * var` in `running_var`: train with
`batch_norm(..., unbiased_running_var=True)` to continue its statistics identically
(normalization uses the biased variance in both). `num_batches_tracked` is our `count`.
"""

from __future__ import annotations

from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from normjax._src import checks
from normjax._src import dispatch
from normjax._src import shapes
from normjax._src.state import BatchStats


def fold_batch_norm(kernel: jax.Array, bias: jax.Array | None, scale: jax.Array | None,
                    bn_bias: jax.Array | None, stats: BatchStats, *, eps: float = 1e-5,
                    out_axis: int = -1) -> tuple[jax.Array, jax.Array]:
  """The kernel and bias of a Dense/Conv with an evaluation-mode batch norm folded in.

  With `f = scale / sqrt(stats.var + eps)`: `kernel' = kernel * f` along `out_axis` and
  `bias' = (bias - stats.mean) * f + bn_bias`, so that
  `conv(x, kernel') + bias' == batch_norm(conv(x, kernel) + bias, scale, bn_bias, stats,
  train=False, eps=eps)` for any linear `conv` (Dense, Conv of any layout).

  Args:
    kernel: the layer's kernel, with its `C` output features along `out_axis` (flax's Dense
      `[in, C]` and Conv `[..., in, C]`: -1; PyTorch's Conv `[C, in, ...]`: 0).
    bias: `[C]` layer bias, or None.
    scale: `[C]` batch-norm scale, or None.
    bn_bias: `[C]` batch-norm bias, or None.
    stats: the running `BatchStats` (`[C]` mean and var).
    eps: the batch norm's eps.
    out_axis: the output-feature axis of `kernel`.

  Returns:
    `(kernel', bias')`: the kernel's shape and dtype, and a `[C]` bias in the dtype of the
    kernel.

  Raises:
    ValueError: the size of `kernel` along `out_axis` is not `C`, or a `[C]` argument has
      another shape.
    TypeError: non-floating arrays, a non-int `out_axis`, `stats` without `mean` and `var`.

  Example:
    >>> import jax.numpy as jnp, normjax as nj
    >>> kernel, stats = jnp.ones((2, 3)), nj.BatchStats(jnp.ones(3), 4 * jnp.ones(3), None)
    >>> k, b = nj.fold_batch_norm(kernel, None, None, None, stats, eps=0.0)
    >>> k[0], b
    (Array([0.5, 0.5, 0.5], dtype=float32), Array([-0.5, -0.5, -0.5], dtype=float32))
  """
  kernel = checks.check_floating(kernel, "kernel")
  axis = checks.canonicalize_axis(out_axis, kernel.ndim, "out_axis")
  if not all(hasattr(stats, f) for f in ("mean", "var")):
    raise TypeError(f"stats must be a BatchStats (mean, var, count); got "
                    f"{type(stats).__name__}.")
  if jnp.ndim(stats.mean) != 1:
    raise ValueError(f"stats.mean must be a 1-D [C] array (one value per output channel); got "
                     f"shape {tuple(jnp.shape(stats.mean))}.")
  c = int(jnp.shape(stats.mean)[0])
  if kernel.shape[axis] != c:
    raise ValueError(f"kernel must have the {c} channels of stats.mean (shape "
                     f"{tuple(jnp.shape(stats.mean))}) along out_axis={out_axis}; got kernel of "
                     f"shape {tuple(kernel.shape)}, with {kernel.shape[axis]} there.")
  mean = checks.check_param(stats.mean, "stats.mean", (c,))
  var = checks.check_param(stats.var, "stats.var", (c,))
  bias = checks.check_param(bias, "bias", (c,))
  scale = checks.check_param(scale, "scale", (c,))
  bn_bias = checks.check_param(bn_bias, "bn_bias", (c,))
  eps = checks.check_eps(eps)
  dtype = dispatch.stats_dtype(kernel.dtype)
  factor = dispatch.rstd(var.astype(dtype), eps)
  if scale is not None:
    factor = factor * scale.astype(dtype)
  new_bias = -mean.astype(dtype) if bias is None else bias.astype(dtype) - mean.astype(dtype)
  new_bias = new_bias * factor
  if bn_bias is not None:
    new_bias = new_bias + bn_bias.astype(dtype)
  new_kernel = kernel.astype(dtype) * shapes.broadcast_to_axes(factor, kernel.ndim, (axis,))
  return new_kernel.astype(kernel.dtype), new_bias.astype(kernel.dtype)


def fold_linen_params(params: Mapping[str, Any], batch_stats: Mapping[str, Any],
                      pairs: Sequence[tuple[str, str]], *,
                      eps: float | Mapping[str, float] = 1e-5,
                      out_axis: int | Mapping[str, int] = -1) -> dict:
  """Folds a linen model's Conv/Dense + BatchNorm pairs: the `params` of the folded model.

  For each `(conv_name, bn_name)` pair (names in the top-level `params` dict; a path
  `"block/conv"` reaches into submodules), the conv's `kernel` and `bias` (made if absent) are
  replaced by the folded ones (`fold_batch_norm`) and the batch norm's entry is removed (a
  BatchNorm without scale and bias has none). The recipe: define the model with a switch that
  builds the conv with `use_bias=True` and no BatchNorm after it (e.g. `bn = (lambda y: y) if
  fold else nn.BatchNorm(...)`), then `folded.apply({"params": fold_linen_params(...)}, x)` equals
  `model.apply(variables, x, use_running_average=True)` (tested in tests/test_interop.py).

  Args:
    params: the trained model's `params` collection.
    batch_stats: its `batch_stats` collection (`mean` and `var` per BatchNorm).
    pairs: `(conv_name, bn_name)` pairs, `/`-separated paths.
    eps: the BatchNorms' epsilon: one number for all, or a mapping from each `bn_name` to
      its own (a model whose BatchNorms differ in `epsilon`).
    out_axis: the output-channel axis of the kernels: -1 for flax's `Conv`, `Dense` and
      `ConvTranspose`, but -2 for `ConvTranspose(transpose_kernel=True)` (its kernel is
      `[..., features, in_features]`). One int for all, or a mapping from `conv_name`s to
      their own (convs not in it take -1; a name that is no conv of `pairs` raises).

  Returns:
    A new nested dict of params; the input is not modified.

  Raises:
    TypeError: `params` or `batch_stats` is not a mapping, or `pairs` is not a sequence of
      `(conv_name, bn_name)` string pairs (a flat `("conv", "bn")` or a string).
    ValueError: `eps` is a mapping without an entry for one of the pairs' batch norms, a
      name of `pairs` is not in `params` (the conv) or `batch_stats` (the batch norm), a conv
      without a `kernel`, or statistics without `mean` and `var`.

  Example:
    >>> import jax.numpy as jnp, normjax as nj
    >>> params = {"conv": {"kernel": jnp.ones((1, 2))}, "bn": {"scale": jnp.ones(2),
    ...           "bias": jnp.zeros(2)}}
    >>> stats = {"bn": {"mean": jnp.zeros(2), "var": jnp.ones(2)}}
    >>> sorted(nj.fold_linen_params(params, stats, [("conv", "bn")], eps=0.0)["conv"])
    ['bias', 'kernel']
  """
  for tree, name in ((params, "params"), (batch_stats, "batch_stats")):
    if not isinstance(tree, Mapping):
      raise TypeError(f"fold_linen_params: {name} must be a mapping (the model's {name} "
                      f"collection, a dict or FrozenDict); got {name} of type "
                      f"{type(tree).__name__}.")
  pairs = _check_pairs(pairs)
  if isinstance(eps, Mapping):
    missing = [bn for _, bn in pairs if bn not in eps]
    if missing:
      raise ValueError(f"fold_linen_params: `eps` must have an entry for every batch norm of "
                       f"`pairs`; expected keys {[bn for _, bn in pairs]}, missing {missing} "
                       f"(got keys {sorted(eps)})")
  else:
    eps = {bn: eps for _, bn in pairs}
  if isinstance(out_axis, Mapping):
    unknown = sorted(set(out_axis) - {conv for conv, _ in pairs})
    if unknown:
      raise ValueError(f"fold_linen_params: `out_axis` names convs that are not in `pairs`: "
                       f"{unknown} (the convs of `pairs`: {[conv for conv, _ in pairs]}).")
    out_axis = {conv: out_axis.get(conv, -1) for conv, _ in pairs}
  else:
    out_axis = {conv: out_axis for conv, _ in pairs}
  out = jax.tree.map(lambda v: v, _plain(params))
  stats = _plain(batch_stats)

  def get(tree, path, collection, default=None):
    for k in path.split("/"):
      if not isinstance(tree, Mapping) or k not in tree:
        if default is not None:
          return default
        raise ValueError(f"fold_linen_params: {path!r} is not in {collection} (at {k!r}; "
                         f"keys there: {sorted(tree) if isinstance(tree, Mapping) else []}).")
      tree = tree[k]
    return tree

  for conv_name, bn_name in pairs:
    conv = get(out, conv_name, "params")
    st = get(stats, bn_name, "batch_stats")
    _check_entry(conv, ("kernel",), f"params[{conv_name!r}]", f"the layer before {bn_name!r}")
    _check_entry(st, ("mean", "var"), f"batch_stats[{bn_name!r}]", "a BatchNorm's statistics")
    # A BatchNorm with neither scale nor bias has statistics but no params.
    bn = get(out, bn_name, "params", default={})
    kernel, bias = fold_batch_norm(conv["kernel"], conv.get("bias"), bn.get("scale"),
                                   bn.get("bias"),
                                   # a linen batch_stats entry has no count; folding reads none
                                   BatchStats(st["mean"], st["var"], None),  # type: ignore[arg-type]
                                   eps=eps[bn_name],
                                   out_axis=out_axis[conv_name])
    conv["kernel"], conv["bias"] = kernel, bias
    *parent, last = bn_name.split("/")
    parent = get(out, "/".join(parent), "params", default={}) if parent else out
    parent.pop(last, None)
  return out


def _check_pairs(pairs: Any) -> list[tuple[str, str]]:
  """`pairs` as a list of `(conv_name, bn_name)` string pairs; `TypeError` otherwise (a flat
  `("conv", "bn")` or a string included)."""
  ok = not isinstance(pairs, (str, bytes, Mapping)) and isinstance(pairs, Sequence)
  bad = None if ok else pairs
  for pair in pairs if ok else ():
    if (isinstance(pair, (str, bytes)) or not isinstance(pair, Sequence) or len(pair) != 2
        or not all(isinstance(name, str) for name in pair)):
      ok, bad = False, pair
      break
  if not ok:
    raise TypeError(f"fold_linen_params: pairs must be a sequence of (conv_name, bn_name) pairs "
                    f"of strings, e.g. [('conv', 'bn')]; got pairs={pairs!r}, in which {bad!r} "
                    f"is not such a pair.")
  return [tuple(pair) for pair in pairs]


def _check_entry(entry: Any, keys: tuple[str, ...], name: str, what: str) -> None:
  """`ValueError` unless `entry` is a mapping with every one of `keys`."""
  if not isinstance(entry, Mapping) or not all(k in entry for k in keys):
    got = f"keys {sorted(entry)}" if isinstance(entry, Mapping) else type(entry).__name__
    raise ValueError(f"fold_linen_params: {name} ({what}) must have the entries "
                     f"{list(keys)}; got {got}.")


def _plain(tree: Mapping[str, Any]) -> dict:
  """A nested plain-dict copy (FrozenDicts included)."""
  return {k: _plain(v) if isinstance(v, Mapping) else v for k, v in tree.items()}


# ----------------------------------------------------------------- PyTorch state dicts

_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def _numpy(value: Any) -> np.ndarray:
  if hasattr(value, "detach"):
    value = value.detach()
  if hasattr(value, "cpu"):
    value = value.cpu()
  if "bfloat16" in str(getattr(value, "dtype", "")) and hasattr(value, "float"):
    value = value.float()  # a torch bfloat16 tensor has no `.numpy()`; exact in float32
  if hasattr(value, "numpy"):
    value = value.numpy()
  # A copy: a tensor's `.numpy()` shares its memory, which PyTorch updates in place (and
  # `jnp.asarray` may keep sharing it on CPU).
  return np.array(value, copy=True)


def from_torch_state_dict(state_dict: Mapping[str, Any], prefix: str = "") -> dict:
  """Reads one PyTorch normalization layer's entries: `{"scale", "bias", "stats"}` found.

  `prefix + "weight"` -> `scale`, `prefix + "bias"` -> `bias` (float32 `[C]`, or a
  LayerNorm's `[*normalized_shape]`), and `running_mean`, `running_var`,
  `num_batches_tracked` -> `stats`, a `BatchStats` (float32 `[C]`; `count` int32, 0 when
  `num_batches_tracked` is absent). A LayerNorm/GroupNorm has only `weight` and `bias`; an
  affine-free BatchNorm only the statistics. Tensors of any real dtype are read (bfloat16
  through float32, exactly; float64 rounded to float32), and `num_batches_tracked` may be a
  float holding a whole number (a checkpoint cast as a whole). See the module doc for how
  PyTorch's momentum and unbiased running variance map to ours.

  Args:
    state_dict: a `module.state_dict()` (tensors or NumPy arrays).
    prefix: the layer's key prefix, e.g. `"bn1."`.

  Returns:
    A dict with the keys among `"scale"`, `"bias"`, `"stats"` whose entries were found.

  Raises:
    TypeError: a non-str `prefix`.
    ValueError: nothing under `prefix` (a `num_batches_tracked` alone included), only one
      of `running_mean`/`running_var`, running
      statistics that are not 1-D, shapes that disagree (the key, the expected and the
      received shape are named), a complex or boolean entry, or a `num_batches_tracked` that
      is not a whole number in [0, 2**31).

  Example:
    >>> import numpy as np, normjax as nj
    >>> sd = {"bn.weight": np.ones(2), "bn.bias": np.zeros(2), "bn.running_mean": np.zeros(2),
    ...       "bn.running_var": np.ones(2), "bn.num_batches_tracked": np.array(3)}
    >>> out = nj.from_torch_state_dict(sd, prefix="bn.")
    >>> sorted(out), int(out["stats"].count)
    (['bias', 'scale', 'stats'], 3)
  """
  _check_prefix(prefix)
  found = {k: _numpy(state_dict[prefix + k]) for k in _KEYS if prefix + k in state_dict}
  if not any(k in found for k in _KEYS[:4]):   # a num_batches_tracked alone is no layer
    raise ValueError(f"state_dict has none of the keys {[prefix + k for k in _KEYS[:4]]}; got "
                     f"keys {sorted(state_dict)[:10]}{' ...' if len(state_dict) > 10 else ''}.")
  has_stats = [k in found for k in ("running_mean", "running_var")]
  if any(has_stats) and not all(has_stats):
    missing = prefix + ("running_var" if has_stats[0] else "running_mean")
    raise ValueError(f"state_dict is missing the key {missing!r} (expected both running_mean "
                     f"and running_var under prefix {prefix!r}); got keys "
                     f"{sorted(k for k in state_dict if k.startswith(prefix))}.")
  _check_shapes([(f"state_dict[{prefix + k!r}]", k.startswith("running_"), found[k].shape)
                 for k in ("weight", "bias", "running_mean", "running_var") if k in found])
  for k, v in found.items():
    if not _is_real(v):
      raise ValueError(f"state_dict[{prefix + k!r}] must be a real (floating or integer) "
                       f"array; got dtype {v.dtype}.")
  if "num_batches_tracked" in found:
    _check_count(found["num_batches_tracked"], f"state_dict[{prefix + 'num_batches_tracked'!r}]")
  f32 = lambda k: jnp.asarray(found[k], jnp.float32)
  out: dict[str, Any] = {}
  if "weight" in found:
    out["scale"] = f32("weight")
  if "bias" in found:
    out["bias"] = f32("bias")
  if all(has_stats):
    count = found.get("num_batches_tracked", np.zeros((), np.int64))
    out["stats"] = BatchStats(f32("running_mean"), f32("running_var"),
                              jnp.asarray(int(count), jnp.int32))
  return out


def to_torch_state_dict(*, scale: Any = None, bias: Any = None, stats: BatchStats | None = None,
                        prefix: str = "") -> dict[str, np.ndarray]:
  """The PyTorch `state_dict` entries of one normalization layer (the inverse of
  `from_torch_state_dict`).

  Args:
    scale: `[C]` (or a LayerNorm's `[*normalized_shape]`) -> `prefix + "weight"`, or None.
    bias: the same shape -> `prefix + "bias"`, or None.
    stats: a `BatchStats` -> `running_mean`, `running_var` (float32 `[C]`) and
      `num_batches_tracked` (int64; 0 where `count` is None, as in a linen `batch_stats`
      collection without a count), or None.
    prefix: the layer's key prefix.

  Returns:
    A dict of NumPy arrays, loadable with `module.load_state_dict({k: torch.from_numpy(v)
    ...}, strict=False)`.

  Raises:
    TypeError: a `stats` that is not a `BatchStats` (e.g. a plain tuple), or a non-str
      `prefix`.
    ValueError: a scalar entry, a non-real one (complex, boolean, a string), running
      statistics that are not 1-D, shapes that disagree, or a `stats.count` that is not a
      whole number in [0, 2**31).

  Example:
    >>> import normjax as nj
    >>> sorted(nj.to_torch_state_dict(stats=nj.init_batch_stats(2), prefix="bn."))
    ['bn.num_batches_tracked', 'bn.running_mean', 'bn.running_var']
  """
  _check_prefix(prefix)
  names = {"weight": "scale", "bias": "bias", "running_mean": "stats.mean",
           "running_var": "stats.var"}
  entries = {"weight": scale, "bias": bias}
  if stats is not None:
    missing = checks.missing_stats_fields(stats)
    if missing:
      raise TypeError(f"stats must be a BatchStats (fields mean, var, count; count may be None), "
                      f"e.g. nj.BatchStats(mean, var, count); got {type(stats).__name__}, which "
                      f"has no field {', '.join(missing)}.")
    entries.update(running_mean=stats.mean, running_var=stats.var)
  out = {}
  for k, v in entries.items():
    if v is not None:
      value = _numpy(v)
      if not _is_real(value):   # a complex entry would lose its imaginary part
        raise ValueError(f"{names[k]} (-> {prefix + k!r}) must be a real (floating or integer) "
                         f"array; got dtype {value.dtype} (from a {type(v).__name__}).")
      out[prefix + k] = np.array(value, np.float32, copy=True)   # writable (torch.from_numpy)
  _check_shapes([(f"{names[k]} (-> {prefix + k!r})", k.startswith("running_"),
                  out[prefix + k].shape) for k in entries if prefix + k in out])
  if stats is not None:
    count = np.asarray(0 if stats.count is None else stats.count)
    _check_count(count, f"stats.count (-> {prefix + 'num_batches_tracked'!r})")
    out[prefix + "num_batches_tracked"] = np.array(count, np.int64, copy=True)
  return out


def _check_prefix(prefix: Any) -> None:
  if not isinstance(prefix, str):
    raise TypeError(f"prefix must be a str (the layer's key prefix, e.g. 'bn1.', or ''); got "
                    f"prefix={prefix!r} (of type {type(prefix).__name__}).")


def _is_real(v: np.ndarray) -> bool:
  # jnp's `issubdtype` also knows bfloat16 (ml_dtypes), which NumPy's does not.
  # (bool is neither.)
  return jnp.issubdtype(v.dtype, jnp.floating) or jnp.issubdtype(v.dtype, jnp.integer)


def _check_count(n: np.ndarray, name: str) -> None:
  """A batch count: a whole number in [0, 2**31) of any real dtype (a checkpoint cast to
  float16 holds it as a float), as a scalar."""
  # Compared in float64: 2**31 in a float16 count's own dtype overflows (a RuntimeWarning).
  if not (n.shape == () and _is_real(n) and 0 <= n.astype(np.float64) < 2**31
          and n == np.floor(n)):
    raise ValueError(f"{name} must be a whole number in [0, 2**31) (a scalar); got {n.dtype} "
                     f"of shape {n.shape}{f' and value {n}' if n.shape == () else ''}.")


def _check_shapes(entries: list[tuple[str, bool, tuple[int, ...]]]) -> None:
  """`(name, is_statistic, shape)` entries: statistics 1-D, the others at least 1-D, all of
  one shape (that of the statistics where there are any). `ValueError` naming the entry, the
  expected and the received shape."""
  for name, stat, shape in entries:
    if stat and len(shape) != 1:
      raise ValueError(f"{name} must be a 1-D [C] array (one value per channel); got shape "
                       f"{shape}.")
    if not shape:
      raise ValueError(f"{name} must be an array of at least one dimension ([C], or a "
                       f"LayerNorm's normalized_shape); got shape {shape}.")
  if not entries:
    return
  ref = next((e for e in entries if e[1]), entries[0])
  for name, _, shape in entries:
    if shape != ref[2]:
      raise ValueError(f"{name} must have shape {ref[2]} (that of {ref[0]}); got shape "
                       f"{shape}.")
