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

from normjax._state import BatchStats

_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def _numpy(value: Any) -> np.ndarray:
  if hasattr(value, "detach"):
    value = value.detach()
  if hasattr(value, "cpu"):
    value = value.cpu()
  if hasattr(value, "numpy"):
    value = value.numpy()
  # A copy: a tensor's `.numpy()` shares its memory, which PyTorch updates in place (and
  # `jnp.asarray` may keep sharing it on CPU).
  return np.array(value, copy=True)


def from_torch_state_dict(state_dict: Mapping[str, Any], prefix: str = "") -> dict:
  """Reads one PyTorch normalization layer's entries: `{"scale", "bias", "stats"}` found.

  `prefix + "weight"` -> `scale`, `prefix + "bias"` -> `bias` (float32 `[C]`), and
  `running_mean`, `running_var`, `num_batches_tracked` -> `stats`, a `BatchStats` (`count`
  int32; 0 when `num_batches_tracked` is absent). A LayerNorm/GroupNorm has only `weight` and
  `bias`; an affine-free BatchNorm only the statistics. See the module doc for how PyTorch's
  momentum and unbiased running variance map to ours.

  Args:
    state_dict: a `module.state_dict()` (tensors or NumPy arrays).
    prefix: the layer's key prefix, e.g. `"bn1."`.

  Returns:
    A dict with the keys among `"scale"`, `"bias"`, `"stats"` whose entries were found.

  Raises:
    ValueError: nothing under `prefix`, only one of `running_mean`/`running_var`, or shapes
      that disagree (the key, the expected and the received shape are named).

  Example:
    >>> import numpy as np, normjax as nj
    >>> sd = {"bn.weight": np.ones(2), "bn.bias": np.zeros(2), "bn.running_mean": np.zeros(2),
    ...       "bn.running_var": np.ones(2), "bn.num_batches_tracked": np.array(3)}
    >>> out = nj.from_torch_state_dict(sd, prefix="bn.")
    >>> sorted(out), int(out["stats"].count)
    (['bias', 'scale', 'stats'], 3)
  """
  found = {k: _numpy(state_dict[prefix + k]) for k in _KEYS if prefix + k in state_dict}
  if not found:
    raise ValueError(f"state_dict has none of the keys {[prefix + k for k in _KEYS]}; got keys "
                     f"{sorted(state_dict)[:10]}{' ...' if len(state_dict) > 10 else ''}.")
  has_stats = [k in found for k in ("running_mean", "running_var")]
  if any(has_stats) and not all(has_stats):
    missing = prefix + ("running_var" if has_stats[0] else "running_mean")
    raise ValueError(f"state_dict is missing the key {missing!r} (expected both running_mean "
                     f"and running_var under prefix {prefix!r}); got keys "
                     f"{sorted(k for k in state_dict if k.startswith(prefix))}.")
  shape = None
  for k in ("weight", "bias", "running_mean", "running_var"):
    if k not in found:
      continue
    if found[k].ndim != 1 or (shape is not None and found[k].shape != shape):
      expected = "a 1-D [C] array" if shape is None else f"shape {shape}"
      raise ValueError(f"state_dict[{prefix + k!r}] must be {expected} (one value per channel); "
                       f"got shape {found[k].shape}.")
    shape = found[k].shape
  if "num_batches_tracked" in found and found["num_batches_tracked"].shape != ():
    raise ValueError(f"state_dict[{prefix + 'num_batches_tracked'!r}] must be a scalar (shape "
                     f"()); got shape {found['num_batches_tracked'].shape}.")
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
    scale: `[C]` -> `prefix + "weight"`, or None.
    bias: `[C]` -> `prefix + "bias"`, or None.
    stats: a `BatchStats` -> `running_mean`, `running_var` (float32) and
      `num_batches_tracked` (int64), or None.
    prefix: the layer's key prefix.

  Returns:
    A dict of NumPy arrays, loadable with `module.load_state_dict({k: torch.from_numpy(v)
    ...}, strict=False)`.

  Raises:
    ValueError: an entry that is not 1-D, or shapes that disagree.

  Example:
    >>> import normjax as nj
    >>> sorted(nj.to_torch_state_dict(stats=nj.init_batch_stats(2), prefix="bn."))
    ['bn.num_batches_tracked', 'bn.running_mean', 'bn.running_var']
  """
  out, shape = {}, None
  entries = {"weight": scale, "bias": bias}
  if stats is not None:
    entries.update(running_mean=stats.mean, running_var=stats.var)
  for k, v in entries.items():
    if v is None:
      continue
    v = np.array(v, np.float32, copy=True)   # writable (torch.from_numpy needs it)
    if v.ndim != 1 or (shape is not None and v.shape != shape):
      expected = "a 1-D [C] array" if shape is None else f"shape {shape}"
      name = {"weight": "scale", "running_mean": "stats.mean", "running_var": "stats.var"}.get(
          k, k)
      raise ValueError(f"{name} (-> {prefix + k!r}) must be {expected}; got shape {v.shape}.")
    shape = v.shape
    out[prefix + k] = v
  if stats is not None:
    out[prefix + "num_batches_tracked"] = np.array(stats.count, np.int64, copy=True)
  return out
