"""Kernel primitives: a `jax.numpy` definition from `normjax._core`, and per-platform lowerings.

A primitive here is defined by a reference function (built from `normjax._core` on a 2-D or
3-D view of the input). The reference gives its lowering on every platform, its JVP (so
forward mode and every higher order work), its eager evaluation and the batching fallback.
`LOWERINGS` is the one place where faster lowerings are registered, per platform: today the
native CPU library (`normjax/_kernels/cpu`, XLA FFI targets); a Pallas kernel for GPU or TPU
would be one more entry.

A native lowering steps aside for the reference when the program is lowered for `jax.export`
(JAX's lowering parameters say so): an exported program then contains only StableHLO that
JAX's compatibility guarantees cover, and runs where normjax was never imported.
"""

from __future__ import annotations

import functools
import numbers
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jex_core
from jax.interpreters import ad, batching, mlir

from normjax._kernels import cpu

F32 = jnp.dtype(jnp.float32)
# Input dtypes the native kernels take, and the suffix of their FFI target names.
NATIVE_DTYPES = {jnp.dtype(jnp.float32): "F32", jnp.dtype(jnp.bfloat16): "BF16"}
# platform -> whether its native lowering is available (the FFI targets are registered).
LOWERINGS = {"cpu": cpu.NATIVE}


def has_kernel(platform: str) -> bool:
  """Whether primitives lower to a native kernel on `platform`."""
  return LOWERINGS.get(platform, False)


@functools.lru_cache(maxsize=None)
def _compiled_bind(p, params):
  """Eager evaluation of primitive `p`: compiled, so that the kernel runs as under jit."""
  return jax.jit(lambda *args: p.bind(*args, **dict(params)))


def define_primitive(name: str, reference: Callable, abstract_eval: Callable,
                     target: str | None = None) -> jex_core.Primitive:
  """A primitive defined by `reference` (a jax.numpy function returning a tuple of arrays).

  Args:
    name: the primitive's name.
    reference: `reference(*operands, **params)`, the definition (from `normjax._core`).
    abstract_eval: shapes and dtypes of the outputs.
    target: the native kernel's FFI target name without its dtype suffix, or None.

  Returns:
    The primitive, with its lowerings, JVP and eager evaluation registered; its batching
    rule is the caller's (see `batch_by_reference`).
  """
  p = jex_core.Primitive(name)
  p.multiple_results = True
  p.def_impl(lambda *args, **params: _compiled_bind(p, tuple(sorted(params.items())))(*args))
  p.def_abstract_eval(abstract_eval)
  reference_lowering = mlir.lower_fun(reference, multiple_results=True)
  mlir.register_lowering(p, reference_lowering)
  for platform, available in LOWERINGS.items():
    if target is not None and available:
      mlir.register_lowering(p, _native_lowering(target, reference_lowering),
                             platform=platform)

  def jvp(primals, tangents, **params):
    tangents = tuple(ad.instantiate_zeros(t) for t in tangents)
    primals_out, tangents_out = jax.jvp(functools.partial(reference, **params), tuple(primals),
                                        tangents)
    return list(primals_out), list(tangents_out)
  ad.primitive_jvps[p] = jvp
  return p


def _attribute(value):
  """An FFI attribute: floats as float32, bools as bool, integers as int64."""
  if isinstance(value, (bool, np.bool_)):
    return bool(value)
  if isinstance(value, (numbers.Integral, np.integer)):
    return np.int64(value)
  return np.float32(value)


def _native_lowering(target, reference_lowering):
  def lowering(ctx, *args, **params):
    dtype = NATIVE_DTYPES.get(jnp.dtype(ctx.avals_in[0].dtype))
    if dtype is None or ctx.module_context.lowering_parameters.for_export:
      return reference_lowering(ctx, *args, **params)
    params = {k: _attribute(v) for k, v in params.items()}
    return jax.ffi.ffi_lowering(f"{target}{dtype}")(ctx, *args, **params)
  return lowering


def batch_by_reference(reference: Callable) -> Callable:
  """A batching rule: `jax.vmap` of the `jax.numpy` definition."""
  def rule(args, dims, **params):
    outs = jax.vmap(functools.partial(reference, **params), in_axes=tuple(dims))(*args)
    return outs, [0] * len(outs)
  return rule


def batch_size(args, dims) -> int:
  """The size of the vmapped axis."""
  return next(a.shape[d] for a, d in zip(args, dims) if d is not None)
