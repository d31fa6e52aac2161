"""`norm_health` and `NormHealth` (normjax/_src/health.py, numerics/health.py): each field on
hand-made rows (ill-conditioned at mean 2000 in float32, eps-dominated, constant, zero, NaN and
Inf rows counting only as non-finite, masked and fully masked rows), against the row-by-row
float64 reference of tests/reference.py, under jit and vmap, with bfloat16 input, several
axes, empty axes, and misuse."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import normjax as nj
from tests import reference as ref
from tests.helpers import rand

N = 64
# name -> (row, (ill_conditioned, eps_dominated, constant, nonfinite))
ROWS = {
    "ordinary": (rand(N, 0), (0, 0, 0, 0)),
    "mean 50": (50 + rand(N, 1), (0, 0, 0, 0)),   # mean^2 = 2500 var: not yet
    "mean 2000": (2000 + rand(N, 2), (1, 0, 0, 0)),   # PyTorch #51102
    "mean 2000, spread 0.01": (2000 + 0.01 * rand(N, 3), (1, 0, 0, 0)),
    "eps-dominated": (1e-4 * rand(N, 4), (0, 1, 0, 0)),
    "eps-dominated, offset": (1 + 1e-4 * rand(N, 5), (1, 1, 0, 0)),
    "constant": (np.full(N, 5.0), (0, 1, 1, 0)),
    "zero": (np.zeros(N), (0, 1, 1, 0)),
    "nan": (np.where(np.arange(N) == 7, np.nan, 2000 + rand(N, 6)), (0, 0, 0, 1)),
    "inf": (np.where(np.arange(N) == 0, np.inf, np.zeros(N)), (0, 0, 0, 1)),
    "-inf among constants": (np.where(np.arange(N) == 9, -np.inf, np.ones(N)), (0, 0, 0, 1)),
}


def _rows(names):
  x = np.stack([ROWS[n][0] for n in names]).astype(np.float32)
  want = np.mean([ROWS[n][1] for n in names], axis=0)
  return x, want


@pytest.mark.parametrize("name", sorted(ROWS))
def test_each_row_kind(name):
  """One row of each kind among ordinary rows: exactly its fields, by 1/4."""
  x, want = _rows([name, "ordinary", "mean 50", "ordinary"])
  health = jax.jit(nj.norm_health)(x)
  assert isinstance(health, nj.NormHealth)
  assert all(v.dtype == jnp.float32 and v.shape == () for v in health)
  np.testing.assert_array_equal(np.asarray(health), want)
  np.testing.assert_array_equal(np.asarray(health), ref.norm_health(x))


def test_all_rows_at_once_and_eps():
  x, want = _rows(sorted(ROWS))
  np.testing.assert_allclose(np.asarray(jax.jit(nj.norm_health)(x)), want, rtol=1e-6)
  # A larger eps takes in the rows of var ~ 1: every finite row, 8 of 11.
  health = nj.norm_health(x, eps=10.0)
  np.testing.assert_allclose(health.eps_dominated, 8 / 11, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(health), ref.norm_health(x, eps=10.0), rtol=1e-6)


def test_mask():
  """Only True elements count: a masked NaN is not non-finite, a masked outlier does not make
  a row ill-conditioned or not constant, a fully masked row is constant (and eps-dominated)."""
  x, _ = _rows(["nan", "ordinary", "constant", "mean 2000"])
  x[2, 0] = 1e3      # an outlier in the constant row
  mask = np.ones(x.shape, bool)
  mask[0, 7] = False   # the NaN
  mask[2, 0] = False   # the outlier
  mask[3] = False      # the whole mean-2000 row
  health = jax.jit(nj.norm_health)(x, mask=jnp.asarray(mask))
  np.testing.assert_allclose(np.asarray(health), [0.25, 0.5, 0.5, 0.0], rtol=1e-6)
  np.testing.assert_allclose(np.asarray(health), ref.norm_health(x, mask=mask), rtol=1e-6)
  unmasked = nj.norm_health(x)
  np.testing.assert_allclose(np.asarray(unmasked), [0.25, 0.0, 0.0, 0.25], rtol=1e-6)
  # A mask broadcast over the rows.
  health = nj.norm_health(x, mask=jnp.asarray(mask[:1]))
  np.testing.assert_allclose(np.asarray(health), ref.norm_health(x, mask=mask[:1]), rtol=1e-6)


@pytest.mark.slow   # several compilations; CI runs it
def test_axes_bfloat16_vmap_and_empty():
  """Several axes (the rows layer_norm(x, axis=axis) normalizes), bfloat16 input (statistics in
  float32), vmap, and empty axes (rows of no element are constant; no row at all gives 0)."""
  x, _ = _rows(sorted(ROWS) * 2)
  x3 = x.reshape(2, 11, 8, 8)
  for axis in ((-2, -1), (0, 2, 3), 1):
    np.testing.assert_allclose(np.asarray(nj.norm_health(x3, axis=axis)),
                               ref.norm_health(x3, axis=axis), rtol=1e-6)
  xb = jnp.asarray(x, jnp.bfloat16)
  np.testing.assert_allclose(np.asarray(nj.norm_health(xb)),
                             ref.norm_health(np.asarray(xb.astype(jnp.float32))), rtol=1e-6)
  batched = jax.jit(jax.vmap(nj.norm_health))(x3)
  assert batched.constant.shape == (2,)
  np.testing.assert_allclose(np.asarray(batched).T, [ref.norm_health(a) for a in x3],
                             rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(nj.norm_health(jnp.ones((3, 0)))), [0, 1, 1, 0])
  np.testing.assert_array_equal(np.asarray(nj.norm_health(jnp.ones((0, 4)))), [0, 0, 0, 0])


def test_under_a_jitted_training_step():
  """Recorded beside a normalization in a jitted step, without changing its output."""
  x = jnp.asarray(rand((4, 16), 7, loc=2000.0))

  @jax.jit
  def step(x):
    return nj.layer_norm(x), nj.norm_health(x)
  y, health = step(x)
  np.testing.assert_array_equal(y, jax.jit(nj.layer_norm)(x))
  assert float(health.ill_conditioned) == 1.0


@pytest.mark.parametrize("call, error, message", [
    (lambda: nj.norm_health(jnp.ones((2, 3), jnp.int32)), TypeError, "x"),
    (lambda: nj.norm_health(jnp.ones((2, 3)), axis=()), ValueError, "axis must name"),
    (lambda: nj.norm_health(jnp.ones((2, 3)), axis=2), ValueError, "axis"),
    (lambda: nj.norm_health(jnp.ones((2, 3)), eps=-1.0), ValueError, "eps"),
    (lambda: nj.norm_health(jnp.ones((2, 3)), mask=jnp.ones((2, 3))), TypeError, "mask"),
    (lambda: nj.norm_health(jnp.ones((2, 3)), mask=jnp.ones((2,), bool)), ValueError, "mask"),
])
def test_misuse_raises_a_named_error(call, error, message):
  with pytest.raises(error, match=message):
    call()
