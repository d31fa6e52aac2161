"""Batch renormalization: batch norm corrected towards the running statistics (Ioffe, 2017)."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from normjax import _axes
from normjax._state import BatchStats
from normjax.batch import Renorm
from normjax.batch import _batch_norm


def batch_renorm(x: jax.Array, scale: jax.Array | None, bias: jax.Array | None,
                 stats: BatchStats, *, train: bool, r_max: Any = 3.0, d_max: Any = 5.0,
                 warmup_steps: Any = 0, channel_axis: int = -1, momentum: float | None = 0.99,
                 eps: float = 1e-5, mask: jax.Array | None = None, axis_name: Any = None,
                 axis_index_groups: Any = None) -> tuple[jax.Array, BatchStats]:
  """Batch renormalization (Ioffe, 2017) with explicit running statistics.

  In training, with the biased batch statistics `mu_B`, `var_B`, `sigma_B = sqrt(var_B + eps)`
  and the running ones before this step, `sigma = sqrt(stats.var + eps)`:

    r = stop_gradient(clip(sigma_B / sigma, 1 / r_max, r_max))
    d = stop_gradient(clip((mu_B - stats.mean) / sigma, -d_max, d_max))
    y = ((x - mu_B) / sigma_B * r + d) * scale + bias

  While `stats.count < warmup_steps`, `r = 1` and `d = 0` (plain batch norm). Gradients flow
  through `mu_B` and `sigma_B` as in batch norm, not through `r` and `d`. The running
  statistics are updated exactly as `batch_norm` updates them, and evaluation is
  `batch_norm`'s. `r_max=1, d_max=0` is batch norm.

  Args:
    x: `[N, ..., C]` (or `[N, C, ...]` with `channel_axis=1`) floating input.
    scale: `[C]` multiplier, or None.
    bias: `[C]` offset, or None.
    stats: the running `BatchStats`; `count` (the number of training steps so far) drives the
      warmup.
    train: True for the batch statistics and an update of `stats`; False to use `stats`.
    r_max: bound of `r`, >= 1; may be a traced scalar (a schedule under `jit`).
    d_max: bound of `|d|`, >= 0; may be a traced scalar.
    warmup_steps: the number of first steps (`stats.count < warmup_steps`) that are plain
      batch norm; an int >= 0 or a traced integer scalar.
    channel_axis, momentum, eps, mask, axis_name, axis_index_groups: as in `batch_norm`.

  Returns:
    `(y, new_stats)` as in `batch_norm`.

  Raises:
    ValueError: `r_max < 1`, `d_max < 0`, `warmup_steps < 0` or above the largest
      `stats.count` of its dtype (when concrete), and `batch_norm`'s errors.
    TypeError: a non-real `r_max`/`d_max`, a non-integer `warmup_steps`, and `batch_norm`'s
      errors.

  Example:
    >>> import jax.numpy as jnp, normjax as nj
    >>> x = jnp.array([[0.0], [2.0]])            # batch mean 1, batch variance 1
    >>> stats = nj.init_batch_stats(1)          # running mean 0, variance 1: d = 1, r = 1
    >>> y, stats = nj.batch_renorm(x, None, None, stats, train=True, eps=0.0)
    >>> y
    Array([[0.],
           [2.]], dtype=float32)
  """
  return _batch_norm(x, scale, bias, stats, train=train, channel_axis=channel_axis,
                     momentum=momentum, eps=eps, mask=mask, axis_name=axis_name,
                     axis_index_groups=axis_index_groups, unbiased_running_var=False,
                     fast_variance=False, single_value=False,
                     renorm=settings(r_max, d_max, warmup_steps))


def settings(r_max: Any, d_max: Any, warmup_steps: Any) -> Renorm:
  """The checked `Renorm` settings (see `batch_renorm` for the errors)."""
  r_max = _axes._real_scalar(r_max, "r_max")
  if not isinstance(r_max, jax.core.Tracer) and not r_max >= 1.0:
    raise ValueError(f"r_max must be >= 1 (r is clipped to [1 / r_max, r_max]; 1 gives r = 1); "
                     f"got r_max={r_max!r}.")
  d_max = _axes._real_scalar(d_max, "d_max")
  if not isinstance(d_max, jax.core.Tracer) and not d_max >= 0.0:
    raise ValueError(f"d_max must be >= 0 (d is clipped to [-d_max, d_max]; 0 gives d = 0); got "
                     f"d_max={d_max!r}.")
  return Renorm(r_max, d_max, _check_steps(warmup_steps))


def _check_steps(steps: Any) -> Any:
  """`warmup_steps` as a Python int >= 0, or a traced integer scalar unchanged."""
  if isinstance(steps, jax.core.Tracer) or (hasattr(steps, "dtype") and np.ndim(steps) == 0
                                            and np.issubdtype(steps.dtype, np.integer)):
    if isinstance(steps, jax.core.Tracer):
      if not np.issubdtype(steps.dtype, np.integer) or steps.shape != ():
        raise TypeError(f"warmup_steps must be an integer scalar; got a traced value of dtype "
                        f"{steps.dtype} and shape {steps.shape}.")
      return steps
    steps = int(steps)
  if not _axes._is_int(steps):
    raise TypeError(f"warmup_steps must be an int >= 0 (the number of first training steps that "
                    f"are plain batch norm); got warmup_steps={steps!r} (of type "
                    f"{type(steps).__name__}).")
  if steps < 0:
    raise ValueError(f"warmup_steps must be >= 0 (the number of first training steps that are "
                     f"plain batch norm); got warmup_steps={steps!r}.")
  return int(steps)
