"""The "cpu" backend: dwconv_layernorm runs the fused C++ kernel of the compiled extension;
mlp_layerscale is the torch backend's algorithm (its cost is the GEMMs, which torch runs at the
machine's FMA peak) with fc1's elementwise epilogue fused in C++ (FusedGelu).

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
from convnext_kernels.launchers import torch_ops

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


class FusedGelu:
    """fc1's epilogue as one C++ pass each way (mlp_layerscale_gelu_{fwd,bwd}_cpu), in place of
    torch's bias copy, GELU, GELU backward and column sum; the interface of
    torch_ops.TorchGelu, whose docstrings say what each method returns. The GEMM before it runs
    without the bias, which the pass adds."""

    @staticmethod
    def forward(x2, fc1_weight, fc1_bias, preact_out=None):
        rows, cols = x2.shape[0], fc1_weight.shape[0]
        # The GEMM writes a stored pre-activation itself where both are fp32 (the pass then adds
        # the bias in place); otherwise it is copied out after the pass.
        direct = preact_out is not None and preact_out.dtype == torch.float32 == x2.dtype
        a = torch_ops._linear_fp32(x2, fc1_weight, None, out=preact_out if direct else None)
        # fp32 without a stored pre-activation: the hidden overwrites it.
        h = a if x2.dtype == torch.float32 and preact_out is None else empty_output(a.shape, x2.dtype, x2.device)
        _C.mlp_layerscale_gelu_fwd_cpu(a.data_ptr(), fc1_bias.data_ptr(), h.data_ptr(), rows, cols,
                                       dtype_code(x2.dtype, "cpu"), torch.get_num_threads())
        if preact_out is not None and not direct:
            preact_out.copy_(a)
        return h

    @staticmethod
    def backward(x2, fc1_weight, fc1_bias, preact, dh, dfc1_bias):
        rows, cols = dh.shape
        if preact is None:
            a, bias = torch_ops._linear_fp32(x2, fc1_weight, None), fc1_bias
        else:  # stored with its bias
            a, bias = preact.float(), None
        # The hidden may overwrite a fresh fp32 pre-activation, never the stored one (which
        # .float() returns itself when it is fp32).
        h = a if a is not preact and x2.dtype == torch.float32 else empty_output(a.shape, x2.dtype, x2.device)
        workspace_floats = _C.mlp_layerscale_gelu_bwd_cpu_workspace_size(rows, cols)
        workspace = empty_output((workspace_floats,), torch.float32, x2.device)
        _C.mlp_layerscale_gelu_bwd_cpu(a.data_ptr(), data_ptr(bias), dh.data_ptr(), h.data_ptr(),
                                       dfc1_bias.data_ptr(), workspace.data_ptr(), workspace_floats,
                                       rows, cols, dtype_code(x2.dtype, "cpu"), torch.get_num_threads())
        return h, dh


def mlp_layerscale_fwd(x, shortcut, fc1_weight, fc1_bias, fc2_weight, fc2_bias, gamma, drop_scale,
                       preact_out=None):
    return torch_ops.mlp_layerscale_fwd(x, shortcut, fc1_weight, fc1_bias, fc2_weight, fc2_bias, gamma,
                                        drop_scale, preact_out, epilogue=FusedGelu)


def mlp_layerscale_bwd(dy, x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, gamma, drop_scale, preact=None):
    return torch_ops.mlp_layerscale_bwd(dy, x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, gamma,
                                        drop_scale, preact, epilogue=FusedGelu)
