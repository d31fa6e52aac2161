"""Builds normjax's optional native CPU kernel; everything else is in pyproject.toml.

`normjax/_kernels/cpu/normalize.cc` (layer/RMS/instance norm forward and backward over contiguous rows,
and per-channel moments of channels-last input) is compiled against the XLA FFI headers that
jaxlib ships. It is optional: without a C++
compiler the build goes on without it, and normjax uses its `jax.numpy` definitions instead
(`normjax._kernels.cpu.NATIVE` says which). It is compiled for the machine it is built on
(`-march=native`), as it is built at install time.
"""

import os

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class BuildWithFfiHeaders(build_ext):
  def build_extensions(self):
    import jaxlib  # a build requirement (pyproject.toml): its headers define the XLA FFI
    include = os.path.join(os.path.dirname(jaxlib.__file__), "include")
    for extension in self.extensions:
      extension.include_dirs.append(include)
    super().build_extensions()


setup(
    ext_modules=[
        Extension(
            "normjax._kernels.cpu._normalize",
            sources=["normjax/_kernels/cpu/normalize.cc"],
            language="c++",
            extra_compile_args=["-std=c++17", "-O3", "-march=native", "-Wno-attributes",
                                "-Wno-return-type"],
            optional=True,
        )
    ],
    cmdclass={"build_ext": BuildWithFfiHeaders},
)
