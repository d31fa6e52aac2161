"""Batch-statistics state: the running averages threaded explicitly through batch norm."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from normjax._src import checks


class BatchStats(NamedTuple):
  """Running statistics of a batch-normalized layer; a pytree passed in and returned.

  Attributes:
    mean: `[C]` float32 running mean of each channel.
    var: `[C]` float32 running variance of each channel.
    count: int32 scalar, the number of training batches folded in so far (used by
      `momentum=None`, the cumulative average): those with at least one (unmasked) element
      in some channel. A batch with none (`x` of shape `(0, C)`, an all-False mask) is not
      counted and changes no statistic.

  Example:
    >>> import jax.numpy as jnp, normjax as nj
    >>> x = jnp.array([[1.0, 10.0], [3.0, 30.0]])                 # [N=2, C=2]
    >>> stats = nj.init_batch_stats(2)
    >>> _, stats = nj.batch_norm(x, jnp.ones(2), jnp.zeros(2), stats, train=True, momentum=0.5)
    >>> stats.mean, stats.count                                  # 0.5 * 0 + 0.5 * batch mean
    (Array([ 1., 10.], dtype=float32), Array(1, dtype=int32))
  """
  mean: jax.Array
  var: jax.Array
  count: jax.Array  # type: ignore[assignment]  # shadows tuple.count: the public field name


def init_batch_stats(num_features: int, dtype=jnp.float32) -> BatchStats:
  """Fresh running statistics: mean 0, variance 1, count 0 (as flax and PyTorch start).

  Args:
    num_features: the number of channels `C`, a positive int (any integral type but bool).
    dtype: floating dtype of `mean` and `var` (default float32).

  Returns:
    A `BatchStats` with `mean` of zeros `[C]`, `var` of ones `[C]` and `count` 0 (int32).

  Raises:
    TypeError: `num_features` is not an integer (e.g. a float or a bool), or `dtype` is not a
      floating dtype.
    ValueError: `num_features` < 1.

  Example:
    >>> import normjax as nj
    >>> nj.init_batch_stats(3)
    BatchStats(mean=Array([0., 0., 0.], dtype=float32), var=Array([1., 1., 1.], dtype=float32), count=Array(0, dtype=int32))
  """  # noqa: E501 (the doctest's expected output is one line)
  num_features = checks.check_positive_int(num_features, "num_features")
  dtype = checks.check_dtype(dtype, "dtype", optional=False,
                             why=": the running mean and variance are averages")
  return BatchStats(mean=jnp.zeros((num_features,), dtype),
                    var=jnp.ones((num_features,), dtype),
                    count=jnp.zeros((), jnp.int32))


def update_running_stats(stats: BatchStats, batch_mean: jax.Array, batch_var: jax.Array,
                         has_data: jax.Array, momentum: float | None) -> BatchStats:
  """Folds one batch's statistics into the running ones.

  Args:
    stats: the running statistics, `[C]` each.
    batch_mean: `[C]` mean of this batch.
    batch_var: `[C]` variance of this batch, as it should be stored (biased or unbiased).
    has_data: `[C]` bool, False for channels that saw no (unmasked) element; those keep their
      running values unchanged.
    momentum: the decay `m` in `new = m * old + (1 - m) * batch`, or None for the cumulative
      average over `count + 1` batches (PyTorch's `momentum=None`).

  Returns:
    The new `BatchStats`, with the dtypes of `stats`. `count` advances by one only where some
    channel has data: a batch with none (an empty `x`, an all-False mask) changes nothing.
  """
  count = stats.count + jnp.any(has_data).astype(stats.count.dtype)
  if momentum is None:
    # new = old + (batch - old) / count; where count did not advance nothing is updated.
    weight = 1.0 / jnp.maximum(count, 1).astype(batch_mean.dtype)
  else:
    weight = jnp.asarray(1.0 - momentum, batch_mean.dtype)

  def fold(old, new):
    old32 = old.astype(new.dtype)
    updated = old32 + weight * (new - old32)
    return jnp.where(has_data, updated, old32).astype(old.dtype)

  return BatchStats(mean=fold(stats.mean, batch_mean), var=fold(stats.var, batch_var),
                    count=count.astype(stats.count.dtype))


# `jax.export` serializes functions whose inputs or outputs hold a `BatchStats` under this
# name. A process that loads such a program without importing normjax registers any
# namedtuple with the fields `mean`, `var`, `count` under the same name.
jax.export.register_namedtuple_serialization(BatchStats, serialized_name="normjax.BatchStats")


class SpectralState(NamedTuple):
  """Power-iteration state of a spectrally normalized kernel; a pytree passed in and returned.

  Attributes:
    u: `[C_out]` estimate of the leading right singular vector of the kernel viewed as a
      matrix `[prod(shape[:-1]), C_out]` (float32, or float64 for a float64 kernel).
    sigma: scalar, the last estimate of the largest singular value (same dtype as `u`).

  Example:
    >>> import jax, jax.numpy as jnp, normjax as nj
    >>> w = jnp.array([[2.0, 0.0], [0.0, 0.5]])                 # singular values 2 and 0.5
    >>> state = nj.init_spectral_state(w, jax.random.key(0))   # SpectralState(u, sigma)
    >>> _, state = nj.spectral_normalize(w, state, train=True, n_steps=30)
    >>> state.u.shape, state.sigma.round(4)
    ((2,), Array(2., dtype=float32))
  """
  u: jax.Array
  sigma: jax.Array


jax.export.register_namedtuple_serialization(SpectralState,
                                             serialized_name="normjax.SpectralState")
