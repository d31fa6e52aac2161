"""normjax: batch, layer, RMS, instance and group normalization for JAX, on one shared core.

Pure functions with explicit batch-statistics state (state in, new state out); Flax wrappers in
`normjax.linen` and `normjax.nnx`.
"""

from normjax._state import BatchStats
from normjax._state import init_batch_stats
from normjax.batch import batch_norm
from normjax.group import group_norm
from normjax.group import instance_norm
from normjax.layer import add_layer_norm
from normjax.layer import add_rms_norm
from normjax.layer import layer_norm
from normjax.layer import rms_norm

__version__ = "0.1.0"

__all__ = (
    "add_layer_norm",
    "add_rms_norm",
    "BatchStats",
    "batch_norm",
    "group_norm",
    "init_batch_stats",
    "instance_norm",
    "layer_norm",
    "rms_norm",
)
