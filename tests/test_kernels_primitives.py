"""Tests of `normjax._src.kernels.primitives`: `has_kernel`, `define_primitive`,
`batch_by_reference`, `batch_size`, and native lowerings stepping aside for `jax.export`."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.interpreters import batching

import normjax as nj
from normjax._src.kernels import cpu
from normjax._src.kernels import primitives
from tests.helpers import rand

K = 3.0


def _scale_reference(x, *, k):
  return (x * k,)


def _mix_reference(x, y, *, k):
  """Two operands, two results, one of them a reduction (so a wrong batch axis shows)."""
  return x * k + y, jnp.sum(x * y, axis=-1)


def _like(*shapes_and_dtypes):
  return [jax.core.ShapedArray(shape, dtype) for shape, dtype in shapes_and_dtypes]


SCALE_P = primitives.define_primitive(
    "normjax_test_scale", _scale_reference, lambda x, *, k: _like((x.shape, x.dtype)))
MIX_P = primitives.define_primitive(
    "normjax_test_mix", _mix_reference,
    lambda x, y, *, k: _like((x.shape, x.dtype), (x.shape[:-1], x.dtype)))
batching.primitive_batchers[SCALE_P] = primitives.batch_by_reference(_scale_reference)
batching.primitive_batchers[MIX_P] = primitives.batch_by_reference(_mix_reference)


def _mix_numpy(x, y):
  x, y = np.float64(x), np.float64(y)
  return x * K + y, np.sum(x * y, axis=-1)


def test_has_kernel():
  """The CPU has a kernel exactly when the native library is loaded; no other platform has."""
  assert primitives.has_kernel("cpu") == cpu.NATIVE
  assert primitives.has_kernel("tpu") is False
  assert primitives.has_kernel("cuda") is False


@pytest.mark.parametrize("use_jit", [False, True])
def test_primitive_evaluates_its_reference(use_jit):
  """Eagerly and under `jit`: a list of the reference's results."""
  x, y = rand((3, 4), seed=1), rand((3, 4), seed=2)
  bind = lambda x, y: MIX_P.bind(x, y, k=K)
  out = (jax.jit(bind) if use_jit else bind)(jnp.asarray(x), jnp.asarray(y))
  assert len(out) == 2 and out[1].shape == (3,)
  for got, expected in zip(out, _mix_numpy(x, y), strict=True):
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-6)
  (scaled,) = SCALE_P.bind(jnp.asarray(x), k=K)
  np.testing.assert_allclose(np.asarray(scaled), np.float64(x) * K, rtol=1e-6)


def test_primitive_jvp_and_grad():
  """Forward mode by the reference's JVP: `d(xk + y) = k dx + dy`, `d(sum xy) = sum(dx y +
  x dy)`; reverse mode transposes it."""
  x, y, dx, dy = (rand((3, 4), seed=s) for s in range(4))
  primal, tangent = jax.jvp(lambda x, y: MIX_P.bind(x, y, k=K), (jnp.asarray(x), jnp.asarray(y)),
                            (jnp.asarray(dx), jnp.asarray(dy)))
  for got, expected in zip(primal, _mix_numpy(x, y), strict=True):
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-6)
  expected = (np.float64(dx) * K + dy, np.sum(np.float64(dx) * y + np.float64(x) * dy, axis=-1))
  for got, want in zip(tangent, expected, strict=True):
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)
  grad = jax.grad(lambda x: jnp.sum(MIX_P.bind(x, jnp.asarray(y), k=K)[1]))(jnp.asarray(x))
  np.testing.assert_allclose(np.asarray(grad), y, rtol=1e-6)


@pytest.mark.parametrize("in_axes", [(0, 0), (1, None), (None, 2), (2, 1)])
def test_vmap_by_reference(in_axes):
  """`jax.vmap` with `batch_by_reference`: each slice is the reference's result on that slice
  (a loop in NumPy), whichever operand is mapped and along whichever axis."""
  slices = (rand((5, 3, 4), seed=3), rand((5, 3, 4), seed=4))   # 5 slices of [3, 4] each
  args = [s[0] if axis is None else np.moveaxis(s, 0, axis) for s, axis in zip(slices, in_axes)]
  out = jax.vmap(lambda x, y: MIX_P.bind(x, y, k=K), in_axes=in_axes)(*map(jnp.asarray, args))
  for i in range(5):
    expected = _mix_numpy(*(s[0] if axis is None else s[i] for s, axis in zip(slices, in_axes)))
    for got, want in zip(out, expected, strict=True):
      np.testing.assert_allclose(np.asarray(got[i]), want, rtol=1e-6, atol=1e-6)
  (scaled,) = jax.vmap(lambda x: SCALE_P.bind(x, k=K), in_axes=1)(jnp.asarray(slices[0]))
  np.testing.assert_allclose(np.asarray(scaled), np.moveaxis(np.float64(slices[0]), 1, 0) * K,
                             rtol=1e-6)


@pytest.mark.parametrize("dims, expected", [((0, None), 2), ((None, 1), 5), ((2, 0), 7)])
def test_batch_size(dims, expected):
  """The size of the mapped axis of the first mapped operand."""
  args = (np.zeros((2, 3, 7)), np.zeros((7, 5)))
  assert primitives.batch_size(args, dims) == expected


def _normjax_calls(text):
  return re.findall(r"custom_call @(Normjax\w+)", text)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_native_lowering_steps_aside_for_export(dtype):
  """An exported `layer_norm` holds no call to a `Normjax` FFI target (it runs where normjax was
  never imported); lowered for this process (`jit`), it calls the native kernel."""
  x = jnp.asarray(rand((4, 16), seed=5), dtype)
  fn = jax.jit(lambda x: nj.layer_norm(x))
  with nj.implementation("native" if cpu.NATIVE else "reference"):
    exported = jax.export.export(fn)(x).mlir_module()
    lowered = fn.lower(x).as_text()
  assert "Normjax" not in exported and not _normjax_calls(exported)
  if not cpu.NATIVE:
    pytest.skip("native CPU kernels not built (or NORMJAX_NATIVE=0): nothing to step aside")
  assert _normjax_calls(lowered)
