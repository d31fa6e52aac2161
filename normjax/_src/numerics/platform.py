"""Which platform's branch of `lax.platform_dependent` the numerics take.

The numerics choose per platform in two places (the variance's cond, which GPUs skip; the
rounding pin, materialized on CPU). `lowered_for(platform)` makes them take that platform's
branches on whatever device the program runs, so that the GPU's numerics are tested where no
GPU is (the tests' `reference-gpu` implementation). Outside it, `platform_dependent` is
`lax.platform_dependent`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
from jax import lax

# A jit-cache-sensitive context: a function traced under `lowered_for("cuda")` is traced again
# outside it.
_LOWERED_FOR = jax.make_user_context(default_value=None)


def lowered_for(platform: str | None) -> Any:
  """A context manager (thread-local, nestable): the numerics take `platform`'s branches."""
  return _LOWERED_FOR(platform)


def platform_dependent(*args: Any, default: Callable, **branches: Callable) -> Any:
  """`lax.platform_dependent(*args, default=default, **branches)`, or, inside
  `lowered_for(p)`, the branch for `p` (else `default`) called directly."""
  pretend = _LOWERED_FOR.value
  if pretend is None:
    return lax.platform_dependent(*args, default=default, **branches)
  return branches.get(pretend, default)(*args)
