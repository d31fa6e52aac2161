"""Tests of `normjax._src.numerics.rounding`: `pinned_reads`, `pin_rounding`, `residual_sum`.

Both branches of the pin are tested: the CPU one (`optimization_barrier`, taken here outside
`lowered_for`) and the GPU one (`reduce_precision`, under `lowered_for("cuda")`).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import normjax as nj

from normjax._src.numerics import platform
from normjax._src.numerics import rounding
from tests.helpers import rand

LOWERED = [None, "cuda"]   # this machine's branches, and the GPU's
# `loc + N(0, 1)` with a unit step (ulp) of about `loc / 200`: a float32 `x + r` that is not
# rounded back to the dtype shows as a non-zero `h - x`.
LOW = {"bfloat16": (jnp.bfloat16, 1e5), "float16": (jnp.float16, 1e3)}


def _low(dtype, loc, seed):
  """`loc + N(0, 1)` and `N(0, 1) * ulp(loc)` in `dtype` (as NumPy arrays of that dtype)."""
  ulp = float(jnp.finfo(dtype).eps) * loc
  x = rand((8, 512), seed=seed, loc=loc).astype(dtype)
  r = (rand((8, 512), seed=seed + 1) * ulp).astype(dtype)
  return x, r


@pytest.mark.parametrize("n", [1, 3])
def test_float32_comes_back_unchanged(n):
  """Float32 and wider need no pin: the very same array, `n` times."""
  x = jnp.asarray(rand((4, 6)))
  handles = rounding.pinned_reads(x, n)
  assert isinstance(handles, tuple) and len(handles) == n
  assert all(h is x for h in handles)
  assert rounding.pin_rounding(x) is x


@pytest.mark.parametrize("use_jit", [False, True])
def test_float32_residual_sum(use_jit):
  """In float32, `residual_sum` is NumPy's float32 `x + r`, exactly."""
  x, r = rand((4, 6), seed=1, loc=1e5), rand((4, 6), seed=2)
  fn = jax.jit(rounding.residual_sum) if use_jit else rounding.residual_sum
  h = fn(jnp.asarray(x), jnp.asarray(r))
  assert h.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(h), x + r)


@pytest.mark.parametrize("name", sorted(LOW))
@pytest.mark.parametrize("lowered", LOWERED)
@pytest.mark.parametrize("n", [1, 2])
def test_low_precision_handles_equal_x(name, lowered, n):
  """Each of the `n` handles holds `x`'s values bit for bit, in `x`'s dtype, eagerly and jitted."""
  dtype, loc = LOW[name]
  x, _ = _low(dtype, loc, seed=3)
  with platform.lowered_for(lowered):
    for handles in (rounding.pinned_reads(jnp.asarray(x), n),
                    jax.jit(rounding.pinned_reads, static_argnums=1)(jnp.asarray(x), n),
                    (rounding.pin_rounding(jnp.asarray(x)),)):
      assert len(handles) in (1, n)
      for h in handles:
        assert h.dtype == dtype
        np.testing.assert_array_equal(np.asarray(h).view(np.uint16), x.view(np.uint16))


def _consumer(x, r):
  """A consumer XLA fuses with the sum: the float32 sum of `h - x`, exact if `h` is rounded (`h`
  is not returned: a returned `h` is materialized, and read back rounded)."""
  h = rounding.residual_sum(x, r)
  return jnp.sum(h.astype(jnp.float32) - x.astype(jnp.float32))


FUSED_CASES = [(name, lowered) for name in sorted(LOW) for lowered in LOWERED]


@pytest.mark.parametrize("name, lowered", FUSED_CASES)
def test_residual_sum_is_rounded_for_a_fused_consumer(name, lowered):
  """Under `jit`, `h = residual_sum(x, r)` is NumPy's float32 `x + r` rounded to `x.dtype`, both
  as returned and as read by a consumer XLA fuses the add into (`sum(h - x)` in float32: excess
  precision would add the residuals that rounding removed, of the order of `sqrt(4096)` ulps)."""
  dtype, loc = LOW[name]
  x, r = _low(dtype, loc, seed=5)
  expected = (x.astype(np.float32) + r.astype(np.float32)).astype(dtype)
  expected_sum = np.sum(expected.astype(np.float64) - x.astype(np.float64))
  with platform.lowered_for(lowered):
    h = jax.jit(rounding.residual_sum)(jnp.asarray(x), jnp.asarray(r))
    total = jax.jit(_consumer)(jnp.asarray(x), jnp.asarray(r))
  assert h.dtype == dtype
  np.testing.assert_array_equal(np.asarray(h).view(np.uint16), expected.view(np.uint16))
  assert float(total) == expected_sum


def test_add_norms_return_h_rounded_for_a_fused_consumer(implementation):
  """The `h` that `nj.add_layer_norm` returns, read by the caller's own fused code (the next
  block), is the bfloat16 sum on every implementation (on CPU the reference's `h` was read at
  float32 precision by a YNNPACK fusion: 24308 against 33280 for this sum)."""
  del implementation
  x = jnp.full((4, 1024), 1e5, jnp.bfloat16)
  r = jnp.asarray(1000 * np.random.default_rng(0).standard_normal((4, 1024)), jnp.bfloat16)
  h = (np.asarray(x, np.float32) + np.asarray(r, np.float32)).astype(jnp.bfloat16)
  want = np.sum(np.asarray(h, np.float64) - np.asarray(x, np.float64))
  for norm in (nj.add_layer_norm, nj.add_rms_norm):
    got = jax.jit(lambda x, r, norm=norm: jnp.sum(
        norm(x, r)[1].astype(jnp.float32) - x.astype(jnp.float32)))(x, r)
    assert float(got) == want
