"""Triton backend: launchers for the two fused ConvNeXt ops.

The submodules import triton, so this package imports nothing at import time;
import ``convnext_kernels.triton.dwconv_layernorm`` or
``convnext_kernels.triton.mlp_layerscale`` only where triton is available.
"""
