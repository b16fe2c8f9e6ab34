"""Triton backend: the launchers of the two fused ConvNeXt ops (see convnext_kernels.launchers).

Importing this package imports triton; convnext_kernels imports it only when the "triton"
backend is first used.
"""

from .dwconv_layernorm import dwconv_layernorm_bwd, dwconv_layernorm_fwd
from .mlp_layerscale import mlp_layerscale_bwd, mlp_layerscale_fwd

__all__ = ["dwconv_layernorm_fwd", "dwconv_layernorm_bwd", "mlp_layerscale_fwd", "mlp_layerscale_bwd"]
