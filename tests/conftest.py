"""Test configuration: several host devices for the sharding tests, strict promotion rules."""

import os

# Must be set before jax initializes its backends: four CPU devices for pmap/shard_map tests.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")

import jax  # noqa: E402
import pytest  # noqa: E402

# Like equinox's test suite: no implicit dtype or rank promotion inside the library.
jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture(autouse=True)
def _no_leaked_config():
  yield


@pytest.fixture(params=["reference", "native"])
def implementation(request, monkeypatch):
  """Pins `normjax._dispatch` to one implementation for the test: every test taking this
  fixture runs on the reference and on the native CPU kernels (skipped where not built). A
  later kernel joins by adding its name here."""
  from normjax import _dispatch
  from normjax._kernels import primitives
  if request.param == "reference":
    monkeypatch.setattr(_dispatch, "plan", lambda *args, **kwargs: _dispatch.REFERENCE)
  elif not primitives.has_kernel("cpu"):
    pytest.skip("native CPU kernels not built (or NORMJAX_NATIVE=0)")
  return request.param
