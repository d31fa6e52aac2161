"""normjax: batch, layer, RMS, instance and group normalization for JAX, on one shared core.

Pure functions with explicit batch-statistics state (state in, new state out); Flax wrappers in
`normjax.linen` and `normjax.nnx`.
"""

from normjax._state import BatchStats
from normjax._state import SpectralState
from normjax._state import init_batch_stats
from normjax.batch import batch_norm
from normjax.fold import fold_batch_norm
from normjax.fold import fold_linen_params
from normjax.group import group_norm
from normjax.group import instance_norm
from normjax.layer import add_layer_norm
from normjax.layer import add_rms_norm
from normjax.layer import layer_norm
from normjax.layer import rms_norm
from normjax.renorm import batch_renorm
from normjax.response import filter_response_norm
from normjax.response import tlu
from normjax.torch_interop import from_torch_state_dict
from normjax.torch_interop import to_torch_state_dict
from normjax.weights import init_spectral_state
from normjax.weights import spectral_normalize
from normjax.weights import weight_norm
from normjax.weights import weight_standardize

__version__ = "0.2.0"

__all__ = (
    "add_layer_norm",
    "add_rms_norm",
    "BatchStats",
    "SpectralState",
    "batch_norm",
    "batch_renorm",
    "filter_response_norm",
    "fold_batch_norm",
    "fold_linen_params",
    "from_torch_state_dict",
    "group_norm",
    "init_batch_stats",
    "init_spectral_state",
    "instance_norm",
    "layer_norm",
    "rms_norm",
    "spectral_normalize",
    "tlu",
    "to_torch_state_dict",
    "weight_norm",
    "weight_standardize",
)
