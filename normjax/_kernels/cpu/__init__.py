"""normjax's native CPU kernels: `normalize.cc`, built by setup.py into `_normalize*.so`.

Importing this package registers the kernels with XLA as FFI targets for the CPU platform
(`NATIVE` is True) if the library was built; `normjax._kernels.primitives` lowers the
primitives to them on CPU. Set `NORMJAX_NATIVE=0` before importing normjax to use the
primitives' `jax.numpy` definitions everywhere.
"""

import ctypes
import glob
import os

import jax

TARGETS = tuple(f"Normjax{kind}{dtype}" for kind in ("RowsForward", "RowsBackward",
                                                      "ColumnMoments", "RowMoments")
                for dtype in ("F32", "BF16"))


def _load() -> bool:
  if os.environ.get("NORMJAX_NATIVE", "1") == "0":
    return False
  paths = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "_normalize*.so")))
  if not paths:
    return False
  library = ctypes.CDLL(paths[0])
  for name in TARGETS:
    jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(library, name)),
                                platform="cpu")
  return True


NATIVE = _load()
