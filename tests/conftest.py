"""Test configuration: several host devices for the sharding tests, strict promotion rules."""

import os

# Must be set before jax initializes its backends: four CPU devices for pmap/shard_map tests.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")

import jax  # noqa: E402
import pytest  # noqa: E402

# Like equinox's test suite: no implicit dtype or rank promotion inside the library.
jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")


# Modules whose every test runs on `reference-gpu` in the default run too; elsewhere that
# implementation's cases are `slow` (CI runs them): the GPU branches are also tested directly
# by test_numerics_platform.py and test_numerics_rounding.py, and all of them by the oracle suite.
GPU_BRANCHES_BY_DEFAULT = ("test_dispatch.py", "test_numerics_platform.py",
                           "test_numerics_rounding.py")
# The tests whose `pallas` cases run by default (Pallas interpret mode is slow: elsewhere they
# are `slow`, and CI runs them): the oracle suite's float64 and gradient checks.
PALLAS_BY_DEFAULT = ("test_dispatch.py::test_matches_float64",
                     "test_dispatch.py::test_overflow_nan_and_inf_give_nan_statistics",
                     "test_dispatch.py::test_gradients_match_the_reference_implementation")


def pytest_collection_modifyitems(items):
  for item in items:
    params = getattr(getattr(item, "callspec", None), "params", {})
    if (params.get("implementation") == "reference-gpu"
        and item.path.name not in GPU_BRANCHES_BY_DEFAULT):
      item.add_marker(pytest.mark.slow)
    if (params.get("implementation") == "pallas"
        and f"{item.path.name}::{item.originalname}" not in PALLAS_BY_DEFAULT):
      item.add_marker(pytest.mark.slow)


@pytest.fixture(params=["reference", "reference-gpu", "native", "pallas"])
def implementation(request):
  """Runs the test on one implementation, chosen with `nj.implementation` (the seam every
  variant's dispatch reads): the reference, the reference as lowered for a GPU, the native
  CPU kernels (skipped where not built), and the Pallas kernels (in interpret mode on CPU).
  A later kernel joins by adding its name here.

  `reference-gpu` runs, on the CPU, the branches the numerics pick with
  `lax.platform_dependent` for CUDA/ROCm (no `cond` in the variance; `reduce_precision` as the
  bfloat16 pin; `normjax._src.numerics.platform.lowered_for`), so that their numerics are
  tested where no GPU is."""
  import contextlib  # pylint: disable=import-outside-toplevel

  import normjax as nj  # pylint: disable=import-outside-toplevel
  from normjax._src.kernels import primitives  # pylint: disable=import-outside-toplevel
  from normjax._src.numerics import platform  # pylint: disable=import-outside-toplevel
  if request.param == "native" and not primitives.has_kernel("cpu"):
    pytest.skip("native CPU kernels not built (or NORMJAX_NATIVE=0)")
  name = request.param if request.param in ("native", "pallas") else "reference"
  lowered = platform.lowered_for("cuda") if request.param == "reference-gpu" else (
      contextlib.nullcontext())
  with nj.implementation(name), lowered:
    yield request.param
