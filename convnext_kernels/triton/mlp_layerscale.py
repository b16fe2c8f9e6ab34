"""Triton kernels for the ConvNeXt MLP: Linear C->4C, exact GELU, Linear 4C->C,
layer scale gamma, per-sample drop-path scale and the residual add (NHWC rows).

Forward:
  * C <= FUSED_MAX_C (256 for fp32): ``_mlp_layerscale_fwd_kernel`` keeps the 4C hidden on
    chip. A program owns BLOCK_M rows and the whole output width in fp32
    accumulators; it walks the hidden in BLOCK_H chunks:
    h = gelu(x @ W1[chunk].T + b1[chunk]) -> x.dtype -> acc += h @ W2[:, chunk].T,
    then the layer-scale / residual epilogue. The output width is held as two
    power-of-two parts, BLOCK_C0 + BLOCK_C1 (_tiling.split_width): ConvNeXt widths are
    3 * 2^k or 5 * 2^k (96 = 64 + 32, 384 = 256 + 128, 40 = 32 + 8 -> 32 + 16),
    so one next_power_of_2(C) accumulator would pad a quarter or more of GEMM2's
    columns and registers with zeros.
  * larger C: two launches of the generic ``_matmul_kernel`` with fused
    epilogues (GEMM1 + b1 + GELU -> hidden in x.dtype; GEMM2 + b2 + gamma +
    drop scale + residual).

Backward (nothing but x is saved; the hidden is recomputed):
  1. ``_mlp_layerscale_bwd_hidden_kernel``: per (row tile, hidden tile) two
     GEMMs over C share one loop: a = x @ W1.T + b1 and dh = dz @ W2 with
     dz = dy * s[n] * gamma formed on the fly; writes h = gelu(a) and
     da = dh * gelu'(a) (x.dtype workspaces) and fp32 partials of db1. The
     programs of the first hidden tile also write dys = dy * s[n] (x.dtype,
     only when there is a drop scale; else dys is dy) and fp32 partials of
     its column sums.
  2. ``_matmul_kernel``: dx = da @ W1 (plain store epilogue).
  3. ``_matmul_kernel`` in split-K mode for G = dys.T @ h and dW1 = da.T @ x:
     the row dimension M is cut into a fixed number of chunks (chosen from
     the shapes only), each writes an fp32 partial, torch sums them.
  4. Layer scale without recomputing z = h @ W2.T + b2 (a GEMM and a pass
     over the 4C hidden): with G[c, j] = sum_m dys[m, c] h[m, j],
       dW2 = gamma[:, None] * G,  db2 = gamma * colsum(dys),
       dgamma[c] = sum_m dys[m, c] z[m, c] = sum_j W2[c, j] G[c, j] + b2[c] colsum(dys)[c],
     small (C, 4C) elementwise work done by torch. With a drop scale dys enters
     the G GEMM rounded to x.dtype (as dz always did for dW2), so dgamma carries
     that rounding; without one dys is dy, exact.
All reductions are fp32 partial buffers summed by torch: deterministic.

Stored-activation variant (launcher level, for measurement): the forward can also
write the pre-activation a = x @ W1.T + b1 (``preact_out``) and the backward then
reads it instead of recomputing it (``preact``): one GEMM less in backward, for
4C more values per pixel stored and read. The ops use the recompute form: at the
ConvNeXt widths the MLP GEMMs are near the memory-bound side of the roofline,
where the extra traffic costs about what the GEMM saves (benchmarks/kernels.py
times both).
"""
from typing import Optional, Tuple

import torch
from torch import Tensor
import triton
import triton.language as tl

from ..backends import triton_interpreted
from ..launchers import empty_output, on_tensors_device, tf32_matmul_allowed
from ._compat import autotune, wrap_triton
from ._tiling import split_width

# Largest C for which the forward keeps the hidden on chip (accumulator width
# BLOCK_C0 + BLOCK_C1 <= 384); fp32 inputs stop at 256 (see _fused_max_c).
FUSED_MAX_C = 384

# Epilogues of _matmul_kernel.
EPILOGUE_PARTIAL = 0   # store fp32 split-K partials
EPILOGUE_GELU = 1      # + bias, exact GELU, store in the output dtype
EPILOGUE_RESIDUAL = 2  # + bias, * gamma, * drop scale, + residual
EPILOGUE_STORE = 3     # store in the output dtype

# Rows per program of the backward row-tile kernels. Fixed (not autotuned)
# because it sets the size of their partial buffers, allocated before launch.
_BWD_BLOCK_M = 64


def _cfg(num_warps, num_stages, **blocks):
    return triton.Config(blocks, num_warps=num_warps, num_stages=num_stages)


# Config lists per tl.dot mode (see _dot_mode): "mma" = fp16/bf16 tensor cores,
# "tf32" = fp32 on tensor cores (operands twice the bytes: smaller K tiles),
# "fma" = fp32 with input_precision "ieee", which Triton lowers to CUDA-core FMAs
# with each thread holding whole BLOCK_K slices of both operands in registers:
# small BLOCK_K / hidden chunks or it spills by tens of KB.
# The fused forward's lists are keyed by the accumulator width BLOCK_C0 + BLOCK_C1
# (the smallest key >= it applies). GPU lists are checked by ahead-of-time
# compilation (tests/test_triton_compile.py; triton 3.9 and 3.6, the GPU
# machine's; no GPU, 2026-11-24). For sm_90 every 16-bit config at ConvNeXt
# widths spills at most 16 B (the fused forward at C = 384, batch 2, under 3.9).
# For sm_80, where mma.sync holds both operands in registers, some configs
# (mostly BLOCK_M >= 64) spill, so every launch's list also holds at least one
# that does not there; none exceeds the A100's 163 KB of shared memory. Not
# yet tuned on hardware.
# BLOCK_M = 64 compiles to wgmma on sm_90, BLOCK_M = 32 to mma.sync. Under the
# interpreter the launchers use one small config each (autotuning there is slow
# and pointless); the GPU lists exist there too, so that the test suite can run
# every GPU config's tile shape (tests/test_triton_kernels.py).
_DOT_MODES = ("mma", "tf32", "fma")
_INTERPRETER_FUSED_FWD_CONFIGS = {
    mode: {c: [_cfg(4, 1, BLOCK_M=32, BLOCK_H=32, BLOCK_K=32)] for c in (128, 256, 384)}
    for mode in _DOT_MODES
}
_INTERPRETER_MATMUL_CONFIGS = {mode: [_cfg(4, 1, BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=4)]
                               for mode in _DOT_MODES}
_INTERPRETER_BWD_HIDDEN_CONFIGS = {mode: [_cfg(4, 1, BLOCK_H=32, BLOCK_K=32)] for mode in _DOT_MODES}
_GPU_FUSED_FWD_CONFIGS = {
    # The whole BLOCK_M x (BLOCK_C0 + BLOCK_C1) fp32 accumulator lives in registers
    # next to the BLOCK_M x BLOCK_H GEMM1 chunk: BLOCK_M = 128 only with 8 warps.
    "mma": {
        128: [
            _cfg(8, 3, BLOCK_M=128, BLOCK_H=64, BLOCK_K=32),
            _cfg(4, 4, BLOCK_M=64, BLOCK_H=64, BLOCK_K=32),
            _cfg(4, 3, BLOCK_M=64, BLOCK_H=32, BLOCK_K=32),
        ],
        # 192 (C = 160, 192): room for BLOCK_M = 128 (245 registers, no spills).
        # On sm_80 (mma.sync holds both operands in registers) those four spill
        # 64-584 B; the 4-warp BLOCK_M = 32 config is clean on both.
        192: [
            _cfg(8, 3, BLOCK_M=64, BLOCK_H=64, BLOCK_K=64),
            _cfg(8, 3, BLOCK_M=64, BLOCK_H=32, BLOCK_K=64),
            _cfg(8, 4, BLOCK_M=64, BLOCK_H=64, BLOCK_K=32),
            _cfg(8, 3, BLOCK_M=128, BLOCK_H=32, BLOCK_K=64),
            _cfg(4, 3, BLOCK_M=32, BLOCK_H=64, BLOCK_K=64),
        ],
        256: [
            _cfg(8, 3, BLOCK_M=64, BLOCK_H=64, BLOCK_K=64),
            _cfg(8, 3, BLOCK_M=64, BLOCK_H=32, BLOCK_K=64),
            _cfg(8, 4, BLOCK_M=64, BLOCK_H=64, BLOCK_K=32),
        ],
        # 384 (C = 320, 384): the accumulator alone is 64 x 384 fp32 = 96 registers
        # per thread. With one 512-wide tile, BLOCK_M = 64 spilled ~550 B under
        # triton 3.6. These: none under 3.6; under 3.9 none at batch 128 and
        # 12-16 B at batch 2 (BLOCK_H = 32 spilled 12-20 B at batch 128).
        384: [
            _cfg(8, 3, BLOCK_M=64, BLOCK_H=64, BLOCK_K=64),
            _cfg(8, 4, BLOCK_M=64, BLOCK_H=64, BLOCK_K=64),
            _cfg(8, 3, BLOCK_M=32, BLOCK_H=64, BLOCK_K=64),
        ],
    },
    # fp32 fuses only up to C = 256 (_fused_max_c): at a 512-wide accumulator
    # every tf32 tile spilled.
    "tf32": {
        128: [
            _cfg(8, 3, BLOCK_M=128, BLOCK_H=64, BLOCK_K=32),
            _cfg(8, 3, BLOCK_M=64, BLOCK_H=64, BLOCK_K=32),
            _cfg(4, 3, BLOCK_M=64, BLOCK_H=32, BLOCK_K=32),
        ],
        # On sm_80 both BLOCK_M = 64 configs spill 500-630 B; BLOCK_M = 32 is
        # clean on sm_80 and sm_90.
        256: [
            _cfg(8, 3, BLOCK_M=64, BLOCK_H=32, BLOCK_K=64),
            _cfg(8, 3, BLOCK_M=64, BLOCK_H=32, BLOCK_K=32),
            _cfg(8, 3, BLOCK_M=32, BLOCK_H=64, BLOCK_K=32),
        ],
    },
    "fma": {
        128: [
            _cfg(8, 2, BLOCK_M=64, BLOCK_H=32, BLOCK_K=16),
            _cfg(4, 2, BLOCK_M=32, BLOCK_H=32, BLOCK_K=16),
            _cfg(4, 2, BLOCK_M=32, BLOCK_H=16, BLOCK_K=16),
        ],
        256: [
            _cfg(8, 2, BLOCK_M=64, BLOCK_H=32, BLOCK_K=16),
            _cfg(4, 2, BLOCK_M=32, BLOCK_H=32, BLOCK_K=16),
        ],
    },
}
_GPU_MATMUL_CONFIGS = {
    # (128x256 tiles spilled in the GELU / residual epilogues: dropped.)
    "mma": [
        _cfg(8, 3, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
        _cfg(4, 4, BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, GROUP_M=8),
        _cfg(4, 4, BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
        _cfg(4, 4, BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=8),
    ],
    "tf32": [
        _cfg(8, 3, BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, GROUP_M=8),
        _cfg(4, 4, BLOCK_M=128, BLOCK_N=64, BLOCK_K=32, GROUP_M=8),
        _cfg(4, 4, BLOCK_M=64, BLOCK_N=128, BLOCK_K=32, GROUP_M=8),
        _cfg(4, 4, BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8),
    ],
    "fma": [
        _cfg(8, 3, BLOCK_M=128, BLOCK_N=64, BLOCK_K=32, GROUP_M=8),
        _cfg(8, 3, BLOCK_M=64, BLOCK_N=128, BLOCK_K=32, GROUP_M=8),
        _cfg(4, 3, BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8),
        _cfg(8, 3, BLOCK_M=128, BLOCK_N=128, BLOCK_K=16, GROUP_M=8),
    ],
}
_GPU_BWD_HIDDEN_CONFIGS = {
    "mma": [
        _cfg(4, 3, BLOCK_H=64, BLOCK_K=64),
        _cfg(8, 3, BLOCK_H=128, BLOCK_K=64),
        _cfg(8, 4, BLOCK_H=128, BLOCK_K=32),
    ],
    "tf32": [
        _cfg(4, 3, BLOCK_H=64, BLOCK_K=32),
        _cfg(8, 3, BLOCK_H=128, BLOCK_K=32),
    ],
    # (8 warps, BLOCK_H = 128, 3 stages spilled 176 B under triton 3.6: 2 stages,
    # 8 B under 3.6 and 28 B under 3.9.)
    "fma": [
        _cfg(4, 3, BLOCK_H=64, BLOCK_K=16),
        _cfg(8, 3, BLOCK_H=64, BLOCK_K=16),
        _cfg(8, 2, BLOCK_H=128, BLOCK_K=16),
    ],
}
if triton_interpreted():
    _FUSED_FWD_CONFIGS = _INTERPRETER_FUSED_FWD_CONFIGS
    _MATMUL_CONFIGS = _INTERPRETER_MATMUL_CONFIGS
    _BWD_HIDDEN_CONFIGS = _INTERPRETER_BWD_HIDDEN_CONFIGS
else:
    _FUSED_FWD_CONFIGS = _GPU_FUSED_FWD_CONFIGS
    _MATMUL_CONFIGS = _GPU_MATMUL_CONFIGS
    _BWD_HIDDEN_CONFIGS = _GPU_BWD_HIDDEN_CONFIGS


@triton.jit
def _gelu(a):
    # Exact GELU: a * Phi(a).
    return 0.5 * a * (1.0 + tl.math.erf(a * 0.7071067811865476))


@triton.jit
def _gelu_grad(a):
    # d/da [a * Phi(a)] = Phi(a) + a * phi(a).
    cdf = 0.5 * (1.0 + tl.math.erf(a * 0.7071067811865476))
    pdf = tl.exp(-0.5 * a * a) * 0.3989422804014327
    return cdf + a * pdf


@triton.jit
def _layerscale_residual_store(
    acc,             # (BLOCK_M, BLOCK_N) fp32 GEMM2 result for these rows/cols
    offs_m,          # (BLOCK_M,) int64 rows
    offs_n,          # (BLOCK_N,) int64 output channels
    bias_ptr,        # (N,) fp32 fc2 bias
    gamma_ptr,       # (N,) fp32 layer scale; read only when HAS_GAMMA
    row_scale_ptr,   # (M // ROWS_PER_SAMPLE,) fp32 drop scale; only when HAS_ROW_SCALE
    residual_ptr,    # (M, N) shortcut
    out_ptr,         # (M, N) output
    M, N, ROWS_PER_SAMPLE,
    HAS_GAMMA: tl.constexpr,
    HAS_ROW_SCALE: tl.constexpr,
):
    mask_m = offs_m < M
    mask_n = offs_n < N
    z = acc + tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0)[None, :]
    if HAS_GAMMA:
        z = z * tl.load(gamma_ptr + offs_n, mask=mask_n, other=0.0)[None, :]
    if HAS_ROW_SCALE:
        s = tl.load(row_scale_ptr + offs_m // ROWS_PER_SAMPLE, mask=mask_m, other=0.0)
        z = z * s[:, None]
    offs = offs_m[:, None] * N + offs_n[None, :]
    mask = mask_m[:, None] & mask_n[None, :]
    z += tl.load(residual_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, z.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _mlp_layerscale_fwd_kernel(
    x_ptr,           # (M, C) input rows (NHWC flattened), fp32/fp16/bf16
    w1_ptr,          # (HID, C) fc1 weight, x.dtype
    b1_ptr,          # (HID,) fp32 fc1 bias
    w2_ptr,          # (C, HID) fc2 weight, x.dtype
    b2_ptr,          # (C,) fp32 fc2 bias
    gamma_ptr,       # (C,) fp32 layer scale; read only when HAS_GAMMA
    row_scale_ptr,   # (N,) fp32 per-sample drop scale; read only when HAS_ROW_SCALE
    shortcut_ptr,    # (M, C) residual input, x.dtype
    y_ptr,           # (M, C) output, x.dtype
    preact_ptr,      # (M, HID) out, only when STORE_PREACT: x @ W1.T + b1 in x.dtype
    M, C, HID,       # rows, channels, hidden width (4C)
    ROWS_PER_SAMPLE,  # H * W: row m belongs to sample m // ROWS_PER_SAMPLE
    M_KEY,           # autotune key only (_autotune_bucket(M)); unused by the body
    HAS_GAMMA: tl.constexpr,        # apply layer scale
    HAS_ROW_SCALE: tl.constexpr,    # apply drop-path scale
    STORE_PREACT: tl.constexpr,     # save the pre-activation for a backward that reads it
    INPUT_PRECISION: tl.constexpr,  # tl.dot precision for fp32 inputs ("ieee"/"tf32")
    BLOCK_C0: tl.constexpr,  # first part of the output row: largest power of 2 <= C
    BLOCK_C1: tl.constexpr,  # the rest, C - BLOCK_C0 padded to a power of 2 >= 16; 0 if none
    BLOCK_M: tl.constexpr,  # rows per program
    BLOCK_H: tl.constexpr,  # hidden chunk kept on chip
    BLOCK_K: tl.constexpr,  # reduction chunk of GEMM1 (over C)
):
    pid_m = tl.program_id(0)
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c0 = tl.arange(0, BLOCK_C0).to(tl.int64)
    mask_m = offs_m < M
    mask_c0 = offs_c0 < C
    dtype = x_ptr.dtype.element_ty

    acc0 = tl.zeros([BLOCK_M, BLOCK_C0], dtype=tl.float32)
    if BLOCK_C1 > 0:
        offs_c1 = BLOCK_C0 + tl.arange(0, BLOCK_C1).to(tl.int64)
        mask_c1 = offs_c1 < C
        acc1 = tl.zeros([BLOCK_M, BLOCK_C1], dtype=tl.float32)
    for h0 in range(0, HID, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H).to(tl.int64)
        mask_h = offs_h < HID
        # GEMM1 chunk: a = x @ W1[chunk].T; x tiles are re-read per chunk
        # (from cache) rather than held, which bounds register use.
        a = tl.zeros([BLOCK_M, BLOCK_H], dtype=tl.float32)
        for k0 in range(0, C, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
            mask_k = offs_k < C
            xk = tl.load(x_ptr + offs_m[:, None] * C + offs_k[None, :],
                         mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            w1k = tl.load(w1_ptr + offs_h[None, :] * C + offs_k[:, None],
                          mask=mask_k[:, None] & mask_h[None, :], other=0.0)
            a = tl.dot(xk, w1k, a, input_precision=INPUT_PRECISION)
        a += tl.load(b1_ptr + offs_h, mask=mask_h, other=0.0)[None, :]
        if STORE_PREACT:
            tl.store(preact_ptr + offs_m[:, None] * HID + offs_h[None, :], a.to(dtype),
                     mask=mask_m[:, None] & mask_h[None, :])
        # Round h to the input dtype, as a torch Linear would feed fc2.
        h = _gelu(a).to(dtype)
        # GEMM2 chunk: acc += h @ W2[:, chunk].T (padded hidden lanes hit zero weights).
        w2c0 = tl.load(w2_ptr + offs_c0[None, :] * HID + offs_h[:, None],
                       mask=mask_h[:, None] & mask_c0[None, :], other=0.0)
        acc0 = tl.dot(h, w2c0, acc0, input_precision=INPUT_PRECISION)
        if BLOCK_C1 > 0:
            w2c1 = tl.load(w2_ptr + offs_c1[None, :] * HID + offs_h[:, None],
                           mask=mask_h[:, None] & mask_c1[None, :], other=0.0)
            acc1 = tl.dot(h, w2c1, acc1, input_precision=INPUT_PRECISION)

    _layerscale_residual_store(acc0, offs_m, offs_c0, b2_ptr, gamma_ptr, row_scale_ptr,
                               shortcut_ptr, y_ptr, M, C, ROWS_PER_SAMPLE,
                               HAS_GAMMA, HAS_ROW_SCALE)
    if BLOCK_C1 > 0:
        _layerscale_residual_store(acc1, offs_m, offs_c1, b2_ptr, gamma_ptr, row_scale_ptr,
                                   shortcut_ptr, y_ptr, M, C, ROWS_PER_SAMPLE,
                                   HAS_GAMMA, HAS_ROW_SCALE)


@triton.jit
def _matmul_kernel(
    a_ptr,           # A (M, K): element (m, k) at a_ptr + m*stride_am + k*stride_ak
    b_ptr,           # B (K, N): element (k, n) at b_ptr + k*stride_bk + n*stride_bn
    out_ptr,         # EPILOGUE_PARTIAL: (SPLIT_K, M, N) fp32; else (M, N) row-major
    bias_ptr,        # (N,) fp32 bias (GELU / RESIDUAL epilogues)
    gamma_ptr,       # (N,) fp32 layer scale (RESIDUAL, HAS_GAMMA)
    row_scale_ptr,   # (M // ROWS_PER_SAMPLE,) fp32 drop scale (RESIDUAL, HAS_ROW_SCALE)
    residual_ptr,    # (M, N) shortcut (RESIDUAL)
    preact_ptr,      # (M, N) out (GELU, STORE_PREACT): the pre-activation in out's dtype
    M, N, K,         # problem size
    K_PER_SPLIT,     # reduction length per program_id(1); K when not split
    ROWS_PER_SAMPLE,  # H * W for the drop scale
    M_KEY, N_KEY, K_KEY,  # autotune keys only (_autotune_bucket of M, N, K); unused by the body
    stride_am, stride_ak, stride_bk, stride_bn,  # element strides of A and B
    EPILOGUE: tl.constexpr,         # EPILOGUE_PARTIAL / _GELU / _RESIDUAL / _STORE
    HAS_GAMMA: tl.constexpr,        # RESIDUAL: apply layer scale
    HAS_ROW_SCALE: tl.constexpr,    # RESIDUAL: apply drop-path scale
    STORE_PREACT: tl.constexpr,     # GELU: also store acc + bias
    INPUT_PRECISION: tl.constexpr,  # tl.dot precision for fp32 inputs
    BLOCK_M: tl.constexpr,  # output tile rows
    BLOCK_N: tl.constexpr,  # output tile cols
    BLOCK_K: tl.constexpr,  # reduction chunk
    GROUP_M: tl.constexpr,  # tile-row grouping for L2 reuse
):
    pid = tl.program_id(0)
    split = tl.program_id(1).to(tl.int64)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    # Grouped ordering: GROUP_M tile rows share B tiles while they sit in L2.
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    k_start = split * K_PER_SPLIT
    k_end = tl.minimum(k_start + K_PER_SPLIT, K)

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        mask_k = offs_k < k_end
        a = tl.load(a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(b_ptr + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn,
                    mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)

    # Row-major (M, N) tile offsets and bounds, shared by the epilogues that store here.
    offs = offs_m[:, None] * N + offs_n[None, :]
    mask = mask_m[:, None] & mask_n[None, :]
    if EPILOGUE == 0:  # EPILOGUE_PARTIAL: this split's (M, N) slice
        tl.store(out_ptr + split * M * N + offs, acc, mask=mask)
    elif EPILOGUE == 1:  # EPILOGUE_GELU
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0)[None, :]
        h = _gelu(acc)
        tl.store(out_ptr + offs, h.to(out_ptr.dtype.element_ty), mask=mask)
        if STORE_PREACT:
            tl.store(preact_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)
    elif EPILOGUE == 2:  # EPILOGUE_RESIDUAL
        _layerscale_residual_store(acc, offs_m, offs_n, bias_ptr, gamma_ptr, row_scale_ptr,
                                   residual_ptr, out_ptr, M, N, ROWS_PER_SAMPLE,
                                   HAS_GAMMA, HAS_ROW_SCALE)
    else:  # EPILOGUE_STORE
        tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _mlp_layerscale_bwd_hidden_kernel(
    x_ptr,           # (M, C) forward input
    dy_ptr,          # (M, C) upstream gradient, x.dtype
    w1_ptr,          # (HID, C) fc1 weight
    b1_ptr,          # (HID,) fp32 fc1 bias
    w2_ptr,          # (C, HID) fc2 weight
    gamma_ptr,       # (C,) fp32 layer scale; read only when HAS_GAMMA
    row_scale_ptr,   # (N,) fp32 drop scale; read only when HAS_ROW_SCALE
    h_ptr,           # (M, HID) out: gelu(a) in x.dtype (operand of G = dys.T @ h)
    da_ptr,          # (M, HID) out: gradient w.r.t. the pre-activation a, x.dtype
    db1_part_ptr,    # (cdiv(M, BLOCK_M), HID) out: fp32 partial column sums of da
    dys_ptr,         # (M, C) out, when HAS_ROW_SCALE: dy * s[n] in x.dtype (first hidden tile)
    dys_part_ptr,    # (cdiv(M, BLOCK_M), C) out: fp32 partial column sums of dy * s[n]
    preact_ptr,      # (M, HID) saved pre-activation a, x.dtype; read only when PREACT_STORED
    M, C, HID,       # rows, channels, hidden width
    ROWS_PER_SAMPLE,  # H * W
    M_KEY,           # autotune key only (_autotune_bucket(M)); unused by the body
    HAS_GAMMA: tl.constexpr,        # apply layer scale to dz
    HAS_ROW_SCALE: tl.constexpr,    # apply the drop scale (and write dys)
    PREACT_STORED: tl.constexpr,    # load a from preact_ptr instead of recomputing x @ W1.T + b1
    INPUT_PRECISION: tl.constexpr,  # tl.dot precision for fp32 inputs
    BLOCK_M: tl.constexpr,  # rows per program (fixed by the launcher: partial layout)
    BLOCK_H: tl.constexpr,  # hidden columns per program
    BLOCK_K: tl.constexpr,  # reduction chunk over C
):
    pid_m = tl.program_id(0)
    pid_h = tl.program_id(1)
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_h = pid_h.to(tl.int64) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask_m = offs_m < M
    mask_h = offs_h < HID
    dtype = x_ptr.dtype.element_ty
    if HAS_ROW_SCALE:
        s = tl.load(row_scale_ptr + offs_m // ROWS_PER_SAMPLE, mask=mask_m, other=0.0)

    # dy * s[n] and its column sums are per (row, channel): only the first hidden
    # tile's programs store them.
    first_tile = pid_h == 0
    a = tl.zeros([BLOCK_M, BLOCK_H], dtype=tl.float32)
    dh = tl.zeros([BLOCK_M, BLOCK_H], dtype=tl.float32)
    for k0 in range(0, C, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        mask_k = offs_k < C
        mk = mask_m[:, None] & mask_k[None, :]
        kh = mask_k[:, None] & mask_h[None, :]
        if not PREACT_STORED:
            xk = tl.load(x_ptr + offs_m[:, None] * C + offs_k[None, :], mask=mk, other=0.0)
            w1k = tl.load(w1_ptr + offs_h[None, :] * C + offs_k[:, None], mask=kh, other=0.0)
            a = tl.dot(xk, w1k, a, input_precision=INPUT_PRECISION)
        dz = tl.load(dy_ptr + offs_m[:, None] * C + offs_k[None, :], mask=mk, other=0.0)
        dz = dz.to(tl.float32)
        if HAS_ROW_SCALE:
            dz = dz * s[:, None]
        if first_tile:
            if HAS_ROW_SCALE:
                tl.store(dys_ptr + offs_m[:, None] * C + offs_k[None, :], dz.to(dtype), mask=mk)
            tl.store(dys_part_ptr + pid_m.to(tl.int64) * C + offs_k, tl.sum(dz, axis=0),
                     mask=mask_k)
        # dz = dy * s[n] * gamma, formed in fp32 and rounded to x.dtype (the
        # tensor core operand).
        if HAS_GAMMA:
            dz = dz * tl.load(gamma_ptr + offs_k, mask=mask_k, other=0.0)[None, :]
        w2k = tl.load(w2_ptr + offs_k[:, None] * HID + offs_h[None, :], mask=kh, other=0.0)
        dh = tl.dot(dz.to(dtype), w2k, dh, input_precision=INPUT_PRECISION)

    offs = offs_m[:, None] * HID + offs_h[None, :]
    mask = mask_m[:, None] & mask_h[None, :]
    if PREACT_STORED:
        a = tl.load(preact_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        a += tl.load(b1_ptr + offs_h, mask=mask_h, other=0.0)[None, :]
    h = _gelu(a)
    # Padded rows have dy = 0, hence dh = da = 0: they add nothing to db1.
    da = dh * _gelu_grad(a)
    tl.store(h_ptr + offs, h.to(dtype), mask=mask)
    tl.store(da_ptr + offs, da.to(dtype), mask=mask)
    tl.store(db1_part_ptr + pid_m.to(tl.int64) * HID + offs_h, tl.sum(da, axis=0), mask=mask_h)


def _autotune_bucket(n):
    """An autotune key for a problem size: the next power of two, at least 16. One tuning then
    serves every size up to twice the one it was timed at, so a model that meets new batch or
    image sizes (detection at varying resolutions, a last partial batch) tunes once per octave,
    not once per shape (each tuning compiles and times every config of the list). Never below 16,
    so that this int argument is not specialised (== 1) into another compiled variant."""
    return max(16, triton.next_power_of_2(n))


# The sizes enter the keys bucketed (_autotune_bucket). The keys also name the constexpr flags
# that change a kernel's memory traffic (storing or reading the (M, 4C) pre-activation), so the
# stored and recomputed forms are tuned apart.
_fused_fwd_kernels = {
    mode: {
        c: autotune(cfgs, key=["M_KEY", "C", "STORE_PREACT"])(_mlp_layerscale_fwd_kernel)
        for c, cfgs in per_c.items()
    }
    for mode, per_c in _FUSED_FWD_CONFIGS.items()
}
_matmul = {
    mode: autotune(cfgs, key=["M_KEY", "N_KEY", "K_KEY", "EPILOGUE", "STORE_PREACT"])(_matmul_kernel)
    for mode, cfgs in _MATMUL_CONFIGS.items()
}
_bwd_hidden = {
    mode: autotune(cfgs, key=["M_KEY", "C", "PREACT_STORED"])(_mlp_layerscale_bwd_hidden_kernel)
    for mode, cfgs in _BWD_HIDDEN_CONFIGS.items()
}


def _input_precision(dtype):
    # fp32 follows torch's TF32 switch; the interpreter is always exact.
    if dtype == torch.float32 and not triton_interpreted() and tf32_matmul_allowed():
        return "tf32"
    return "ieee"


def _dot_mode(dtype, precision):
    """Which config lists apply: "mma" (fp16/bf16), "tf32" or "fma" (fp32 "ieee")."""
    if dtype != torch.float32:
        return "mma"
    return "tf32" if precision == "tf32" else "fma"


def _fused_list_key(keys, width):
    """Which of the fused forward's config lists (keys) serves an accumulator of this width
    (BLOCK_C0 + BLOCK_C1): the smallest key >= it."""
    return min(k for k in keys if k >= width)


def _fused_max_c(dtype):
    # fp32 operands need twice the registers / shared memory: fuse up to C = 256.
    return FUSED_MAX_C if dtype != torch.float32 else min(FUSED_MAX_C, 256)


def _launch_matmul(a, b, out, M, N, K, stride_am, stride_ak, stride_bk, stride_bn,
                   epilogue, precision, k_per_split=None, split=1, bias=None, gamma=None,
                   row_scale=None, residual=None, rows_per_sample=1, preact=None):
    dummy = out
    grid = lambda META: (triton.cdiv(M, META["BLOCK_M"]) * triton.cdiv(N, META["BLOCK_N"]), split)
    kernel = _matmul[_dot_mode(a.dtype, precision)]
    wrap_triton(kernel)[grid](
        a, b, out,
        bias if bias is not None else dummy,
        gamma if gamma is not None else dummy,
        row_scale if row_scale is not None else dummy,
        residual if residual is not None else dummy,
        preact if preact is not None else dummy,
        M, N, K, K if k_per_split is None else k_per_split, rows_per_sample,
        _autotune_bucket(M), _autotune_bucket(N), _autotune_bucket(K),
        stride_am, stride_ak, stride_bk, stride_bn,
        EPILOGUE=epilogue, HAS_GAMMA=gamma is not None, HAS_ROW_SCALE=row_scale is not None,
        STORE_PREACT=preact is not None, INPUT_PRECISION=precision,
    )


@on_tensors_device
def mlp_layerscale_fwd(
    x: Tensor,
    shortcut: Tensor,
    fc1_weight: Tensor,
    fc1_bias: Tensor,
    fc2_weight: Tensor,
    fc2_bias: Tensor,
    gamma: Optional[Tensor],
    drop_scale: Optional[Tensor],
    preact_out: Optional[Tensor] = None,
) -> Tensor:
    """y = shortcut + drop_scale[n] * gamma * (gelu(x @ W1.T + b1) @ W2.T + b2).

    preact_out: optional (N*H*W, 4C) x.dtype buffer that receives the pre-activation
    x @ W1.T + b1, for ``mlp_layerscale_bwd(..., preact=...)`` (the stored-activation variant;
    the ops recompute it instead, see the module docstring).
    """
    N, H, W, C = x.shape
    M = N * H * W
    HID = fc1_weight.shape[0]
    y = empty_output(x.shape, x.dtype, x.device)
    precision = _input_precision(x.dtype)
    has_gamma = gamma is not None
    has_row_scale = drop_scale is not None
    mode = _dot_mode(x.dtype, precision)
    if C <= _fused_max_c(x.dtype):
        block_c0, block_c1 = split_width(C)
        kernels = _fused_fwd_kernels[mode]
        kernel = kernels[_fused_list_key(kernels, block_c0 + block_c1)]
        grid = lambda META: (triton.cdiv(M, META["BLOCK_M"]),)
        wrap_triton(kernel)[grid](
            x, fc1_weight, fc1_bias, fc2_weight, fc2_bias,
            gamma if has_gamma else fc2_bias,
            drop_scale if has_row_scale else fc2_bias,
            shortcut, y,
            preact_out if preact_out is not None else y,
            M, C, HID, H * W, _autotune_bucket(M),
            HAS_GAMMA=has_gamma, HAS_ROW_SCALE=has_row_scale, STORE_PREACT=preact_out is not None,
            INPUT_PRECISION=precision, BLOCK_C0=block_c0, BLOCK_C1=block_c1,
        )
    else:
        hidden = empty_output((M, HID), x.dtype, x.device)
        # hidden = gelu(x @ W1.T + b1): B(k, n) = W1[n, k].
        _launch_matmul(x, fc1_weight, hidden, M, HID, C, C, 1, 1, C,
                       EPILOGUE_GELU, precision, bias=fc1_bias, preact=preact_out)
        # y = shortcut + s * gamma * (hidden @ W2.T + b2): B(k, n) = W2[n, k].
        _launch_matmul(hidden, fc2_weight, y, M, C, HID, HID, 1, 1, HID,
                       EPILOGUE_RESIDUAL, precision, bias=fc2_bias, gamma=gamma,
                       row_scale=drop_scale, residual=shortcut, rows_per_sample=H * W)
    return y


def _split_k(rows, cols, K):
    """(split, k_per_split) for a weight-gradient GEMM reducing over K = M rows.

    Depends on the shapes only, so the summation order is fixed. Aims at a
    couple of waves of ~128x128 tiles on a 132-SM GPU with >= 512 rows/split.
    """
    tiles = triton.cdiv(rows, 128) * triton.cdiv(cols, 128)
    split = max(1, min(triton.cdiv(264, tiles), triton.cdiv(K, 512)))
    k_per_split = triton.cdiv(triton.cdiv(K, split), 256) * 256
    return triton.cdiv(K, k_per_split), k_per_split


@on_tensors_device
def mlp_layerscale_bwd(
    dy: Tensor,
    x: Tensor,
    fc1_weight: Tensor,
    fc1_bias: Tensor,
    fc2_weight: Tensor,
    fc2_bias: Tensor,
    gamma: Optional[Tensor],
    drop_scale: Optional[Tensor],
    preact: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns (dx, dfc1_weight, dfc1_bias, dfc2_weight, dfc2_bias, dgamma).

    preact: the forward's ``preact_out``, or None to recompute it from x.
    """
    N, H, W, C = x.shape
    M = N * H * W
    HID = fc1_weight.shape[0]
    dev = x.device
    precision = _input_precision(x.dtype)
    has_gamma = gamma is not None
    has_row_scale = drop_scale is not None
    gamma_arg = gamma if has_gamma else fc2_bias
    row_scale_arg = drop_scale if has_row_scale else fc2_bias
    block_m = _BWD_BLOCK_M
    m_tiles = triton.cdiv(M, block_m)

    # 1. h, da, db1 partials; dys = dy * s and its column-sum partials.
    h = empty_output((M, HID), x.dtype, dev)
    da = empty_output((M, HID), x.dtype, dev)
    db1_part = empty_output((m_tiles, HID), torch.float32, dev)
    dys = empty_output((M, C), x.dtype, dev) if has_row_scale else dy
    dys_part = empty_output((m_tiles, C), torch.float32, dev)
    grid1 = lambda META: (m_tiles, triton.cdiv(HID, META["BLOCK_H"]))
    mode = _dot_mode(x.dtype, precision)
    wrap_triton(_bwd_hidden[mode])[grid1](
        x, dy, fc1_weight, fc1_bias, fc2_weight, gamma_arg, row_scale_arg,
        h, da, db1_part, dys, dys_part,
        preact if preact is not None else h,
        M, C, HID, H * W, _autotune_bucket(M),
        HAS_GAMMA=has_gamma, HAS_ROW_SCALE=has_row_scale, PREACT_STORED=preact is not None,
        INPUT_PRECISION=precision, BLOCK_M=block_m,
    )

    # 2. dx = da @ W1: A(m, j) = da[m, j], B(j, c) = W1[j, c].
    dx = empty_output(x.shape, x.dtype, dev)
    _launch_matmul(da, fc1_weight, dx, M, C, HID, HID, 1, C, 1, EPILOGUE_STORE, precision)

    # 3. Weight gradients: split-K GEMMs over the rows, fp32 partials.
    split2, kps2 = _split_k(C, HID, M)
    g_part = empty_output((split2, C, HID), torch.float32, dev)
    # G = dys.T @ h: A(i, m) = dys[m, i], B(m, j) = h[m, j].
    _launch_matmul(dys, h, g_part, C, HID, M, 1, C, HID, 1,
                   EPILOGUE_PARTIAL, precision, k_per_split=kps2, split=split2)
    split1, kps1 = _split_k(HID, C, M)
    dw1_part = empty_output((split1, HID, C), torch.float32, dev)
    # dW1 = da.T @ x: A(j, m) = da[m, j], B(m, c) = x[m, c].
    _launch_matmul(da, x, dw1_part, HID, C, M, 1, HID, C, 1,
                   EPILOGUE_PARTIAL, precision, k_per_split=kps1, split=split1)

    # 4. Fixed-order sums, then the layer-scale identities (module docstring).
    g = g_part.sum(0)
    dys_sum = dys_part.sum(0)
    dgamma = (g * fc2_weight.float()).sum(1) + fc2_bias * dys_sum
    if has_gamma:
        dfc2_weight = g * gamma[:, None]
        dfc2_bias = dys_sum * gamma
    else:
        dfc2_weight, dfc2_bias = g, dys_sum
    return dx, dw1_part.sum(0), db1_part.sum(0), dfc2_weight, dfc2_bias, dgamma
