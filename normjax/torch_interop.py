"""One PyTorch normalization layer's `state_dict` entries to normjax's arguments and back.

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
from typing import Any

import jax.numpy as jnp
import numpy as np

from normjax._state import BatchStats, missing_stats_fields

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
    ValueError: nothing under `prefix` (a `num_batches_tracked` alone included), only one of `running_mean`/`running_var`, running
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
  out = {}
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
    missing = missing_stats_fields(stats)
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
  ref = next((e for e in entries if e[1]), entries[0] if entries else None)
  for name, _, shape in entries:
    if shape != ref[2]:
      raise ValueError(f"{name} must have shape {ref[2]} (that of {ref[0]}); got shape "
                       f"{shape}.")
