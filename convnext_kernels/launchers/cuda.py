"""The "cuda" backend: the hand-written CUDA kernels of the compiled extension.

Launchers follow the contract in convnext_kernels.launchers: inputs arrive validated and
contiguous; outputs and scratch workspaces are allocated here with torch on x's device (so they
come from torch's caching allocator and follow its stream semantics), and ``_C`` receives raw
data pointers, a dtype code and the current torch stream of that device. Kernels are enqueued
asynchronously on that stream; launch errors raise RuntimeError with the CUDA message.

fp32 Linear layers use TF32 tensor cores only when torch's TF32 switch for CUDA matmuls is on
(``launchers.tf32_matmul_allowed``, as torch's own matmuls do); otherwise an exact fp32 FFMA path runs.

mlp_layerscale forward: fp16 / bf16 with C <= 384 (C % 8 == 0, 16-byte aligned tensors) runs a
back-to-back fused kernel that keeps the (rows, 4C) hidden on chip. ``CONVNEXT_KERNELS_CUDA_MLP_FUSED=0``
(read at every call) forces the two-GEMM path everywhere, to compare the two or bisect a bug. The
forward's workspace (the two-GEMM hidden) is only allocated when the two-GEMM path will run.

CPU tensors (only with CONVNEXT_KERNELS_CUDA_EMULATE=1, see convnext_kernels.backends) run the
same kernels compiled for the host against the CUDA emulator: ``_cuda_emulated`` has the same
functions as ``_C``'s CUDA part and ignores the stream.
"""

from __future__ import annotations

import os

import torch

from convnext_kernels import _C  # type: ignore[attr-defined]
from convnext_kernels.launchers import (
    POISON_OUTPUTS,
    data_ptr,
    dtype_code,
    dwconv_layernorm_bwd_outputs,
    dwconv_layernorm_fwd_outputs,
    empty_output,
    on_tensors_device,
    tf32_matmul_allowed,
)

__all__ = [
    "dwconv_layernorm_fwd",
    "dwconv_layernorm_bwd",
    "mlp_layerscale_fwd",
    "mlp_layerscale_bwd",
]


def _kernels(device: torch.device):
    """The module with the CUDA kernels for tensors on `device`: _C, or the host emulation for CPU."""
    if device.type == "cpu":
        from convnext_kernels import _cuda_emulated  # type: ignore[attr-defined]

        return _cuda_emulated
    return _C


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0


def _switch_on(name: str) -> bool:
    """An on-by-default environment switch, read at each call: off only when set to 0."""
    return os.environ.get(name, "1").strip() != "0"


def _mlp_fused_allowed() -> bool:
    """False when CONVNEXT_KERNELS_CUDA_MLP_FUSED=0: the mlp forward then always runs two GEMMs."""
    return _switch_on("CONVNEXT_KERNELS_CUDA_MLP_FUSED")


def _mlp_wgmma_allowed() -> bool:
    """False when CONVNEXT_KERNELS_CUDA_MLP_WGMMA=0: the mlp kernels then use mma.sync on an H100 too.

    Otherwise the fp16 / bf16 kernels (the fused forward, the two-GEMM forward's and the backward's
    GEMMs) use wgmma where the extension was built for sm_90a and the device has compute capability 9.0.
    """
    return _switch_on("CONVNEXT_KERNELS_CUDA_MLP_WGMMA")


def _dwconv_ring_channels() -> int:
    """CONVNEXT_KERNELS_CUDA_DWCONV_RING_CHANNELS (1 or 2; unset: the kernels choose by C), read at
    each call: the channels a thread of the dwconv_layernorm ring kernels convolves. A benchmark
    switch (benchmarks/kernels.py cuda_ring2); results agree up to fp32 summation order."""
    value = os.environ.get("CONVNEXT_KERNELS_CUDA_DWCONV_RING_CHANNELS", "").strip()
    if value not in ("", "0", "1", "2"):
        raise ValueError(f"CONVNEXT_KERNELS_CUDA_DWCONV_RING_CHANNELS must be 1 or 2 (or unset), got {value!r}")
    return int(value or 0)


def _workspace(nbytes: int, device: torch.device) -> torch.Tensor:
    # Scratch only: every byte the kernels read is written by them first, which poisoning checks
    # (0xFF bytes are NaN in every float type).
    ws = torch.empty((max(int(nbytes), 1),), dtype=torch.uint8, device=device)
    if POISON_OUTPUTS:
        ws.fill_(0xFF)
    return ws


@on_tensors_device
def dwconv_layernorm_fwd(x, conv_weight, conv_bias, norm_weight, norm_bias, eps):
    N, H, W, C = x.shape
    code = dtype_code(x.dtype, "cuda")
    y, mean, rstd = dwconv_layernorm_fwd_outputs(x)
    if x.numel() == 0:
        return y, mean, rstd
    kernels = _kernels(x.device)
    nbytes = kernels.dwconv_layernorm_fwd_cuda_workspace_bytes(N, H, W, C)
    workspace = _workspace(nbytes, x.device)
    kernels.dwconv_layernorm_fwd_cuda(
        x.data_ptr(), conv_weight.data_ptr(), data_ptr(conv_bias), norm_weight.data_ptr(),
        norm_bias.data_ptr(), y.data_ptr(), mean.data_ptr(), rstd.data_ptr(),
        workspace.data_ptr(), workspace.numel(), N, H, W, C, float(eps), code, _stream(x.device),
        _dwconv_ring_channels(),
    )
    return y, mean, rstd


@on_tensors_device
def dwconv_layernorm_bwd(dy, x, conv_weight, conv_bias, norm_weight, mean, rstd):
    N, H, W, C = x.shape
    code = dtype_code(x.dtype, "cuda")
    dx, dconv_weight, dconv_bias, dnorm_weight, dnorm_bias = dwconv_layernorm_bwd_outputs(x)
    if x.numel() == 0:
        for t in (dconv_weight, dconv_bias, dnorm_weight, dnorm_bias):
            t.zero_()
        return dx, dconv_weight, dconv_bias, dnorm_weight, dnorm_bias
    kernels = _kernels(x.device)
    nbytes = kernels.dwconv_layernorm_bwd_cuda_workspace_bytes(N, H, W, C)
    workspace = _workspace(nbytes, x.device)
    kernels.dwconv_layernorm_bwd_cuda(
        dy.data_ptr(), x.data_ptr(), conv_weight.data_ptr(), data_ptr(conv_bias),
        norm_weight.data_ptr(), mean.data_ptr(), rstd.data_ptr(), dx.data_ptr(),
        dconv_weight.data_ptr(), dconv_bias.data_ptr(), dnorm_weight.data_ptr(),
        dnorm_bias.data_ptr(), workspace.data_ptr(), workspace.numel(),
        N, H, W, C, code, _stream(x.device), _dwconv_ring_channels(),
    )
    return dx, dconv_weight, dconv_bias, dnorm_weight, dnorm_bias


def _no_preact(preact):
    if preact is not None:
        raise ValueError("the cuda backend's mlp_layerscale recomputes the pre-activation; "
                         "it takes no preact_out / preact tensor")


@on_tensors_device
def mlp_layerscale_fwd(x, shortcut, fc1_weight, fc1_bias, fc2_weight, fc2_bias, gamma, drop_scale,
                       preact_out=None):
    _no_preact(preact_out)
    N, H, W, C = x.shape
    code = dtype_code(x.dtype, "cuda")
    y = empty_output((N, H, W, C), x.dtype, x.device)
    if x.numel() == 0:
        return y
    allow_tf32 = tf32_matmul_allowed()
    allow_fused = _mlp_fused_allowed()  # read once: the query and the forward must agree
    ptrs = (
        x.data_ptr(), shortcut.data_ptr(), fc1_weight.data_ptr(), fc1_bias.data_ptr(), fc2_weight.data_ptr(),
        fc2_bias.data_ptr(), data_ptr(gamma), data_ptr(drop_scale), y.data_ptr(),
    )
    kernels = _kernels(x.device)
    # Same tensors, allow_fused and device as the forward: 0 bytes when the fused kernel runs
    # (no rows x 4C hidden is allocated), the two-GEMM hidden otherwise.
    nbytes = kernels.mlp_layerscale_fwd_cuda_workspace_bytes(*ptrs, N, H, W, C, code, allow_fused)
    workspace = _workspace(nbytes, x.device)
    kernels.mlp_layerscale_fwd_cuda(
        *ptrs, workspace.data_ptr(), workspace.numel(), N, H, W, C, code, allow_tf32, allow_fused,
        _mlp_wgmma_allowed(), _stream(x.device),
    )
    return y


@on_tensors_device
def mlp_layerscale_bwd(dy, x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, gamma, drop_scale, preact=None):
    _no_preact(preact)
    N, H, W, C = x.shape
    code = dtype_code(x.dtype, "cuda")
    dx = empty_output((N, H, W, C), x.dtype, x.device)
    dfc1_weight = empty_output(tuple(fc1_weight.shape), torch.float32, x.device)
    dfc1_bias = empty_output(tuple(fc1_bias.shape), torch.float32, x.device)
    dfc2_weight = empty_output(tuple(fc2_weight.shape), torch.float32, x.device)
    dfc2_bias = empty_output(tuple(fc2_bias.shape), torch.float32, x.device)
    dgamma = empty_output((C,), torch.float32, x.device)
    if x.numel() == 0:
        for t in (dfc1_weight, dfc1_bias, dfc2_weight, dfc2_bias, dgamma):
            t.zero_()
        return dx, dfc1_weight, dfc1_bias, dfc2_weight, dfc2_bias, dgamma
    allow_tf32 = tf32_matmul_allowed()
    kernels = _kernels(x.device)
    nbytes = kernels.mlp_layerscale_bwd_cuda_workspace_bytes(N, H, W, C, code)
    workspace = _workspace(nbytes, x.device)
    kernels.mlp_layerscale_bwd_cuda(
        dy.data_ptr(), x.data_ptr(), fc1_weight.data_ptr(), fc1_bias.data_ptr(),
        fc2_weight.data_ptr(), fc2_bias.data_ptr(), data_ptr(gamma), data_ptr(drop_scale), dx.data_ptr(),
        dfc1_weight.data_ptr(), dfc1_bias.data_ptr(), dfc2_weight.data_ptr(), dfc2_bias.data_ptr(),
        dgamma.data_ptr(), workspace.data_ptr(), workspace.numel(), N, H, W, C, code, allow_tf32,
        _mlp_wgmma_allowed(), _stream(x.device),
    )
    return dx, dfc1_weight, dfc1_bias, dfc2_weight, dfc2_bias, dgamma
