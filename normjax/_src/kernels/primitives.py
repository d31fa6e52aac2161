"""Kernel primitives: a `jax.numpy` definition from the numerics, and per-platform lowerings.

A primitive here is defined by a reference function (built from `normjax._src.numerics` on a 2-D or
3-D view of the input). The reference gives its lowering on every platform, its JVP (so
forward mode and every higher order work), its eager evaluation and the batching fallback.
`LOWERINGS` is the one place where faster lowerings are registered, per implementation and
platform: the native CPU library (`normjax/_src/kernels/cpu`, XLA FFI targets), and the Pallas
kernels (`normjax._src.kernels.pallas`: Triton on CUDA, Mosaic on TPU, interpret mode on CPU).
A primitive with a Pallas kernel takes the static parameter `implementation` (`"native"`, the
default, or `"pallas"`) naming the lowering it asks for; its definition does not depend on it.

A kernel's lowering steps aside for the reference when the program is lowered for `jax.export`
(JAX's lowering parameters say so): an exported program then contains only StableHLO that
JAX's compatibility guarantees cover, and runs where normjax was never imported.
"""

from __future__ import annotations

import functools
import numbers
from collections.abc import Callable
from collections.abc import Sequence
from typing import TypeAlias
from typing import cast

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jex_core
from jax.interpreters import ad
from jax.interpreters import mlir

from normjax._src.kernels import cpu
from normjax._src.kernels import pallas
from normjax._src.shapes import varying_axes

F32 = jnp.dtype(jnp.float32)
# Input dtypes the native (and Pallas) kernels take, and the suffix of the FFI target names.
NATIVE_DTYPES = {jnp.dtype(jnp.float32): "F32", jnp.dtype(jnp.bfloat16): "BF16"}
# implementation -> platform -> whether that implementation's lowering is available there:
# "native" where the FFI targets are registered; "pallas" on CPU (interpret mode), CUDA, TPU.
LOWERINGS = {"native": {"cpu": cpu.NATIVE},
             "pallas": {platform: True for platform in pallas.PLATFORMS}}
# The static parameter naming the lowering a primitive with a Pallas kernel asks for.
IMPLEMENTATION = "implementation"

# The static parameters of a primitive (eps, centered, per_row, group_size, pool_outer).
Param: TypeAlias = bool | int | float | np.number | np.bool_
# A reference definition: operands (and static parameters by keyword) -> a tuple of outputs.
Reference: TypeAlias = Callable[..., tuple[jax.Array, ...]]
# An abstract evaluation: operands' avals (and static parameters by keyword) -> outputs' avals.
AbstractEval: TypeAlias = Callable[..., list[jax.core.ShapedArray]]
# A batching rule: (operands, their batch axes, **params) -> (outputs, their batch axes).
BatchRule: TypeAlias = Callable[..., tuple[Sequence[jax.Array], Sequence[int]]]
# A linear operand of a tangent primitive's transpose rule: an array, a symbolic zero, or the
# primal being transposed for.
Linear: TypeAlias = jax.Array | ad.Zero | ad.UndefinedPrimal


def has_kernel(platform: str, implementation: str = "native") -> bool:
  """Whether primitives lower to `implementation`'s kernels on `platform`."""
  return LOWERINGS[implementation].get(platform, False)


def _definition_params(params: dict[str, Param]) -> dict[str, Param]:
  """A primitive's parameters less the lowering it asks for (which the definition ignores)."""
  return {k: v for k, v in params.items() if k != IMPLEMENTATION}


@functools.cache
def _compiled_bind(p: jex_core.Primitive,
                   params: tuple[tuple[str, Param], ...]) -> Callable[..., list[jax.Array]]:
  """Eager evaluation of primitive `p`: compiled, so that the kernel runs as under jit."""
  return jax.jit(lambda *args: p.bind(*args, **dict(params)))


def define_primitive(name: str, reference: Reference, abstract_eval: AbstractEval,
                     target: str | None = None,
                     kernel: Callable[..., tuple[jax.Array, ...]] | None = None,
                     defaults: dict[str, Param] | None = None) -> jex_core.Primitive:
  """A primitive defined by `reference` (a jax.numpy function returning a tuple of arrays).

  Args:
    name: the primitive's name.
    reference: `reference(*operands, **params)`, the definition (from `normjax._src.numerics`).
    abstract_eval: shapes and dtypes of the outputs.
    target: the native kernel's FFI target name without its dtype suffix, or None.
    kernel: `kernel(*operands, platform=..., **params)`, the Pallas kernel computing the same
      outputs for a platform of `LOWERINGS["pallas"]` (`normjax._src.kernels.pallas`), or None.
      With one, the primitive takes the parameter `implementation` (`"native"` or `"pallas"`).
    defaults: parameters a bind may leave out (the definition's keyword defaults), passed to
      the native kernel as attributes when it does.

  Returns:
    The primitive, with its lowerings, JVP and eager evaluation registered; its batching
    rule is the caller's (see `batch_by_reference`).
  """
  p = jex_core.Primitive(name)
  p.multiple_results = True
  p.def_impl(lambda *args, **params: _compiled_bind(p, tuple(sorted(params.items())))(*args))
  p.def_abstract_eval(lambda *args, **params: _with_vma(abstract_eval, *args,
                                                        **_definition_params(params)))
  definition = lambda *args, **params: reference(*args, **_definition_params(params))
  reference_lowering = mlir.lower_fun(definition, multiple_results=True)
  mlir.register_lowering(p, reference_lowering)
  platforms = {platform for table in LOWERINGS.values() for platform in table}
  for platform in sorted(platforms):
    native = target if target is not None and has_kernel(platform) else None
    fast = kernel if kernel is not None and has_kernel(platform, "pallas") else None
    if native or fast:
      mlir.register_lowering(p, _kernel_lowering(platform, reference_lowering, native, fast,
                                                 defaults or {}),
                             platform=platform)

  def jvp(primals: Sequence[jax.Array], tangents: Sequence[jax.Array | ad.Zero],
          **params: Param) -> tuple[list[jax.Array], list[jax.Array]]:
    dense = tuple(ad.instantiate_zeros(t) for t in tangents)
    primals_out, tangents_out = jax.jvp(functools.partial(definition, **params),
                                        tuple(primals), dense)
    return list(primals_out), list(tangents_out)
  ad.primitive_jvps[p] = jvp
  return p


def _with_vma(abstract_eval: AbstractEval, *args: jax.core.ShapedArray,
              **params: Param) -> list[jax.core.ShapedArray]:
  """`abstract_eval`'s outputs, varying over the `shard_map` axes its operands vary over.

  Inside `jax.shard_map` (with its default `check_vma=True`) an array's type records the mesh
  axes along which it differs between devices; the outputs of a kernel that reads `x` differ
  wherever `x` does. Without this, the statistics of one device's shard were typed as equal
  on every device, and differentiating through them failed (a custom JVP rule's tangent
  varied, its primal did not). The outputs take the type of the operand that varies over the
  most axes (`x`: the parameters vary over no more than it does).
  """
  outs = abstract_eval(*args, **params)
  mats = [a for a in args if varying_axes(a)]
  if not mats:
    return outs
  a = max(mats, key=lambda a: len(varying_axes(a)))
  return [o.update(sharding=a.sharding.update(spec=(None,) * o.ndim),
                   manual_axis_type=a.manual_axis_type) for o in outs]


def linear_cotangents(grads: Sequence[jax.Array],
                      linear: Sequence[Linear]) -> list[jax.Array | None]:
  """A tangent primitive's transpose rule's results for its linear operands: each backward
  output where its operand is the primal transposed for (summed over the `shard_map` axes it
  varies over beyond that operand, `sum_to_vma`), else None."""
  return [sum_to_vma(g, v.aval) if isinstance(v, ad.UndefinedPrimal) else None
          for g, v in zip(grads, linear, strict=True)]


def sum_to_vma(ct: jax.Array, aval: jax.core.AbstractValue) -> jax.Array:
  """A cotangent psum'd over the `shard_map` axes it varies over and its primal `aval` does not.

  A parameter replicated over a mesh axis (not varying) that a kernel combines with a
  per-device `x` gets per-device partial cotangents (e.g. `dscale` summed over this device's
  rows); its cotangent is their sum over the devices (the transpose of JAX's implicit
  replicated-to-varying cast, which jax.numpy code gets automatically).
  """
  extra = tuple(sorted(varying_axes(jax.typeof(ct)) - varying_axes(aval)))
  return jax.lax.psum(ct, extra) if extra else ct


def _attribute(value: Param) -> bool | np.int64 | np.float32:
  """An FFI attribute: floats as float32, bools as bool, integers as int64."""
  if isinstance(value, (bool, np.bool_)):
    return bool(value)
  if isinstance(value, (numbers.Integral, np.integer)):
    return np.int64(value)
  return np.float32(value)


def _kernel_lowering(platform: str, reference_lowering: mlir.LoweringRule, target: str | None,
                     kernel: Callable[..., tuple[jax.Array, ...]] | None,
                     defaults: dict[str, Param]) -> mlir.LoweringRule:
  """The lowering on `platform`: the Pallas `kernel` if the primitive asks for `"pallas"`,
  else the native FFI `target` (None: the reference), for float32 and bfloat16 inputs."""
  def lowering(ctx: mlir.LoweringRuleContext, *args: mlir.ir.Value,
               **params: Param) -> Sequence[mlir.ir.Value | Sequence[mlir.ir.Value]]:
    implementation = params.get(IMPLEMENTATION, "native")
    params = _definition_params(params)
    x_aval = cast(jax.core.ShapedArray, ctx.avals_in[0])
    dtype = NATIVE_DTYPES.get(jnp.dtype(x_aval.dtype))
    if dtype is None or ctx.module_context.lowering_parameters.for_export:
      return reference_lowering(ctx, *args, **params)
    if implementation == "pallas" and kernel is not None:
      fn = functools.partial(kernel, platform=platform, **params)
      return mlir.lower_fun(fn, multiple_results=True)(ctx, *args)
    if implementation == "native" and target is not None:
      attributes = {k: _attribute(v) for k, v in {**defaults, **params}.items()}
      return jax.ffi.ffi_lowering(f"{target}{dtype}")(ctx, *args, **attributes)
    return reference_lowering(ctx, *args, **params)
  return lowering


def batch_by_reference(reference: Reference) -> BatchRule:
  """A batching rule: `jax.vmap` of the `jax.numpy` definition."""
  def rule(args: Sequence[jax.Array], dims: Sequence[int | None],
           **params: Param) -> tuple[Sequence[jax.Array], Sequence[int]]:
    outs = jax.vmap(functools.partial(reference, **_definition_params(params)),
                    in_axes=tuple(dims))(*args)
    return outs, [0] * len(outs)
  return rule


def batch_size(args: Sequence[jax.Array], dims: Sequence[int | None]) -> int:
  """The size of the vmapped axis."""
  return next(a.shape[d] for a, d in zip(args, dims, strict=True) if d is not None)
