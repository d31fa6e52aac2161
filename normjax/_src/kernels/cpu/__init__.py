"""normjax's native CPU kernels: the C++ sources here (`handlers_*.cc`, `levels.cc`,
`threads.cc`), built by setup.py into `_normalize*.so`.

Importing this package registers the kernels with XLA as FFI targets for the CPU platform
(`NATIVE` is True) if the library was built; `normjax._src.kernels.primitives` lowers the
primitives to them on CPU. Set `NORMJAX_NATIVE=0` before importing normjax to use the
primitives' `jax.numpy` definitions everywhere.

`CPU_LEVEL` is the instruction-set level the kernels' loops run at on this CPU ("baseline",
"avx2" or "avx512"; None without the library). Every level gives the same results bit for
bit; `NORMJAX_CPU_LEVEL=baseline|avx2` caps it (set before importing normjax).
"""

import ctypes
import glob
import os

import jax

TARGETS = tuple(f"Normjax{kind}{dtype}" for kind in ("RowsForward", "RowsBackward",
                                                      "ColumnMoments", "RowMoments",
                                                      "RowsAddForward", "ColumnSums",
                                                      "RowSums", "RowsGatedForward",
                                                      "RowsGatedBackward", "TanhBackward",
                                                      "RowsAddBackward")
                for dtype in ("F32", "BF16")) + ("NormjaxRowsAddForwardMixedBF16",
                                                     "NormjaxRowsAddBackwardMixedF32",
                                                     "NormjaxRowsBackwardMixedF32")


def _load() -> str | None:
  """Registers the kernels; returns the CPU level, or None without the library."""
  if os.environ.get("NORMJAX_NATIVE", "1") == "0":
    return None
  paths = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "_normalize*.so")))
  if not paths:
    return None
  library = ctypes.CDLL(paths[0])
  for name in TARGETS:
    jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(library, name)),
                                platform="cpu")
  library.NormjaxCpuLevel.restype = ctypes.c_char_p
  return library.NormjaxCpuLevel().decode()


CPU_LEVEL = _load()
NATIVE = CPU_LEVEL is not None
