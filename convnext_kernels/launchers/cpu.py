"""The "cpu" backend: dwconv_layernorm runs the fused C++ kernel of the compiled extension;
mlp_layerscale is the torch formulation (its cost is two GEMMs, which torch already does well).

Launchers follow the contract in convnext_kernels.launchers: inputs arrive validated and
contiguous, outputs and the backward workspace are allocated here with torch and handed to
``_C`` as raw data pointers. The kernels run on torch.get_num_threads() threads, passed
explicitly because the extension's OpenMP runtime need not be the one torch loaded; their
results do not depend on the thread count.
"""

from __future__ import annotations

import torch

from convnext_kernels import _C  # type: ignore[attr-defined]
from convnext_kernels.launchers import (
    data_ptr,
    dtype_code,
    dwconv_layernorm_bwd_outputs,
    dwconv_layernorm_fwd_outputs,
    empty_output,
)
from convnext_kernels.launchers.torch_ops import mlp_layerscale_bwd, mlp_layerscale_fwd

__all__ = [
    "dwconv_layernorm_fwd",
    "dwconv_layernorm_bwd",
    "mlp_layerscale_fwd",
    "mlp_layerscale_bwd",
]

def dwconv_layernorm_fwd(x, conv_weight, conv_bias, norm_weight, norm_bias, eps):
    N, H, W, C = x.shape
    code = dtype_code(x.dtype, "cpu")
    y, mean, rstd = dwconv_layernorm_fwd_outputs(x)
    if x.numel() == 0:
        return y, mean, rstd
    _C.dwconv_layernorm_fwd_cpu(
        x.data_ptr(), conv_weight.data_ptr(), data_ptr(conv_bias), norm_weight.data_ptr(),
        norm_bias.data_ptr(), y.data_ptr(), mean.data_ptr(), rstd.data_ptr(),
        N, H, W, C, float(eps), code, torch.get_num_threads(),
    )
    return y, mean, rstd


def dwconv_layernorm_bwd(dy, x, conv_weight, conv_bias, norm_weight, mean, rstd):
    N, H, W, C = x.shape
    code = dtype_code(x.dtype, "cpu")
    dx, dconv_weight, dconv_bias, dnorm_weight, dnorm_bias = dwconv_layernorm_bwd_outputs(x)
    if x.numel() == 0:
        for t in (dconv_weight, dconv_bias, dnorm_weight, dnorm_bias):
            t.zero_()
        return dx, dconv_weight, dconv_bias, dnorm_weight, dnorm_bias
    # Scratch (the conv-output gradient and per-row-block weight-gradient partials); fully
    # written by the kernel before it is read, so poisoning it is a valid check.
    workspace_floats = _C.dwconv_layernorm_bwd_cpu_workspace_size(N, H, W, C)
    workspace = empty_output((workspace_floats,), torch.float32, x.device)
    _C.dwconv_layernorm_bwd_cpu(
        dy.data_ptr(), x.data_ptr(), conv_weight.data_ptr(), data_ptr(conv_bias),
        norm_weight.data_ptr(), mean.data_ptr(), rstd.data_ptr(), dx.data_ptr(),
        dconv_weight.data_ptr(), dconv_bias.data_ptr(), dnorm_weight.data_ptr(),
        dnorm_bias.data_ptr(), workspace.data_ptr(), workspace_floats,
        N, H, W, C, code, torch.get_num_threads(),
    )
    return dx, dconv_weight, dconv_bias, dnorm_weight, dnorm_bias
