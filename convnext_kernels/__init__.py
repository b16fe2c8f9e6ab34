"""convnext_kernels: the fastest exact ConvNeXt, as two fused ops per block.

    from convnext_kernels import ConvNeXtFused, convnext_tiny, dwconv_layernorm, mlp_layerscale
"""

from .backends import BACKENDS, BackendUnavailableError, available_backends, build_info
from .convert import convert_state_dict
from .model import (
    ConvNeXtFused,
    FusedBlock,
    convnext_atto,
    convnext_base,
    convnext_femto,
    convnext_large,
    convnext_nano,
    convnext_pico,
    convnext_small,
    convnext_tiny,
    convnext_xlarge,
)
from .ops import dwconv_layernorm, mlp_layerscale
from .patching import convert_model

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "ConvNeXtFused",
    "FusedBlock",
    "available_backends",
    "build_info",
    "convert_model",
    "convert_state_dict",
    "convnext_atto",
    "convnext_base",
    "convnext_femto",
    "convnext_large",
    "convnext_nano",
    "convnext_pico",
    "convnext_small",
    "convnext_tiny",
    "convnext_xlarge",
    "dwconv_layernorm",
    "mlp_layerscale",
]
