"""Dynamic tanh's backward kernel (normjax/_src/kernels/tanh.py).

The public function's values and derivatives are tested in tests/test_tanh.py (on every
implementation); the kernel's bits at every CPU level in tests/test_kernels_cpu_portability.py.
Here: the kernel's own `tanh` (where the forward's is not saved) against float64 at every
float32 exponent, the kernel against its definition (the transpose of the JVP) on adversarial
rows with `t` saved and recomputed, and the training program: bfloat16 saves the forward's
tanh for the kernel, float32 has the kernel recompute it.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from normjax._src.kernels import primitives
from normjax._src.kernels import tanh

pytestmark = pytest.mark.skipif(not primitives.has_kernel("cpu"),
                                reason="needs the native CPU kernels")


def _tanh_of(x: np.ndarray) -> np.ndarray:
  """The kernel's own tanh(x) (not saved: recomputed), read off dscale (the sum over rows of
  g * tanh(alpha * x)) for one row, alpha = 1 and g = 1."""
  x = jnp.asarray(np.asarray(x, np.float32)[None])
  n = x.shape[1]
  _, _, dscale, _ = tanh.tanh_backward_p.bind(x, x, jnp.ones((1,), jnp.float32),
                                              jnp.ones((n,), jnp.float32), jnp.ones_like(x),
                                              saved=False)
  return np.asarray(dscale)


def test_tanh_is_within_three_ulp_at_every_exponent():
  """tanh within 3 ulp of float64's for 2^16 values over [-50, 50] and every power of two
  either sign (both branches: the polynomial up to 0.625, the exp form above, +-1 beyond);
  where the result is subnormal (XLA's threads, which run the kernel, flush subnormals to
  zero) it is within float32's smallest normal number of the true value. NaN kept."""
  rng = np.random.default_rng(0)
  powers = np.ldexp(1.0, np.arange(-149, 7)).astype(np.float32)
  x = np.concatenate([rng.uniform(-50, 50, size=1 << 16), powers, -powers, powers * 1.37,
                      -powers * 1.37, [0.625, -0.625, 0.62500006, np.inf, -np.inf]])
  x = x.astype(np.float32)
  got = _tanh_of(x).astype(np.float64)
  want = np.tanh(x.astype(np.float64))
  flushed = np.abs(want) < np.finfo(np.float32).tiny
  assert np.all(np.abs(got[flushed] - want[flushed]) < np.finfo(np.float32).tiny)
  ulp = np.spacing(np.abs(want).astype(np.float32)).astype(np.float64)
  err = np.abs(got - want)
  assert np.all((err <= 3 * ulp) | flushed), float(np.max((err / ulp)[~flushed]))
  assert np.isnan(_tanh_of(np.array([np.nan, 1.0], np.float32))[0])


@pytest.mark.parametrize("saved", [True, False])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_kernel_matches_its_definition(dtype, saved):
  """dx, dalpha, dscale and dbias against the primitive's jax.numpy definition, on rows with
  vector loops and scalar tails, an outlier first, a 1e5 offset (saturated) and small values;
  a NaN in a row gives NaN in the sums it enters, as the definition. A saved `t` is any
  float32 array in [-1, 1] (here not tanh(alpha * x), so that a kernel or a definition that
  recomputed it instead of reading it fails), with exact zeros and +-1."""
  rng = np.random.default_rng(1)
  x = rng.normal(size=(137, 67)).astype(np.float32)   # more rows than a flush (128)
  x[3, 0] = 3e4
  x[5] += 1e5
  x[6] *= 1e-4
  g = rng.normal(size=x.shape).astype(np.float32)
  alpha = jnp.asarray([0.7], jnp.float32)
  scale = jnp.asarray(np.linspace(0.5, 1.5, 67, dtype=np.float32))
  for nan in (False, True):
    if nan:
      x[7, 10] = np.nan
    xd = jnp.asarray(x, dtype)
    t = rng.uniform(-1.0, 1.0, size=x.shape).astype(np.float32)
    t[0, :3], t[1, :3] = (0.0, 1.0, -1.0), (-1.0, 1.0, 0.0)
    args = (xd, jnp.asarray(t), alpha, scale, jnp.asarray(g, dtype))
    got = tanh.tanh_backward_p.bind(*args, saved=saved)
    want = jax.jit(functools.partial(tanh._backward_reference, saved=saved))(*args)
    if saved:   # the definition reads t too: it differs from the recomputing one
      other = jax.jit(functools.partial(tanh._backward_reference, saved=False))(*args)
      assert not np.allclose(np.asarray(want[2]), np.asarray(other[2]), rtol=0.1)
    tol = 1e-5 if dtype == jnp.float32 else 1e-2
    for a, w in zip(got, want, strict=True):
      a, w = (np.asarray(v.astype(jnp.float32), np.float64) for v in (a, w))
      assert a.shape == w.shape
      np.testing.assert_array_equal(np.isnan(a), np.isnan(w))
      ok = ~np.isnan(w)
      if ok.any():
        np.testing.assert_allclose(a[ok], w[ok], rtol=tol, atol=tol * float(np.abs(w[ok]).max()))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_training_program_computes_tanh_once(dtype):
  """The gradient of `dynamic_tanh` on the native path is the backward kernel's: for bfloat16
  it takes the forward's float32 tanh (saved), for float32 it recomputes it. Either way a
  training step's jaxpr holds one `tanh` (a forward that computed it twice would hold two),
  and its compiled program calls the kernel."""
  import normjax as nj
  x = jnp.ones((4, 8), dtype)
  step = jax.grad(lambda x, a, w: jnp.sum(nj.dynamic_tanh(x, a, w, jnp.zeros(8)).astype(
      jnp.float32) ** 2), (0, 1, 2))
  args = (x, jnp.asarray(0.5), jnp.ones(8))
  jaxpr = jax.make_jaxpr(step)(*args)
  assert str(jaxpr).count(" tanh ") == 1, jaxpr
  backward = [e for e in jaxpr.eqns if e.primitive is tanh.tanh_backward_p]
  assert len(backward) == 1 and backward[0].invars[1].aval.dtype == jnp.float32
  assert backward[0].params["saved"] == (dtype == jnp.bfloat16)
  assert "NormjaxTanhBackward" in jax.jit(step).lower(*args).compile().as_text()
