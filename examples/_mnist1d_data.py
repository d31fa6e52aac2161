"""MNIST-1D (Greydanus, 2020), generated offline from its templates: a harder task for the lab.

Vendored and adapted from the `mnist1d` package (https://github.com/greydanus/mnist1d, version
0.0.2.post1 on PyPI, files `mnist1d/data.py` and `mnist1d/transform.py`):

  The MNIST-1D dataset | 2020-2024
  Copyright Sam Greydanus, Peter Steinbach, Karim, Dmitry Kobak, Jakob Jordan (the package's
  authors). Paper: S. Greydanus and D. Kobak, "Scaling Down Deep Learning with MNIST-1D",
  ICML 2024 (arXiv:2011.14439).

  Licensed under the Apache License, Version 2.0 (the "License"); you may not use this file
  except in compliance with the License. You may obtain a copy of the License at

      http://www.apache.org/licenses/LICENSE-2.0

  (a copy is also this repository's own LICENSE file). Unless required by applicable law or
  agreed to in writing, software distributed under the License is distributed on an "AS IS"
  BASIS, WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied. See the License
  for the specific language governing permissions and limitations under the License.

Changes from the original (as the License's section 4(b) asks): the generator draws from a local
`np.random.RandomState(seed)` instead of seeding NumPy's (and Python's) global generators; its
arguments are keyword arguments instead of an `ObjectView`; nothing is downloaded, pickled or
plotted (so no `requests`/`matplotlib`); `shuffle_seq` is left out; `load()` (a fixed
train/validation/test split as float32/int32 arrays) is new. The draws happen in the same order
as in the original, so `make_dataset()` returns the package's `make_dataset(get_dataset_args())`
arrays exactly (tests/test_claims_mnist1d.py checks this where the package is installed).

Each of the 10 digits is a 12-point 1-D template; every example is its template padded with
36-60 zeros, stretched to 72 points, scaled by 1 +- 0.2, circularly shifted by 0-47 points,
given smoothed Gaussian noise where the signal is zero and i.i.d. noise everywhere, sheared
(a random linear trend) and resampled to 40 points. The whole set is then standardized (one
mean and standard deviation over all 5,000 examples, as the reference does).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import numpy as np

# The reference generator's defaults (`mnist1d.data.get_dataset_args`).
DEFAULTS = dict(num_samples=5000, train_split=0.8, template_len=12, padding=(36, 60),
                scale_coeff=0.4, max_translation=48, corr_noise_scale=0.25,
                iid_noise_scale=2e-2, shear_scale=0.75, final_seq_length=40, seed=42)


def templates() -> dict[str, np.ndarray]:
  """The ten 12-point digit templates, whitened, starting at 0 and scaled by 1/6."""
  d = np.asarray([
      [5, 6, 6.5, 6.75, 7, 7, 7, 7, 6.75, 6.5, 6, 5],        # 0
      [5, 3, 3, 3.4, 3.8, 4.2, 4.6, 5, 5.4, 5.8, 5, 5],       # 1
      [5, 6, 6.5, 6.5, 6, 5.25, 4.75, 4, 3.5, 3.5, 4, 5],     # 2
      [5, 6, 6.5, 6.5, 6, 5, 5, 6, 6.5, 6.5, 6, 5],           # 3
      [5, 4.4, 3.8, 3.2, 2.6, 2.6, 5, 5, 5, 5, 5, 5],         # 4
      [5, 3, 3, 3, 3, 5, 6, 6.5, 6.5, 6, 4.5, 5],             # 5
      [5, 4, 3.5, 3.25, 3, 3, 3, 3, 3.25, 3.5, 4, 5],         # 6
      [5, 7, 7, 6.6, 6.2, 5.8, 5.4, 5, 4.6, 4.2, 5, 5],       # 7
      [5, 4, 3.5, 3.5, 4, 5, 5, 4, 3.5, 3.5, 4, 5],           # 8
      [5, 4, 3.5, 3.5, 4, 5, 5, 5, 5, 4.7, 4.3, 5]])          # 9
  d = d - d.mean(1, keepdims=True)
  d /= d.std(1, keepdims=True)
  d -= d[:, :1]
  return {"x": d / 6.0, "t": np.linspace(-5, 5, d.shape[1]) / 6.0, "y": np.arange(10)}


def _resample(x: np.ndarray, n: int) -> np.ndarray:
  """Linear interpolation of `x` (on [0, 1]) at `n` evenly spaced points."""
  from scipy.interpolate import interp1d    # the reference's routine, for identical arrays
  return interp1d(np.linspace(0, 1, len(x)), x, axis=0, kind="linear")(np.linspace(0, 1, n))


def _transform(rng: np.random.RandomState, x: np.ndarray, t: np.ndarray, *, template_len: int,
               padding: tuple[int, int], scale_coeff: float, max_translation: int,
               corr_noise_scale: float, iid_noise_scale: float, shear_scale: float,
               final_seq_length: int, eps: float = 1e-8) -> tuple[np.ndarray, np.ndarray]:
  """One example from template `x` (draws: pad, scale, shift, noise, noise, shear, in order)."""
  from scipy.ndimage import gaussian_filter
  low, high = padding
  pad = low + int(rng.rand() * (high - low + 1))                 # zeros appended: 36..60
  length = template_len + high
  h = _resample(np.concatenate([x + eps, np.zeros(pad)]), length)
  new_t = _resample(t, length)
  h *= 1 + scale_coeff * (rng.rand() - 0.5)                      # scale
  k = rng.choice(max_translation)                                # circular shift by k
  h = np.concatenate([h[-k:], h[:-k]])
  mask = h != 0
  corr = gaussian_filter(corr_noise_scale * rng.randn(*h.shape), 2)
  h = mask * h + (1 - mask) * corr                               # smooth noise off the signal
  h = h + iid_noise_scale * rng.randn(*h.shape)                  # i.i.d. noise everywhere
  h = h - shear_scale * (rng.rand() - 0.5) * np.linspace(-0.5, 0.5, len(h))   # shear
  return _resample(h, final_seq_length), _resample(new_t, final_seq_length)


def make_dataset(**overrides) -> dict[str, np.ndarray]:
  """The reference `make_dataset`: `{"x", "y", "x_test", "y_test", "t"}`, float64 / int64.

  Keyword arguments override `DEFAULTS` (4,000 train and 1,000 test examples of length 40).
  """
  unknown = set(overrides) - set(DEFAULTS)
  if unknown:
    raise TypeError(f"unknown MNIST-1D arguments: {sorted(unknown)}")
  a = {**DEFAULTS, **overrides}
  rng = np.random.RandomState(a["seed"])
  tmpl = templates()
  per_class = a["num_samples"] // len(tmpl["y"])
  kwargs = {k: a[k] for k in ("template_len", "padding", "scale_coeff", "max_translation",
                              "corr_noise_scale", "iid_noise_scale", "shear_scale",
                              "final_seq_length")}
  xs, ys = [], []
  for label in tmpl["y"]:
    for _ in range(per_class):
      x, new_t = _transform(rng, tmpl["x"][label], tmpl["t"], **kwargs)
      xs.append(x)
      ys.append(label)
  order = rng.permutation(len(ys))
  x_all, y_all = np.stack(xs)[order], np.stack(ys)[order]
  new_t = new_t / x_all.std()
  x_all = (x_all - x_all.mean()) / x_all.std()
  split = int(len(ys) * a["train_split"])
  return {"x": x_all[:split], "y": y_all[:split], "x_test": x_all[split:],
          "y_test": y_all[split:], "t": new_t}


class MNIST1D(NamedTuple):
  """The default MNIST-1D, split: the reference's 4,000 training examples cut into 3,200 train
  and 800 validation (its last 800; the generator has already shuffled them), and its 1,000
  test examples. Inputs `[N, 40, 1]` float32 (length, channel), labels int32 0..9."""
  x_train: np.ndarray
  y_train: np.ndarray
  x_val: np.ndarray
  y_val: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray


NUM_VAL = 800


@functools.lru_cache(maxsize=1)
def load() -> MNIST1D:
  """The fixed split of the default dataset (generated in about a second, then cached)."""
  d = make_dataset()
  x = lambda a: np.ascontiguousarray(a[..., None], dtype=np.float32)
  y = lambda a: np.asarray(a, dtype=np.int32)
  cut = len(d["y"]) - NUM_VAL
  return MNIST1D(x(d["x"][:cut]), y(d["y"][:cut]), x(d["x"][cut:]), y(d["y"][cut:]),
                 x(d["x_test"]), y(d["y_test"]))
