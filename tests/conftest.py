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
