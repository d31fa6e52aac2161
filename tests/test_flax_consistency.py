"""normjax.linen against normjax.nnx (in the spirit of flax's TestLinenConsistency, one
parametrized test over the five modules and their options instead of two parallel files): the
same variables give the same outputs and the same updated batch statistics, bit for bit.

With a narrower `dtype` than the input, flax's nnx modules cast the input to `dtype` before
normalizing (their default `promote_dtype`) and its linen modules do not, and ours follow each;
those cases give the nnx module `promote_dtype=lambda args, **_: args` (as flax's own test does
for BatchNorm), so both compute from the same input.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from flax_helpers import SHAPE, data, randomize
from flax_helpers import fast_compiles  # noqa: F401  (module-scoped autouse fixture)

import normjax.linen as njnn
import normjax.nnx as njnnx
from tests.helpers import slow_except

CASES = [  # (module, num_features, options, x shape)
    ("BatchNorm", 8, {}, SHAPE),
    ("BatchNorm", 5, dict(axis=1, momentum=0.9, use_bias=False), SHAPE),
    ("BatchNorm", 40, dict(axis=(1, 3)), SHAPE),
    ("BatchNorm", 8, dict(momentum=None, unbiased_running_var=True, epsilon=1e-3), SHAPE),
    ("BatchNorm", 8, {}, (1, 8)),                          # one value per channel
    ("LayerNorm", 8, {}, SHAPE),
    ("LayerNorm", 8, dict(reduction_axes=(1, 2), feature_axes=-1), SHAPE),
    ("LayerNorm", 32, dict(reduction_axes=(-2, -1), feature_axes=(-2, -1)), SHAPE),
    ("RMSNorm", 8, {}, SHAPE),
    ("RMSNorm", 32, dict(reduction_axes=(1, 2, 3), feature_axes=(2, 3)), SHAPE),
    ("InstanceNorm", 8, {}, SHAPE),
    ("InstanceNorm", 5, dict(feature_axes=1, use_scale=False), SHAPE),
    ("InstanceNorm", 8, {}, (6, 8)),                       # nothing left to reduce
    ("GroupNorm", 8, dict(num_groups=4), SHAPE),
    ("GroupNorm", 8, dict(num_groups=None, group_size=2, use_bias=False), SHAPE),
    ("GroupNorm", 5, dict(num_groups=1, feature_axis=1), SHAPE),
]
DTYPES = {"float32": {}, "float16": dict(dtype=jnp.float16, param_dtype=jnp.float16)}


def _identity_promotion(args, **_):
  return args


@pytest.mark.parametrize("masked", slow_except([False, True], True), ids=["", "mask"])
@pytest.mark.parametrize("dtype", slow_except(list(DTYPES), "float32"))
@pytest.mark.parametrize("name,num_features,options,shape",
                         slow_except(CASES, *CASES[::5], unpack=True),
                         ids=[f"{c[0]}-{c[2]}-{c[3]}" for c in CASES])
def test_linen_and_nnx_agree_bit_for_bit(name, num_features, options, shape, dtype, masked):
  options = dict(options, **DTYPES[dtype])
  x, mask = data(jax.random.key(0), shape)
  mask = mask if masked else None
  batch = name == "BatchNorm"
  linen = getattr(njnn, name)(**options)
  variables = randomize(linen.init(jax.random.key(1), x, **(dict(use_running_average=True)
                                                              if batch else {})),
                        jax.random.key(2))
  nnx_options = dict(options, promote_dtype=_identity_promotion) if dtype != "float32" else options
  module = getattr(njnnx, name)(num_features, **nnx_options, rngs=nnx.Rngs(3))
  state = nnx.state(module)
  flat = jax.tree.map(lambda a: a.reshape(-1) if a.ndim else a,
                      {**variables["params"], **variables.get("batch_stats", {})})
  nnx.replace_by_pure_dict(state, flat)
  nnx.update(module, state)

  def linen_call(variables, train):
    if not batch:
      return linen.apply(variables, x, mask=mask), {}
    y, upd = linen.apply(variables, x, use_running_average=not train, mask=mask,
                         mutable=["batch_stats"])
    return y, upd["batch_stats"]

  for train in ((True, True, False) if batch else (True,)):   # two training steps, then eval
    y_linen, stats = linen_call(variables, train)
    y_nnx = module(x, mask=mask, **(dict(use_running_average=not train) if batch else {}))
    assert y_nnx.dtype == y_linen.dtype
    np.testing.assert_array_equal(y_nnx, y_linen)
    if batch:
      variables = {**variables, "batch_stats": stats}
      ours = nnx.to_pure_dict(nnx.state(module, nnx.BatchStat))
      jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b.reshape(a.shape)), ours,
                   dict(stats))


def test_the_module_sets_match():
  assert set(njnn.__all__) == set(njnnx.__all__) == {
      "AdaptiveGroupNorm", "AdaptiveLayerNorm", "AddLayerNorm", "AddRMSNorm", "BatchNorm",
      "BatchRenorm", "DynamicTanh", "FilterResponseNorm", "GroupNorm", "InstanceNorm",
      "LayerNorm", "RMSNorm", "SpectralNorm", "WSConv", "WeightNorm"}
  for name in njnn.__all__:
    assert issubclass(getattr(njnn, name), nn.Module)
    assert issubclass(getattr(njnnx, name), nnx.Module)
