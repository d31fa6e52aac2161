"""The gated RMS norm's kernels (normjax/_src/kernels/gated.py): the gate computed inside them.

The public function's semantics, derivatives and adversarial inputs are tested on every
implementation in tests/test_gated.py; its kernels' bits at every CPU level in
tests/test_kernels_cpu_portability.py. Here: the kernels' own `exp` (the gate `silu(z)`)
against float64 at every float32 exponent and at the special values, the primitives'
definitions against their kernels, and the vmap fallback.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from normjax._src.kernels import gated
from normjax._src.kernels import primitives

pytestmark = pytest.mark.skipif(not primitives.has_kernel("cpu"),
                                reason="needs the native CPU kernels")


def _gate_of(z: np.ndarray) -> np.ndarray:
  """The kernel's gate silu(z), read off the forward with the gate after the norm of a row
  of ones (its mean square is 1, so with eps=0 the output is the gate)."""
  z = np.asarray(z, np.float32).reshape(-1, 64)
  ones = jnp.ones(z.shape, jnp.float32)
  (y,) = gated.rows_gated_forward_p.bind(ones, jnp.asarray(z), jnp.ones((64,), jnp.float32),
                                         eps=0.0, before=True)
  return np.asarray(y).reshape(-1)


def test_gate_is_within_three_ulp_at_every_exponent():
  """silu(z) = z * (1 / (1 + exp(-z))) within 3 ulp of float64's, as XLA's is, for 2^20
  values spread over [-110, 100] and over every power of two either sign. Where a value is
  subnormal (XLA's threads, which run the kernels, flush them to zero): the result, or the
  sigmoid below about z = -87.34 (then exp(-z) overflows), the result is XLA's bit for bit
  (0, where the true value is below 2e-36)."""
  rng = np.random.default_rng(0)
  powers = np.ldexp(1.0, np.arange(-149, 8)).astype(np.float32)
  z = np.concatenate([rng.uniform(-110, 100, size=1 << 20), powers, -powers,
                      powers * 1.37, -powers * 1.37]).astype(np.float32)
  z = np.concatenate([z, np.zeros(64 - z.size % 64, np.float32)])
  got = _gate_of(z).astype(np.float64)
  z64 = z.astype(np.float64)
  with np.errstate(over="ignore"):
    want = z64 / (1.0 + np.exp(-z64))
  ulp = np.spacing(np.abs(want).astype(np.float32)).astype(np.float64)
  err = np.abs(got - want)
  flushed = (z < -87.33) | (np.abs(want) < np.finfo(np.float32).tiny)
  assert np.all(np.abs(got[flushed]) < 2e-36)
  np.testing.assert_array_equal(got[flushed], np.asarray(jax.jit(jax.nn.silu)(z[flushed])))
  ratio = err / ulp
  assert np.all((err <= 3 * ulp) | flushed), float(np.max(ratio[~flushed]))


def test_gate_at_special_values():
  """NaN stays NaN; silu(+Inf) = +Inf; silu(-Inf) = -Inf * 0 = NaN (as XLA's sigmoid times z);
  signed zeros and the edges of exp's range."""
  z = np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, 88.7, 89.5, -103.0, -104.5, -200.0, 200.0],
               np.float32)
  got = _gate_of(np.concatenate([z, np.zeros(64 - z.size, np.float32)]))[:z.size]
  xla = np.asarray(jax.jit(jax.nn.silu)(jnp.asarray(z)))
  np.testing.assert_array_equal(np.isnan(got), np.isnan(xla))
  np.testing.assert_allclose(got[~np.isnan(got)], xla[~np.isnan(xla)], rtol=3e-7, atol=1e-44)
  assert got[1] == np.inf and np.isnan(got[2]) and got[3] == 0.0


@pytest.mark.parametrize("before", [False, True])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("groups", [1, 4])
def test_kernels_match_their_definitions(before, dtype, groups):
  """The forward and backward kernels against the primitives' jax.numpy definitions (what the
  reference path and every higher derivative run), on rows with vector loops and scalar tails,
  an outlier first, an offset row and a NaN row; with `groups`, row r scaled by scale row
  r % groups (Mamba-2's groups as rows) and dscale summed per group."""
  rng = np.random.default_rng(1)
  x = rng.normal(size=(36, 67)).astype(np.float32)
  x[3, 0] = 3e4
  x[5] += 1e5
  x[7, 10] = np.nan
  z = rng.normal(size=x.shape).astype(np.float32) * 4
  ct = rng.normal(size=x.shape).astype(np.float32)
  s = np.linspace(0.5, 1.5, groups * 67, dtype=np.float32)
  x, z, ct = (jnp.asarray(a, dtype) for a in (x, z, ct))
  kw = dict(eps=1e-5, before=before, groups=groups)
  got = (gated.rows_gated_forward_p.bind(x, z, s, **kw)
         + gated.rows_gated_backward_p.bind(x, z, s, ct, **kw))
  want = jax.jit(lambda *a: gated._forward_reference(*a[:3], **kw)
                 + gated._backward_reference(*a, **kw))(x, z, s, ct)
  tol = 1e-5 if dtype == jnp.float32 else 1e-2
  for g, w in zip(got, want, strict=True):
    g, w = (np.asarray(a.astype(jnp.float32), np.float64) for a in (g, w))
    assert g.dtype == w.dtype and g.shape == w.shape
    np.testing.assert_array_equal(np.isnan(g), np.isnan(w))
    finite = ~np.isnan(w)
    if not finite.any():   # dscale: its sums over rows include the NaN row
      continue
    np.testing.assert_allclose(g[finite], w[finite], rtol=tol,
                               atol=tol * float(np.max(np.abs(w[finite]))))


def test_vmap_falls_back_to_the_definition():
  """A vmapped call is the per-example calls stacked."""
  rng = np.random.default_rng(2)
  x, z = (jnp.asarray(rng.normal(size=(3, 8, 40)), jnp.float32) for _ in range(2))
  s = jnp.asarray(rng.normal(size=(40,)), jnp.float32)
  fn = lambda x, z: gated.gated_rms_norm(x, z, s, 1, 1e-6, before=False)
  np.testing.assert_allclose(jax.vmap(fn)(x, z), np.stack([fn(a, b) for a, b in zip(x, z)]),
                             rtol=1e-6, atol=1e-6)
