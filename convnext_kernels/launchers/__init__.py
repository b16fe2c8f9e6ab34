"""Launchers: one module per backend, each exposing the same four functions.

The op layer (``convnext_kernels.ops``) validates inputs, makes them contiguous,
casts parameters and registers the torch.library ops; a launcher only allocates
outputs with torch and runs its kernels. Every backend implements exactly:

dwconv_layernorm_fwd(x, conv_weight, conv_bias, norm_weight, norm_bias, eps)
    -> (y, mean, rstd)
    x            (N, H, W, C) contiguous, float32 / float16 / bfloat16
    conv_weight  (C, 1, 7, 7) float32 contiguous
    conv_bias    (C,) float32, or None (no bias)
    norm_weight  (C,) float32;  norm_bias (C,) float32
    y            (N, H, W, C) in x.dtype: LayerNorm_C(dwconv7x7(x) + conv_bias)
    mean, rstd   (N, H, W) float32 statistics of the conv output (saved for backward)

dwconv_layernorm_bwd(dy, x, conv_weight, conv_bias, norm_weight, mean, rstd)
    -> (dx, dconv_weight, dconv_bias, dnorm_weight, dnorm_bias)
    dy           (N, H, W, C) contiguous, x.dtype
    dx           (N, H, W, C) x.dtype
    d weights    float32: (C, 1, 7, 7), (C,), (C,), (C,); dconv_bias is returned
                 even when conv_bias is None (the caller drops it).
    The conv output is recomputed from x, never stored. Weight gradients are
    reduced deterministically (fp32 partial buffers, then a fixed-order sum).

mlp_layerscale_fwd(x, shortcut, fc1_weight, fc1_bias, fc2_weight, fc2_bias, gamma, drop_scale,
                   preact_out=None)
    -> y
    x, shortcut  (N, H, W, C) contiguous, same dtype
    fc1_weight   (4C, C) x.dtype contiguous;  fc1_bias (4C,) float32
    fc2_weight   (C, 4C) x.dtype contiguous;  fc2_bias (C,) float32
    gamma        (C,) float32 or None (no layer scale)
    drop_scale   (N,) float32 or None: per-sample factor, sample n = row // (H*W)
    y = shortcut + drop_scale[n] * gamma * (gelu_erf(x @ fc1_weight.T + fc1_bias) @ fc2_weight.T + fc2_bias)
    preact_out   None, or a (N*H*W, 4C) x.dtype tensor that receives the pre-activation in
                 the backend's stored form: x @ fc1_weight.T + fc1_bias (triton), or the GEMM's
                 own x @ fc1_weight.T without the bias (cpu, torch: backward adds the bias, so
                 that it differentiates at the very value the forward used, 16-bit included)
                 (asked for where convnext_kernels.backends.MLP_LAYERSCALE_STORE_PREACT_MIN_C
                 says so; the cuda backend has no such variant and raises)

mlp_layerscale_bwd(dy, x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, gamma, drop_scale, preact=None)
    -> (dx, dfc1_weight, dfc1_bias, dfc2_weight, dfc2_bias, dgamma)
    dx in x.dtype; weight/bias/gamma gradients float32 in the parameters' shapes;
    dgamma is returned even when gamma is None (the caller drops it). The
    gradient of the shortcut is dy itself and is handled by the caller. The
    hidden activation is recomputed from x, or from the forward's preact_out
    when that is passed as preact.

All statistics and accumulations are float32; GELU is the exact erf form.

The GPU launchers (triton, cuda) run under ``on_tensors_device``: their kernels launch on the
tensors' device and on that device's current stream, whichever device is current.
"""

import contextlib
import functools
import math
import os
import platform

import torch

# Tests set this (or the env switch) so that every output starts as NaN: a kernel that
# skips an element then fails loudly instead of passing on stale memory.
POISON_OUTPUTS = os.environ.get("CONVNEXT_KERNELS_POISON_OUTPUTS", "0") == "1"


def empty_output(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """torch.empty for launcher outputs; NaN-filled when POISON_OUTPUTS is set."""
    out = torch.empty(shape, dtype=dtype, device=device)
    if POISON_OUTPUTS:
        out.fill_(math.nan)
    return out


def device_guard(device: torch.device):
    """The device guard for a launch on tensors of `device` (a null context off CUDA: the Triton
    interpreter, the CUDA emulator, meta tensors). Triton and the compiled kernels launch on
    torch's current CUDA device and its current stream: with tensors on cuda:1 while cuda:0 is
    current, they would run on cuda:0, reach into cuda:1's memory (an illegal address) and order
    nothing with cuda:1's stream."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def on_tensors_device(launcher):
    """A launcher run under device_guard of its first argument's device (every tensor argument
    is on that device: the op layer checks)."""

    @functools.wraps(launcher)
    def guarded(t, *args, **kwargs):
        with device_guard(t.device):
            return launcher(t, *args, **kwargs)

    return guarded


def data_ptr(t) -> int:
    """The address of t's data, or 0 for an absent optional tensor (what the C++ side expects)."""
    return 0 if t is None else t.data_ptr()


def tf32_matmul_allowed() -> bool:
    """Whether fp32 GEMMs may use TF32, by torch's switch for CUDA matmuls, read so that either of
    torch's APIs works: torch >= 2.9 raises on reading the legacy ``matmul.allow_tf32`` once the
    new ``fp32_precision`` API has set it, while ``fp32_precision`` also reflects the legacy
    setters (``allow_tf32 = True``, ``set_float32_matmul_precision("high")``)."""
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):
        # "tf32", "ieee", or "none" (inherits torch.backends.fp32_precision, whose default is
        # exact fp32; where the getter does not resolve the inheritance itself, "none" stays exact).
        return matmul.fp32_precision == "tf32"
    return bool(matmul.allow_tf32)


def _cpu_has_fp16_gemms() -> bool:
    """Whether torch's oneDNN has fp16 GEMMs on this CPU (AVX512-FP16 or AMX-FP16)."""
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_fp16_supported", None)
    try:
        return bool(check()) if check is not None else False
    except RuntimeError:
        return False


def onednn_cpu() -> bool:
    """Whether the package may run CPU work on oneDNN: on x86-64 with a torch built with it
    (elsewhere, e.g. on Arm, oneDNN has not been compared with torch's own kernels, so those are
    kept). Whether the cpu backend's fp32 GEMMs do also depends on the CPU's maker
    (launchers/cpu.py: PACKAGE_GEMMS_BY_DEFAULT)."""
    return platform.machine().lower() in ("x86_64", "amd64") and torch.backends.mkldnn.is_available()

# Without hardware fp16, torch's CPU fp16 GEMMs and convs run generic loops: 24 GFLOP/s against
# oneDNN's 126 in fp32 at (1568, 384) x (384, 1536) on the 2-thread AMD EPYC (2026-12-07). Both
# accumulate fp16 products (exact in fp32) in fp32, so oneDNN's fp32 GEMM of the exactly
# converted operands, rounded to fp16 once, is the same product up to summation order.
CPU_FP16_IN_FP32 = onednn_cpu() and not _cpu_has_fp16_gemms()


# A global setting, read once when torch.compile traces a caller (dynamo cannot trace the
# attribute lookups on torch.backends.mkldnn).
@torch.compiler.assume_constant_result
def cpu_fp32_exact(op: str = "matmul") -> bool:
    """Whether torch keeps oneDNN's fp32 `op`s ("matmul" or "conv") on the CPU at full precision:
    a setting that lets oneDNN take them in bf16 or tf32 (e.g. set_float32_matmul_precision
    "medium" or "high") was chosen for fp32 work, not for fp16 operands, whose 11-bit mantissas
    bf16 would cut to 8."""
    settings = getattr(torch.backends.mkldnn, op, None)
    if settings is not None and hasattr(settings, "fp32_precision"):  # torch >= 2.9
        return settings.fp32_precision in ("none", "ieee")
    return torch.get_float32_matmul_precision() == "highest"


def dwconv_layernorm_fwd_outputs(x: torch.Tensor):
    """Uninitialised (y, mean, rstd) for dwconv_layernorm_fwd on x (N, H, W, C)."""
    y = empty_output(x.shape, x.dtype, x.device)
    mean = empty_output(x.shape[:3], torch.float32, x.device)
    return y, mean, empty_output(x.shape[:3], torch.float32, x.device)


def dwconv_layernorm_bwd_outputs(x: torch.Tensor):
    """Uninitialised (dx, dconv_weight, dconv_bias, dnorm_weight, dnorm_bias) for x (N, H, W, C)."""
    C = x.shape[-1]
    vectors = [empty_output((C,), torch.float32, x.device) for _ in range(3)]
    return (empty_output(x.shape, x.dtype, x.device),
            empty_output((C, 1, 7, 7), torch.float32, x.device), *vectors)


def dtype_code(dtype: torch.dtype, backend: str) -> int:
    """The compiled extension's code for an activation dtype (shared by its CPU and CUDA kernels)."""
    # Only the cpu/cuda launchers call this, so only they need the compiled extension.
    from convnext_kernels import _C  # type: ignore[attr-defined]

    codes = {torch.float32: _C.DTYPE_FLOAT32, torch.float16: _C.DTYPE_FLOAT16,
             torch.bfloat16: _C.DTYPE_BFLOAT16}
    if dtype not in codes:
        raise ValueError(f"backend {backend!r} supports float32, float16 and bfloat16 activations, got {dtype}")
    return codes[dtype]
