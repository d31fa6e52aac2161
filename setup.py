"""Builds normjax's optional native CPU kernel; everything else is in pyproject.toml.

The C++ sources in `normjax/_src/kernels/cpu/` (layer/RMS/instance norm forward and backward
over contiguous rows, and per-channel moments for batch/instance/group norm) are compiled
against the XLA FFI headers vendored in `normjax/_src/kernels/cpu/third_party` (from jaxlib; no
jaxlib is needed to build). It is optional: without a C++ compiler the build goes on without it, and normjax uses its
`jax.numpy` definitions instead (`normjax._src.kernels.cpu.NATIVE` says which).

The library runs on every x86-64 CPU: it is compiled for the baseline instruction set, and its
loops also for AVX2+FMA and AVX-512, picked at run time (`normjax._src.kernels.cpu.CPU_LEVEL`). Set
`NORMJAX_NATIVE_MARCH=native` (or any other `-march` value) at build time to compile the
baseline for a given CPU instead, for a machine-specific build.
"""

import os

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

_HERE = os.path.dirname(os.path.abspath(__file__))
_NATIVE = os.path.join("normjax", "_src", "kernels", "cpu")

# -ffp-contract=off: no FMA contraction, so that every instruction-set level rounds alike
# (bit-identical results on every CPU). Warnings are errors in tests/test_kernels_cpu.py.
_FLAGS = ["-std=c++17", "-O3", "-ffp-contract=off", "-Wall", "-Wextra",
          "-isystem", os.path.join(_HERE, _NATIVE, "third_party")]


class AlwaysRebuild(build_ext):
  """build_ext that recompiles every time: setuptools' timestamp check can reuse an object
  in a stale build/ tree (a changed header, a checkout with older timestamps)."""

  def finalize_options(self):
    super().finalize_options()
    self.force = True


def _flags():
  march = os.environ.get("NORMJAX_NATIVE_MARCH")
  return _FLAGS + ([f"-march={march}"] if march else [])


setup(
    ext_modules=[
        Extension(
            "normjax._src.kernels.cpu._normalize",
            sources=[os.path.join(_NATIVE, name) for name in (
                "handlers_rows.cc", "handlers_moments.cc", "levels.cc", "threads.cc")],
            depends=[os.path.join(_NATIVE, name) for name in (
                "kernels.h", "threads.h", "level.h", "level_vectors.h", "level_rows.h",
                "level_columns.h", "level_gated.h", "level_tanh.h")],
            language="c++",
            extra_compile_args=_flags(),
            optional=True,
        )
    ],
    cmdclass={"build_ext": AlwaysRebuild},
)
