"""normjax: batch, layer, RMS, instance and group normalization for JAX, on one shared core.

Pure functions with explicit batch-statistics state (state in, new state out); Flax wrappers in
`normjax.linen` and `normjax.nnx`. The implementation lives in `normjax._src` (private); this
module only hands its public names on.
"""

from normjax._src.adaptive import adaptive_group_norm as adaptive_group_norm
from normjax._src.adaptive import adaptive_layer_norm as adaptive_layer_norm
from normjax._src.adaptive import adaptive_rms_norm as adaptive_rms_norm
from normjax._src.batch import batch_norm as batch_norm
from normjax._src.batch import batch_renorm as batch_renorm
from normjax._src.dispatch import implementation as implementation
from normjax._src.gated import gated_rms_norm as gated_rms_norm
from normjax._src.group import group_norm as group_norm
from normjax._src.group import instance_norm as instance_norm
from normjax._src.health import NormHealth as NormHealth
from normjax._src.health import norm_health as norm_health
from normjax._src.interop import fold_batch_norm as fold_batch_norm
from normjax._src.interop import fold_linen_params as fold_linen_params
from normjax._src.interop import from_torch_state_dict as from_torch_state_dict
from normjax._src.interop import to_torch_state_dict as to_torch_state_dict
from normjax._src.l2 import l2_normalize as l2_normalize
from normjax._src.layer import add_layer_norm as add_layer_norm
from normjax._src.layer import add_rms_norm as add_rms_norm
from normjax._src.layer import layer_norm as layer_norm
from normjax._src.layer import rms_norm as rms_norm
from normjax._src.response import filter_response_norm as filter_response_norm
from normjax._src.response import tlu as tlu
from normjax._src.state import BatchStats as BatchStats
from normjax._src.state import SpectralState as SpectralState
from normjax._src.state import init_batch_stats as init_batch_stats
from normjax._src.tanh import dynamic_tanh as dynamic_tanh
from normjax._src.weights import init_spectral_state as init_spectral_state
from normjax._src.weights import spectral_normalize as spectral_normalize
from normjax._src.weights import weight_norm as weight_norm
from normjax._src.weights import weight_standardize as weight_standardize

__version__ = "0.2.0"

__all__ = (
    "adaptive_group_norm",
    "adaptive_layer_norm",
    "adaptive_rms_norm",
    "add_layer_norm",
    "add_rms_norm",
    "BatchStats",
    "SpectralState",
    "batch_norm",
    "batch_renorm",
    "dynamic_tanh",
    "filter_response_norm",
    "fold_batch_norm",
    "fold_linen_params",
    "from_torch_state_dict",
    "gated_rms_norm",
    "group_norm",
    "implementation",
    "init_batch_stats",
    "init_spectral_state",
    "instance_norm",
    "l2_normalize",
    "layer_norm",
    "NormHealth",
    "norm_health",
    "rms_norm",
    "spectral_normalize",
    "tlu",
    "to_torch_state_dict",
    "weight_norm",
    "weight_standardize",
)
