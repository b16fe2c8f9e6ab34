"""The "cpu" backend: dwconv_layernorm runs the fused C++ kernel of the compiled extension;
mlp_layerscale is the torch backend's algorithm (its cost is the GEMMs) with, on AMD CPUs, its fp32
GEMMs run by oneDNN and its bf16 weight-gradient GEMMs by the extension where the CPU has
AVX512-BF16 (torch's own matmuls elsewhere: PACKAGE_GEMMS_BY_DEFAULT), and fc1's elementwise
epilogue fused in C++ (CpuMlpParts).

Launchers follow the contract in convnext_kernels.launchers: inputs arrive validated and
contiguous, outputs and the backward workspace are allocated here with torch and handed to
``_C`` as raw data pointers. The kernels run on torch.get_num_threads() threads, passed
explicitly because the extension's OpenMP runtime need not be the one torch loaded; their
results do not depend on the thread count.
"""

from __future__ import annotations

import os

import torch

from convnext_kernels import _C  # type: ignore[attr-defined]
from convnext_kernels.launchers import (
    CPU_FP16_IN_FP32,
    cpu_fp32_exact,
    data_ptr,
    dtype_code,
    dwconv_layernorm_bwd_outputs,
    dwconv_layernorm_fwd_outputs,
    empty_output,
    onednn_cpu,
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


def _find_onednn_linear():
    """torch's oneDNN linear op (inp @ weight.T + bias, any strides), or None where the package
    keeps torch's own GEMMs (not onednn_cpu()) or this torch lacks the op."""
    if not onednn_cpu():
        return None
    try:
        return torch.ops.mkldnn._linear_pointwise.default
    except (AttributeError, RuntimeError):
        return None


# torch runs fp32 matmuls through MKL, and through oneDNN only where it may lower their precision.
# Both accumulate in fp32, and both follow torch's setting for the CPU's fp32 matmul precision.
ONEDNN_LINEAR = _find_onednn_linear()
# fp16 GEMMs as fp32 oneDNN GEMMs where the CPU has none of its own (see CPU_FP16_IN_FP32).
FP16_GEMMS_IN_FP32 = ONEDNN_LINEAR is not None and CPU_FP16_IN_FP32


# Weight gradients of bf16 activations from bf16 products summed in fp32 (gemm_tn_bf16_cpu, AVX512-
# BF16 dot products): torch has no CPU GEMM that takes bf16 and returns fp32, and its fp32 ones ran
# at about half its bf16 rate (2-thread AMD EPYC, Zen 5, 2026-12-07: 400-470 GFLOP/s on oneDNN
# at the ConvNeXt-T stage shapes against 410-890 for gemm_tn_bf16_cpu, without the transposed
# fp32 copies oneDNN's route makes).
BF16_DOT_GEMMS = _C.gemm_tn_bf16_cpu_supported()

# Whose GEMMs are faster depends on the CPU's maker. At the ConvNeXt-T stage GEMMs (batch 8), on
# 2 threads:
# - AMD EPYC (Zen 5, AVX-512; 2026-12-06/07): oneDNN 300-500 GFLOP/s in fp32 against MKL's
#   130-220 (MKL takes slower code paths on AMD CPUs: pytorch/builder#504); bf16 weight
#   gradients as above.
# - Intel Xeon (AVX-512, AVX512-BF16, AMX; 2026-12-07, two runs): MKL at 0.98-2.1x oneDNN's
#   rate over the fp32 forward, input-gradient and weight-gradient GEMMs (weight gradients
#   197-324 GFLOP/s against 156-239 through oneDNN's transposed copies); for bf16 operands'
#   weight gradients, MKL's fp32 GEMM of the converted operands at 114-267 against
#   gemm_tn_bf16_cpu's 65-169. The training step ran 1.16x (fp32) and 1.18x (bf16 autocast)
#   faster on MKL.
# So the package's GEMM routes (oneDNN fp32, gemm_tn_bf16_cpu) are the default on AMD CPUs, and
# torch's own matmuls elsewhere; CONVNEXT_KERNELS_CPU_ONEDNN=1 or 0 says otherwise.
PACKAGE_GEMMS_BY_DEFAULT = _C.build_info().get("cpu_vendor") == "amd"


def _gemm_setting() -> str:
    """CONVNEXT_KERNELS_CPU_ONEDNN, read at each call: "1", "0" or "" (unset)."""
    return os.environ.get("CONVNEXT_KERNELS_CPU_ONEDNN", "").strip()


def _package_gemms() -> bool:
    """Whether the cpu backend takes its own GEMM routes: CONVNEXT_KERNELS_CPU_ONEDNN=1 takes them,
    =0 keeps torch's own matmuls, as the torch backend runs them; unset, PACKAGE_GEMMS_BY_DEFAULT
    decides."""
    setting = _gemm_setting()
    return PACKAGE_GEMMS_BY_DEFAULT if setting == "" else setting != "0"


def _onednn_gemms() -> bool:
    """Whether the fp32 GEMMs run on oneDNN: where ONEDNN_LINEAR exists, if _package_gemms()."""
    return ONEDNN_LINEAR is not None and _package_gemms()


def _torch_gemms_not_forced() -> bool:
    """False under CONVNEXT_KERNELS_CPU_ONEDNN=0 only: the fp16 GEMMs' fp32 route (on CPUs
    without fp16 GEMMs, where torch's own are generic loops) does not depend on the CPU's maker."""
    return _gemm_setting() != "0"


def _bf16_dot_gemms(dtype: torch.dtype) -> bool:
    """Whether the weight-gradient GEMMs of dtype activations run on gemm_tn_bf16_cpu, taking bf16
    operands as they are: bf16, on CPUs with AVX512-BF16 (BF16_DOT_GEMMS), unless
    _package_gemms() says no."""
    return dtype == torch.bfloat16 and BF16_DOT_GEMMS and _package_gemms()


def _gemm_tn_bf16(acc, a, b):
    """acc + a.T @ b for (rows, p) and (rows, q) a and b, each bf16 or fp32 (rounded to bf16
    first), from bf16 products summed in fp32, added into acc (fp32 (p, q)); acc None: a fresh
    a.T @ b."""
    if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[0]:
        raise ValueError(f"a and b must be 2-D with one row count, got {tuple(a.shape)} and {tuple(b.shape)}")
    a, b = a.contiguous(), b.contiguous()
    (rows, p), q = a.shape, b.shape[1]
    if acc is not None and (acc.dtype != torch.float32 or acc.shape != (p, q) or acc.stride(1) != 1):
        # The kernel adds into fp32 rows of unit stride only: any other acc takes a fresh product.
        return acc.add_(_gemm_tn_bf16(None, a, b))
    out = empty_output((p, q), torch.float32, a.device) if acc is None else acc
    workspace_floats = _C.gemm_tn_bf16_cpu_workspace_size(rows, p, q)
    workspace = empty_output((workspace_floats,), torch.float32, a.device)
    _C.gemm_tn_bf16_cpu(a.data_ptr(), p, dtype_code(a.dtype, "cpu"), b.data_ptr(), q, dtype_code(b.dtype, "cpu"),
                        out.data_ptr(), max(out.stride(0), q), rows, p, q, acc is not None, workspace.data_ptr(),
                        workspace_floats, torch.get_num_threads())
    return out


class CpuMlpParts(torch_ops.TorchMlpParts):
    """mlp_layerscale's pieces on the CPU: fp32 GEMMs through oneDNN where _onednn_gemms() (bf16
    ones as torch runs them, except the weight gradients where _bf16_dot_gemms(); fp16
    ones as fp32 oneDNN GEMMs where the CPU has no fp16 GEMM, see gemm_16bit), fc1's
    epilogue as one C++ pass each way (mlp_layerscale_gelu_{fwd,bwd}_cpu) in place of torch's
    bias copy, GELU, GELU backward and column sum, and fc2's as one C++ pass
    (mlp_layerscale_residual_cpu). torch_ops.TorchMlpParts says what each method returns."""

    @staticmethod
    def _fp16_in_fp32(a) -> bool:
        """Whether a's fp16 GEMM runs as the fp32 oneDNN GEMM of its converted operands, its
        product rounded to fp16 once (FP16_GEMMS_IN_FP32; not under a lowered fp32 precision)."""
        return (a.dtype == torch.float16 and FP16_GEMMS_IN_FP32 and _torch_gemms_not_forced()
                and cpu_fp32_exact())

    @staticmethod
    def _fp16_product_in_fp32(a, weight):
        """a @ weight.T (fp16 operands) as the fp32 oneDNN GEMM of their exact fp32 values, in fp32:
        the caller rounds it to fp16 once."""
        return ONEDNN_LINEAR(a.float(), weight.float(), None, "none", [], "")

    @classmethod
    def gemm_16bit(cls, a, weight):
        if cls._fp16_in_fp32(a):
            return cls._fp16_product_in_fp32(a, weight).to(torch.float16)
        return super().gemm_16bit(a, weight)

    @classmethod
    def linear(cls, inp, weight, bias=None):
        if inp.dtype != torch.float32 or not _onednn_gemms():
            return super().linear(inp, weight, bias)
        return ONEDNN_LINEAR(inp, weight, bias, "none", [], "")

    @classmethod
    def matmul(cls, a, weight, out=None):
        if cls._fp16_in_fp32(a):
            product = cls._fp16_product_in_fp32(a, weight.t())
            return product.to(torch.float16) if out is None else out.copy_(product)  # one rounding
        if a.dtype != torch.float32 or not _onednn_gemms():
            return super().matmul(a, weight, out)
        product = cls.linear(a, weight.t())
        return product if out is None else out.copy_(product)

    @classmethod
    def accumulate_tn(cls, acc, a, b):
        if torch.bfloat16 in (a.dtype, b.dtype) and _bf16_dot_gemms(torch.bfloat16):
            return _gemm_tn_bf16(acc, a, b)
        if not _onednn_gemms():
            return super().accumulate_tn(acc, a, b)
        # oneDNN wants its input's rows contiguous, so one of a, b is copied transposed: a (the
        # product comes out as it is), or b (it comes out transposed, to copy or add strided),
        # whichever copies fewer values.
        # A 16-bit operand becomes fp32 in the same copy (the transposed one), or on its own.
        (R, p), q = a.shape, b.shape[1]
        if R * p <= R * q + p * q:
            product = cls.linear(_fp32_transposed(a), b.float().t())
            return product if acc is None else acc.add_(product)
        product_t = cls.linear(_fp32_transposed(b), a.float().t())
        return _fp32_transposed(product_t) if acc is None else acc.add_(product_t.t())

    @classmethod
    def _fc1_product(cls, x2, fc1_weight):
        """x2 @ fc1_weight.T without the bias, in x2's dtype: the 16-bit GEMM's own output goes to
        the C++ epilogue as it is (an fp32 copy would hold no more information)."""
        if x2.dtype == torch.float32:
            return cls.linear(x2, fc1_weight, None)
        return cls.gemm_16bit(x2, fc1_weight)

    @classmethod
    def gelu_forward(cls, x2, fc1_weight, fc1_bias, preact_out=None):
        rows, cols = x2.shape[0], fc1_weight.shape[0]
        if preact_out is not None and (preact_out.dtype != x2.dtype or preact_out.shape != (rows, cols)
                                       or not preact_out.is_contiguous()):
            # (The kernel writes it through a raw pointer.)
            raise ValueError(f"preact_out must be a contiguous ({rows}, {cols}) {x2.dtype} tensor, got "
                             f"{tuple(preact_out.shape)} {preact_out.dtype}")
        # The GEMM without the bias into a fresh buffer of x2's dtype; the pass copies it to the
        # stored pre-activation when asked, adds the bias and writes the hidden over it.
        a = cls._fc1_product(x2, fc1_weight)
        code = dtype_code(x2.dtype, "cpu")
        _C.mlp_layerscale_gelu_fwd_cpu(a.data_ptr(), fc1_bias.data_ptr(), data_ptr(preact_out), a.data_ptr(),
                                       rows, cols, code, code, torch.get_num_threads())
        return a

    @classmethod
    def gelu_backward(cls, x2, fc1_weight, fc1_bias, preact, dh, dfc1_bias):
        rows, cols = dh.shape
        # The GEMM's output, stored by the forward or made again (the same values), plus the bias.
        a = cls._fc1_product(x2, fc1_weight) if preact is None else preact
        code = dtype_code(x2.dtype, "cpu")
        if x2.dtype == torch.float32:
            da, da_low, hidden_dtype = dh, None, torch.float32  # da over dh
        elif _bf16_dot_gemms(x2.dtype):
            # da and the hidden in bf16 only: the weight-gradient GEMMs take them as they are.
            da, da_low, hidden_dtype = None, empty_output(dh.shape, x2.dtype, x2.device), x2.dtype
        else:
            # 16-bit dh read as it is; da in fp32 and in x2's dtype, the hidden (rounded to
            # x2's dtype) in fp32: the weight-gradient GEMMs' operands, with no copies.
            da, da_low = empty_output((rows, cols), torch.float32, x2.device), empty_output(dh.shape, x2.dtype, x2.device)
            hidden_dtype = torch.float32
        # The hidden over a fresh pre-activation of its dtype, never over the stored one.
        h = a if a is not preact and a.dtype == hidden_dtype else empty_output((rows, cols), hidden_dtype, x2.device)
        workspace_floats = _C.mlp_layerscale_gelu_bwd_cpu_workspace_size(rows, cols)
        workspace = empty_output((workspace_floats,), torch.float32, x2.device)
        _C.mlp_layerscale_gelu_bwd_cpu(a.data_ptr(), fc1_bias.data_ptr(), dh.data_ptr(), data_ptr(da), data_ptr(da_low),
                                       h.data_ptr(), dfc1_bias.data_ptr(), workspace.data_ptr(), workspace_floats,
                                       rows, cols, code, code, dtype_code(dh.dtype, "cpu"), dtype_code(h.dtype, "cpu"),
                                       torch.get_num_threads())
        return h, (da_low if da is None else da), da_low

    @classmethod
    def residual(cls, h, fc2_weight, fc2_bias, s, gamma, shortcut, out):
        # fp32: the GEMM adds the bias; 16-bit: its own output goes to the pass as it is, and
        # the pass adds the fp32 bias.
        if h.dtype == torch.float32:
            z, bias = cls.linear(h, fc2_weight, fc2_bias), None
        else:
            z, bias = cls.gemm_16bit(h, fc2_weight), fc2_bias
        rows, cols = z.shape
        _C.mlp_layerscale_residual_cpu(z.data_ptr(), data_ptr(bias), data_ptr(s), data_ptr(gamma),
                                       shortcut.data_ptr(), out.data_ptr(), rows, cols,
                                       dtype_code(out.dtype, "cpu"), dtype_code(z.dtype, "cpu"),
                                       torch.get_num_threads())


def _fp32_transposed(t):
    """t.T as a contiguous fp32 tensor, in one pass whatever t's dtype (the C++ tiled transpose
    for a contiguous t: torch's strided copy_ took 1.5-3x as long at these shapes)."""
    rows, cols = t.shape
    out = torch.empty((cols, rows), dtype=torch.float32, device=t.device)
    if not t.is_contiguous():
        return out.copy_(t.t())
    _C.transpose_to_float32_cpu(t.data_ptr(), out.data_ptr(), rows, cols, dtype_code(t.dtype, "cpu"),
                                torch.get_num_threads())
    return out


def mlp_layerscale_fwd(x, shortcut, fc1_weight, fc1_bias, fc2_weight, fc2_bias, gamma, drop_scale,
                       preact_out=None):
    return torch_ops.mlp_layerscale_fwd(x, shortcut, fc1_weight, fc1_bias, fc2_weight, fc2_bias, gamma,
                                        drop_scale, preact_out, parts=CpuMlpParts)


def mlp_layerscale_bwd(dy, x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, gamma, drop_scale, preact=None):
    return torch_ops.mlp_layerscale_bwd(dy, x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, gamma,
                                        drop_scale, preact, parts=CpuMlpParts)
