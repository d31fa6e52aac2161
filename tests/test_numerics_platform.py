"""Tests of `normjax._src.numerics.platform`: `lowered_for` and `platform_dependent`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from normjax._src.numerics import platform
from normjax._src.numerics.moments import moments
from tests import reference as ref
from tests.helpers import rand

BRANCHES = {"cpu": 1.0, "cuda": 2.0, "rocm": 3.0, "tpu": 4.0}
DEFAULT = -1.0


def _pick(x, **branches):
  """`platform_dependent` with a branch adding `BRANCHES[p]` for each platform `p` given."""
  fns = {p: (lambda v, k=BRANCHES[p]: v + k) for p in branches}
  return platform.platform_dependent(x, default=lambda v: v + DEFAULT, **fns)


def _taken(fn, x=0.0):
  """Which branch `fn` took, read from the value it added to 0."""
  added = float(fn(jnp.float32(x)))
  return {v: k for k, v in BRANCHES.items()}.get(added, "default")


@pytest.mark.parametrize("use_jit", [False, True])
@pytest.mark.parametrize("branches, expected", [
    (("cpu", "cuda"), jax.default_backend()),   # this machine's own branch
    (("rocm", "tpu"), "default"),               # none for this machine
])
def test_outside_it_is_lax_platform_dependent(use_jit, branches, expected):
  """Outside `lowered_for`, the branch of the platform the program runs on (else `default`), as
  `lax.platform_dependent` chooses."""
  if expected not in (*BRANCHES, "default"):
    pytest.skip(f"no test branch for backend {expected}")
  expected = expected if expected in branches else "default"
  fn = lambda x: _pick(x, **dict.fromkeys(branches))
  assert _taken(jax.jit(fn) if use_jit else fn) == expected
  lowered = jax.jit(fn).lower(jnp.float32(0)).as_text()
  assert "stablehlo.case" in lowered    # the choice is in the program, not made at trace time


@pytest.mark.parametrize("use_jit", [False, True])
@pytest.mark.parametrize("lowered, branches, expected", [
    ("cuda", ("cpu", "cuda"), "cuda"),
    ("rocm", ("cpu", "cuda", "rocm"), "rocm"),
    ("rocm", ("cpu", "cuda"), "default"),     # no branch for it: the default, never the cpu one
    ("tpu", ("cpu", "cuda", "tpu"), "tpu"),
])
def test_inside_it_takes_that_platform_branch(use_jit, lowered, branches, expected):
  """Inside `lowered_for(p)`, the branch for `p` (else `default`), chosen at trace time: the
  program holds no `case`."""
  fn = lambda x: _pick(x, **dict.fromkeys(branches))
  with platform.lowered_for(lowered):
    assert _taken(jax.jit(fn) if use_jit else fn) == expected
    assert "stablehlo.case" not in jax.jit(fn).lower(jnp.float32(0)).as_text()


def test_moments_lowered_for_cuda_has_no_cond():
  """`moments` chooses its variance with a `lax.cond` (a `stablehlo.case`) inside a
  `platform_dependent`: both are in the program lowered here, neither under
  `lowered_for("cuda")`; the variance is float64 NumPy's both ways."""
  x = rand((4, 32), seed=3, loc=100.0)
  fn = lambda x: moments(x, (1,)).var
  expected = ref.moments(x, (1,))[1]
  outside = jax.jit(fn).lower(jnp.asarray(x)).as_text()
  assert outside.count("stablehlo.case") >= 2
  np.testing.assert_allclose(np.asarray(jax.jit(fn)(jnp.asarray(x))), expected, rtol=1e-5)
  with platform.lowered_for("cuda"):
    inside = jax.jit(fn).lower(jnp.asarray(x)).as_text()
    np.testing.assert_allclose(np.asarray(jax.jit(fn)(jnp.asarray(x))), expected, rtol=1e-5)
  assert "stablehlo.case" not in inside and "stablehlo.if" not in inside


def test_nesting_restores_the_outer_platform():
  """A nested `lowered_for` overrides the outer one and hands it back on exit; `None` is
  `lax.platform_dependent` again."""
  fn = lambda x: _pick(x, cpu=None, cuda=None, rocm=None)
  here = jax.default_backend()
  with platform.lowered_for("cuda"):
    assert _taken(fn) == "cuda"
    with platform.lowered_for("rocm"):
      assert _taken(fn) == "rocm"
      with platform.lowered_for(None):
        assert _taken(fn) == (here if here in ("cpu", "cuda", "rocm") else "default")
      assert _taken(fn) == "rocm"
    assert _taken(fn) == "cuda"
  assert _taken(fn) == (here if here in ("cpu", "cuda", "rocm") else "default")


def test_jit_cache_follows_the_context():
  """A function jitted and traced outside `lowered_for("cuda")` is traced again inside it (not
  served from the cache with the other platform's choice), and each trace is reused after."""
  traces = []

  @jax.jit
  def fn(x):
    traces.append(platform._LOWERED_FOR.value)  # pylint: disable=protected-access
    return _pick(x, cpu=None, cuda=None, tpu=None)

  x = jnp.float32(0)
  here = _taken(fn)
  assert len(traces) == 1
  with platform.lowered_for("cuda"):
    assert _taken(fn) == "cuda"
    assert len(traces) == 2
    assert _taken(fn) == "cuda"
  assert _taken(fn) == here
  assert float(fn(x)) == BRANCHES.get(here, DEFAULT)
  assert traces == [None, "cuda"]
