"""Shared pieces of the normjax examples: the digits data, the small CNN, the optimizer.

Imported by the claims lab (`claims_model.py`, `claims_lab.py`, `claims_mnist1d.py`),
`data_parallel.py`, `flax_models.py` and `masked_sequences.py`, which put this folder on
`sys.path` themselves. Everything here is plain JAX + optax and is clean under
`jax_numpy_dtype_promotion="strict"` and `jax_numpy_rank_promotion="raise"`.
"""

from __future__ import annotations

import json
import os
import platform
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

# The CNN of `flax_models.py`: 3x3 convs with these output channels and strides, each followed
# by a normalization and a ReLU, then global average pooling and a dense layer to the 10 classes.
# 8x8 input -> 8x8x8 -> 4x4x16 -> 4x4x32 -> 32 -> 10.
CNN_FEATURES = (8, 16, 32)
CNN_STRIDES = (1, 2, 1)
NUM_CLASSES = 10
NUM_GROUPS = 4          # group norm: 4 groups of 2, 4 and 8 channels


class Digits(NamedTuple):
  """scikit-learn's bundled 8x8 digits, split deterministically (no download)."""
  x_train: np.ndarray   # [1347, 8, 8, 1] float32, standardized with the training mean/std
  y_train: np.ndarray   # [1347] int32 labels 0..9
  x_test: np.ndarray    # [450, 8, 8, 1] float32
  y_test: np.ndarray    # [450] int32


def load_digits(test_size: float = 0.25, split_seed: int = 0) -> Digits:
  """The 1,797 digits, with a stratified, fixed (seeded) train/test split.

  Pixel values 0..16 are standardized with the mean and standard deviation of the training
  split (one scalar each), so no test information leaks into preprocessing.
  """
  from sklearn.datasets import load_digits as sk_load_digits
  from sklearn.model_selection import train_test_split

  data = sk_load_digits()
  images = data.images.astype(np.float32)[..., None]          # [1797, 8, 8, 1]
  labels = data.target.astype(np.int32)
  x_tr, x_te, y_tr, y_te = train_test_split(images, labels, test_size=test_size,
                                            random_state=split_seed, stratify=labels)
  mean, std = x_tr.mean(), x_tr.std()
  norm = lambda a: ((a - mean) / std).astype(np.float32)
  return Digits(norm(x_tr), y_tr, norm(x_te), y_te)


def example_order(rng: np.random.Generator, num_train: int, num_examples: int) -> np.ndarray:
  """`[num_examples]` training-example indices: shuffled epochs, concatenated, cut."""
  epochs = -(-num_examples // num_train)
  return np.concatenate([rng.permutation(num_train) for _ in range(epochs)])[:num_examples]


def head(h: jax.Array, params: dict[str, Any]) -> jax.Array:
  """Global average pooling over H, W and the dense classifier: [N, H, W, C] -> [N, 10]."""
  pooled = h.mean(axis=(1, 2))
  return pooled @ params["kernel"] + params["bias"].reshape(1, -1)


def cross_entropy(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Mean softmax cross-entropy and accuracy."""
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  accuracy = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32).mean()
  return loss, accuracy


def warmup_cosine_schedule(peak_lr: float, num_steps: int,
                           warmup_fraction: float = 0.05) -> optax.Schedule:
  """Linear warmup from 0 over the first 5% of steps, then cosine decay to 0 at `num_steps`.

  The same as `optax.warmup_cosine_decay_schedule(0, peak_lr, warmup, num_steps)`, written out
  with explicit casts so that it also runs under `jax_numpy_dtype_promotion="strict"`.
  """
  warmup = max(1, round(warmup_fraction * num_steps))

  def schedule(count: jax.Array) -> jax.Array:
    t = jnp.asarray(count).astype(jnp.float32)
    progress = jnp.clip((t - warmup) / max(1, num_steps - warmup), 0.0, 1.0)
    cosine = 0.5 * peak_lr * (1.0 + jnp.cos(jnp.pi * progress))
    return jnp.where(t < warmup, peak_lr * t / warmup, cosine)
  return schedule


def make_optimizer(peak_lr: float, num_steps: int,
                   momentum: float = 0.9) -> optax.GradientTransformation:
  """SGD with momentum on `warmup_cosine_schedule(peak_lr, num_steps)`.

  The schedule has the same shape as a function of the fraction of training done, whatever the
  batch size; callers scale `peak_lr` with the batch size (see `linear_scaled_lr`).
  """
  return optax.sgd(warmup_cosine_schedule(peak_lr, num_steps), momentum=momentum)


def linear_scaled_lr(base_lr: float, batch_size: int, base_batch_size: int = 32) -> float:
  """The linear scaling rule (Goyal et al., 2017), as in Wu & He (2018): lr = base * B / 32."""
  return base_lr * batch_size / base_batch_size


def machine_info() -> dict[str, Any]:
  """What the timings were measured on."""
  import os
  return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
          "cpu_count": os.cpu_count(), "jax": jax.__version__,
          "backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()],
          "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def write_results(out_dir: str, markdown_lines: list[str], result: dict[str, Any],
                  wall_s: float) -> dict[str, Any]:
  """Writes `results.md` and `results.json` into `out_dir` and says so; returns `result`."""
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "results.md"), "w") as f:
    f.write("\n".join(markdown_lines))
  with open(os.path.join(out_dir, "results.json"), "w") as f:
    json.dump(result, f, indent=1)
  print(f"\nwrote {out_dir}/results.md and results.json; wall time {wall_s:.0f} s")
  return result
