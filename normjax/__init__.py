"""normjax: batch, layer, RMS, instance and group normalization for JAX, on one shared core.

Pure functions with explicit batch-statistics state (state in, new state out); Flax wrappers in
`normjax.linen` and `normjax.nnx`.
"""

from normjax._state import BatchStats
from normjax._state import init_batch_stats
from normjax.batch import batch_norm
from normjax.fold import fold_batch_norm
from normjax.fold import fold_linen_params
from normjax.group import group_norm
from normjax.group import instance_norm
from normjax.layer import layer_norm
from normjax.layer import rms_norm
from normjax.renorm import batch_renorm
from normjax.torch_interop import from_torch_state_dict
from normjax.torch_interop import to_torch_state_dict

__version__ = "0.1.0"

__all__ = (
    "BatchStats",
    "batch_norm",
    "batch_renorm",
    "fold_batch_norm",
    "fold_linen_params",
    "from_torch_state_dict",
    "group_norm",
    "init_batch_stats",
    "instance_norm",
    "layer_norm",
    "rms_norm",
    "to_torch_state_dict",
)
