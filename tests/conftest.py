"""Test configuration: several host devices for the sharding tests, strict promotion rules."""

import os

# Must be set before jax initializes its backends: four CPU devices for pmap/shard_map tests.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")

import jax  # noqa: E402
import pytest  # noqa: E402

# Like equinox's test suite: no implicit dtype or rank promotion inside the library.
jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture(params=["reference", "reference-gpu", "native"])
def implementation(request, monkeypatch):
  """Pins `normjax._dispatch` to one implementation for the test: every test taking this
  fixture runs on the reference, on the reference as lowered for a GPU, and on the native CPU
  kernels (skipped where not built). A later kernel joins by adding its name here.

  `reference-gpu` runs, on the CPU, the branches `normjax._core` picks with
  `lax.platform_dependent` for CUDA/ROCm (no `cond` in the variance; `reduce_precision` as the
  bfloat16 pin), so that their numerics are tested where no GPU is."""
  from normjax import _core, _dispatch
  from normjax._src.kernels import primitives
  if request.param.startswith("reference"):
    monkeypatch.setattr(_dispatch, "plan", lambda *args, **kwargs: _dispatch.REFERENCE)
    if request.param == "reference-gpu":
      monkeypatch.setattr(_core, "lax", _as_lowered_for("cuda"))
  elif not primitives.has_kernel("cpu"):
    pytest.skip("native CPU kernels not built (or NORMJAX_NATIVE=0)")
  return request.param


def _as_lowered_for(platform):
  """`jax.lax` whose `platform_dependent` takes the branch given for `platform` (else the
  default) whatever the platform the program runs on."""
  import types  # pylint: disable=import-outside-toplevel
  from jax import lax  # pylint: disable=import-outside-toplevel

  def platform_dependent(*args, default=None, **per_platform):
    return per_platform.get(platform, default)(*args)
  return types.SimpleNamespace(**{**vars(lax), "platform_dependent": platform_dependent})
