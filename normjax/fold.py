"""Folding an evaluation-mode batch norm into the preceding Dense/Conv layer, for inference."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from normjax import _axes
from normjax import _core
from normjax._state import BatchStats


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
  kernel = _axes.check_floating(kernel, "kernel")
  axis = _axes.canonicalize_axis(out_axis, kernel.ndim, "out_axis")
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
  mean = _axes.check_param(stats.mean, "stats.mean", (c,))
  var = _axes.check_param(stats.var, "stats.var", (c,))
  bias = _axes.check_param(bias, "bias", (c,))
  scale = _axes.check_param(scale, "scale", (c,))
  bn_bias = _axes.check_param(bn_bias, "bn_bias", (c,))
  eps = _axes.check_eps(eps)
  dtype = _core.stats_dtype(kernel.dtype)
  factor = _core.rstd(var.astype(dtype), eps)
  if scale is not None:
    factor = factor * scale.astype(dtype)
  new_bias = -mean.astype(dtype) if bias is None else bias.astype(dtype) - mean.astype(dtype)
  new_bias = new_bias * factor
  if bn_bias is not None:
    new_bias = new_bias + bn_bias.astype(dtype)
  new_kernel = kernel.astype(dtype) * _axes.broadcast_to_axes(factor, kernel.ndim, (axis,))
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
  `model.apply(variables, x, use_running_average=True)` (tested in tests/test_fold.py).

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
                                   bn.get("bias"), BatchStats(st["mean"], st["var"], None),
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
