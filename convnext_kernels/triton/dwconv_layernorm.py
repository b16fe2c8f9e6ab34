"""Triton kernels for the fused depthwise 7x7 conv + LayerNorm over C (NHWC).

Forward: one program owns a BLOCK_W-wide strip of ROWS output rows of one
sample, all C channels, so the LayerNorm statistics over C come from registers.
It walks its input rows once, top to bottom: each row's 7 column taps are loaded
and converted to fp32 once and feed all 7 kernel rows, into a ring of 7 row
accumulators (output rows ih - 3 .. ih + 3); the top one is then complete, is
normalised and stored, and the ring moves down. Rows outside the image are
skipped, not masked. The channels are held as two power-of-two tiles, BLOCK_C0
+ BLOCK_C1 (_tiling.split_width: 96 = 64 + 32, 768 = 512 + 256), not one
next_power_of_2(C) tile: at every ConvNeXt width that tile would be a quarter
padding, and the conv's loads, conversions and FMAs run on every lane.

Backward:
  1. ``_dwconv_layernorm_bwd_norm_kernel`` (the forward's programs and ring)
     recomputes the conv output z and xhat, writes the gradient with respect to
     z, g = rstd * (dy*nw - mean_C(dy*nw) - xhat * mean_C(dy*nw*xhat)), into an
     fp32 workspace, and per-program fp32 partial sums of dnorm_weight,
     dnorm_bias and dconv_bias.
  2. ``_dwconv_layernorm_bwd_conv_kernel`` is purely per channel, so it tiles C
     too: dx = transposed depthwise conv of g, and per-program fp32 partials of
     dconv_weight[c, tap] = sum_p g[p, c] * x[p + off(tap), c] over a chunk of
     rows (the chunk keeps the (programs, 49, C) partial buffer small).
  Partials are summed with torch in a fixed order: deterministic, no atomics.
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
import triton
import triton.language as tl

from ..launchers import dwconv_layernorm_fwd_outputs, empty_output
from ._compat import wrap_triton
from ._tiling import split_width

KERNEL_SIZE = 7
TAPS = KERNEL_SIZE * KERNEL_SIZE

# fp32 elements per program tile (pixels x channels) of the backward conv kernel.
_TILE_ELEMS = 4096
# The forward and backward-norm kernels hold seven tiles (one per output row in flight) of
# BLOCK_W pixels x all C: above C = 512, about 1024 fp32 elements each.
_RING_TILE_ELEMS = 1024
# Channel block of the per-channel backward conv kernel.
_CONV_BWD_BLOCK_C = 128
# A CUDA grid's x dimension; the kernels use that axis alone (axes 1 and 2 stop at 65535).
_MAX_PROGRAMS = 2**31 - 1


@triton.jit
def _channel_tiles(
    C,
    BLOCK_C0: tl.constexpr,
    BLOCK_C1: tl.constexpr,
):
    """(offs_c0, mask_c0, offs_c1, mask_c1) of the two channel tiles; with BLOCK_C1 == 0 the
    second pair repeats the first (a placeholder the kernels never use). The first tile is never
    wider than C (split_width(C, min_tile=1)): its mask is a constant, which the compiler folds
    out of every load, select and store."""
    offs_c0 = tl.arange(0, BLOCK_C0)
    mask_c0 = tl.full([BLOCK_C0], True, tl.int1)
    if BLOCK_C1 > 0:
        offs_c1 = BLOCK_C0 + tl.arange(0, BLOCK_C1)
        mask_c1 = offs_c1 < C
    else:
        offs_c1 = offs_c0
        mask_c1 = mask_c0
    return offs_c0, mask_c0, offs_c1, mask_c1


@triton.jit
def _layernorm_store_tile(
    y_ptr, norm_w_ptr, norm_b_ptr,  # as in the forward kernel
    zc,           # (BLOCK_W, BLOCK_C) centred conv output, 0 in padded channels
    rstd,         # (BLOCK_W,) fp32
    pix,          # (BLOCK_W,) int64 pixel indices
    mask_w,       # (BLOCK_W,) pixel validity
    offs_c, mask_c, C,
):
    nw = tl.load(norm_w_ptr + offs_c, mask=mask_c, other=0.0)
    nb = tl.load(norm_b_ptr + offs_c, mask=mask_c, other=0.0)
    y = zc * rstd[:, None] * nw[None, :] + nb[None, :]
    tl.store(y_ptr + pix[:, None] * C + offs_c[None, :], y.to(y_ptr.dtype.element_ty),
             mask=mask_w[:, None] & mask_c[None, :])


@triton.jit
def _layernorm_store_row(
    y_ptr, mean_ptr, rstd_ptr, conv_bias_ptr, norm_w_ptr, norm_b_ptr,  # as in the forward kernel
    z0, z1,       # conv output of one row segment, both channel tiles (bias not yet added)
    pix,          # (BLOCK_W,) int64 pixel indices
    mask_w, offs_c0, mask_c0, offs_c1, mask_c1,
    C, eps,
    HAS_BIAS: tl.constexpr,
    BLOCK_C1: tl.constexpr,
):
    """Bias, LayerNorm over C (both channel tiles) and the stores of one finished output row."""
    if HAS_BIAS:
        z0 += tl.load(conv_bias_ptr + offs_c0, mask=mask_c0, other=0.0)[None, :]
        if BLOCK_C1 > 0:
            z1 += tl.load(conv_bias_ptr + offs_c1, mask=mask_c1, other=0.0)[None, :]
    # Padded channels of z are exactly 0, so the plain sums give the mean;
    # they must be masked out of the centred values for the variance.
    total = tl.sum(z0, axis=1)
    if BLOCK_C1 > 0:
        total += tl.sum(z1, axis=1)
    mean = total / C
    zc0 = tl.where(mask_c0[None, :], z0 - mean[:, None], 0.0)
    squares = tl.sum(zc0 * zc0, axis=1)
    if BLOCK_C1 > 0:
        zc1 = tl.where(mask_c1[None, :], z1 - mean[:, None], 0.0)
        squares += tl.sum(zc1 * zc1, axis=1)
    rstd = 1.0 / tl.sqrt(squares / C + eps)
    _layernorm_store_tile(y_ptr, norm_w_ptr, norm_b_ptr, zc0, rstd, pix, mask_w, offs_c0, mask_c0, C)
    if BLOCK_C1 > 0:
        _layernorm_store_tile(y_ptr, norm_w_ptr, norm_b_ptr, zc1, rstd, pix, mask_w, offs_c1, mask_c1, C)
    tl.store(mean_ptr + pix, mean, mask=mask_w)
    tl.store(rstd_ptr + pix, rstd, mask=mask_w)


@triton.jit
def _tap(column_taps, kh: tl.constexpr, taps_stride: tl.constexpr, offs_c):
    """(1, BLOCK_C) fp32 weights of kernel row kh in one kernel column for these channels (the
    padded taps need no mask)."""
    return tl.load(column_taps + kh * 7 * taps_stride + offs_c)[None, :]


@triton.jit
def _ring_column(
    pix_ptrs,     # (BLOCK_W, 1) pointers to the pixels of one input row at one kernel column
    m,            # (BLOCK_W,) their validity (zero padding at the image's sides)
    offs_c, mask_c,  # one channel tile
    column_taps,  # that kernel column's taps: kernel row kh at + kh * 7 * taps_stride
    taps_stride: tl.constexpr,
    r0, r1, r2, r3, r4, r5, r6,  # the ring: output rows ih - 3 .. ih + 3
):
    """One kernel column of one input row into the ring: the pixels are loaded and converted to
    fp32 once (all arithmetic is fp32), and kernel row kh sends them to r{6 - kh}."""
    xv = tl.load(pix_ptrs + offs_c[None, :], mask=m[:, None] & mask_c[None, :], other=0.0).to(tl.float32)
    return (r0 + xv * _tap(column_taps, 6, taps_stride, offs_c), r1 + xv * _tap(column_taps, 5, taps_stride, offs_c),
            r2 + xv * _tap(column_taps, 4, taps_stride, offs_c), r3 + xv * _tap(column_taps, 3, taps_stride, offs_c),
            r4 + xv * _tap(column_taps, 2, taps_stride, offs_c), r5 + xv * _tap(column_taps, 1, taps_stride, offs_c),
            r6 + xv * _tap(column_taps, 0, taps_stride, offs_c))


@triton.jit
def _ring_program(
    H, W,
    ROWS,         # output rows per program
    BLOCK_W: tl.constexpr,
):
    """(pid, sample_row0, h_begin, h_end, offs_w, mask_w) of this program: one grid axis
    (2^31 - 1 programs; axes 1 and 2 stop at 65535), program = (n, row chunk) * w tiles + w
    tile, int64 so offsets never overflow; its output rows are [h_begin, h_end) of sample n
    (image rows from sample_row0 = n * H)."""
    pid = tl.program_id(0).to(tl.int64)
    num_w_tiles = tl.cdiv(W, BLOCK_W)
    num_chunks = tl.cdiv(H, ROWS)
    pid_w = pid % num_w_tiles
    chunk = pid // num_w_tiles
    sample_row0 = (chunk // num_chunks) * H
    h_begin = ((chunk % num_chunks) * ROWS).to(tl.int32)
    h_end = tl.minimum(h_begin + ROWS, H)
    offs_w = pid_w * BLOCK_W + tl.arange(0, BLOCK_W)
    return pid, sample_row0, h_begin, h_end, offs_w, offs_w < W


@triton.jit
def _ring_row(
    x_ptr, taps_ptr,  # input; (49, BLOCK_C0 + BLOCK_C1) padded taps
    sample_row0, ih,  # this input row: image row ih of the sample
    H, W, C,
    offs_w, offs_c0, mask_c0, offs_c1, mask_c1,
    a0, a1, a2, a3, a4, a5, a6,  # the ring, first channel tile: output rows ih - 3 .. ih + 3
    b0, b1, b2, b3, b4, b5, b6,  # the same, second tile (placeholders when BLOCK_C1 == 0)
    BLOCK_C0: tl.constexpr,
    BLOCK_C1: tl.constexpr,
):
    """Input row ih into the ring (rows outside the image add nothing: zero padding)."""
    if (ih >= 0) & (ih < H):
        row_base = (sample_row0 + ih) * W  # int64 pixel index of (n, ih, 0)
        # A loop, not unrolled: the weights of one kernel column (7 taps) are live at a time.
        # Unrolled, the compiler hoists all 49 taps' loads ahead of their uses (255 registers
        # and spills at C = 96).
        for kw in range(7):
            column_taps = taps_ptr + kw * (BLOCK_C0 + BLOCK_C1)
            iw = offs_w + (kw - 3)
            m = (iw >= 0) & (iw < W)
            pix_ptrs = x_ptr + (row_base + iw)[:, None] * C
            a0, a1, a2, a3, a4, a5, a6 = _ring_column(pix_ptrs, m, offs_c0, mask_c0, column_taps,
                                                      BLOCK_C0 + BLOCK_C1, a0, a1, a2, a3, a4, a5, a6)
            if BLOCK_C1 > 0:
                b0, b1, b2, b3, b4, b5, b6 = _ring_column(pix_ptrs, m, offs_c1, mask_c1, column_taps,
                                                          BLOCK_C0 + BLOCK_C1, b0, b1, b2, b3, b4, b5, b6)
    return a0, a1, a2, a3, a4, a5, a6, b0, b1, b2, b3, b4, b5, b6


@triton.jit
def _ring_zeros(
    BLOCK_W: tl.constexpr,
    BLOCK_C0: tl.constexpr,
    BLOCK_C1: tl.constexpr,
):
    """A new ring row: zero accumulators for both channel tiles (a (1, 1) placeholder for the
    second when BLOCK_C1 == 0)."""
    if BLOCK_C1 > 0:
        b = tl.zeros([BLOCK_W, BLOCK_C1], dtype=tl.float32)
    else:
        b = tl.zeros([1, 1], dtype=tl.float32)
    return tl.zeros([BLOCK_W, BLOCK_C0], dtype=tl.float32), b


# Both the forward and the backward-norm kernel recompute the conv as a ring: a program walks
# its input rows once, top to bottom. Each row's 7 column taps are loaded and converted once and
# serve all 7 kernel rows: kernel row kh sends input row ih to output row ih + 3 - kh, whose
# accumulator is a{6 - kh} (b{..} for the second channel tile): a0 holds output row ih - 3, a6
# row ih + 3. After row ih, a0 has all 7 kernel rows: the kernel finishes that output row, and
# the ring moves down one row. (The one-row form loaded and converted every input element 7
# times, once per kernel row, and masked, rather than skipped, the rows outside the image.)


@triton.jit
def _dwconv_layernorm_fwd_kernel(
    x_ptr,          # (N, H, W, C) input, NHWC contiguous, fp32/fp16/bf16
    taps_ptr,       # (49, BLOCK_C0 + BLOCK_C1) fp32 conv weight, tap-major, zero past C
    conv_bias_ptr,  # (C,) fp32 conv bias; read only when HAS_BIAS
    norm_w_ptr,     # (C,) fp32 LayerNorm weight
    norm_b_ptr,     # (C,) fp32 LayerNorm bias
    y_ptr,          # (N, H, W, C) output, x.dtype
    mean_ptr,       # (N, H, W) fp32 mean over C of the conv output
    rstd_ptr,       # (N, H, W) fp32 1/sqrt(var + eps)
    H, W, C,        # sizes
    eps,            # LayerNorm epsilon
    ROWS,           # output rows per program: a chunk of one sample's rows
    HAS_BIAS: tl.constexpr,  # conv has a bias
    BLOCK_W: tl.constexpr,   # pixels of each row per program
    BLOCK_C0: tl.constexpr,  # first channel tile: the largest power of 2 <= C
    BLOCK_C1: tl.constexpr,  # the rest, C - BLOCK_C0 padded to a power of 2; 0 if none
):
    _, sample_row0, h_begin, h_end, offs_w, mask_w = _ring_program(H, W, ROWS, BLOCK_W)
    offs_c0, mask_c0, offs_c1, mask_c1 = _channel_tiles(C, BLOCK_C0, BLOCK_C1)
    a0, b0 = _ring_zeros(BLOCK_W, BLOCK_C0, BLOCK_C1)
    a1, a2, a3, a4, a5, a6 = a0, a0, a0, a0, a0, a0
    b1, b2, b3, b4, b5, b6 = b0, b0, b0, b0, b0, b0
    for ih in range(h_begin - 3, h_end + 3):
        a0, a1, a2, a3, a4, a5, a6, b0, b1, b2, b3, b4, b5, b6 = _ring_row(
            x_ptr, taps_ptr, sample_row0, ih, H, W, C, offs_w, offs_c0, mask_c0, offs_c1, mask_c1,
            a0, a1, a2, a3, a4, a5, a6, b0, b1, b2, b3, b4, b5, b6, BLOCK_C0, BLOCK_C1)
        if ih - 3 >= h_begin:  # a0 is output row ih - 3 (< h_end: ih < h_end + 3)
            _layernorm_store_row(y_ptr, mean_ptr, rstd_ptr, conv_bias_ptr, norm_w_ptr, norm_b_ptr, a0, b0,
                                 (sample_row0 + ih - 3) * W + offs_w, mask_w, offs_c0, mask_c0, offs_c1,
                                 mask_c1, C, eps, HAS_BIAS, BLOCK_C1)
        new_a, new_b = _ring_zeros(BLOCK_W, BLOCK_C0, BLOCK_C1)
        a0, a1, a2, a3, a4, a5, a6 = a1, a2, a3, a4, a5, a6, new_a
        b0, b1, b2, b3, b4, b5, b6 = b1, b2, b3, b4, b5, b6, new_b


@triton.jit
def _bwd_norm_tile_inputs(
    z,            # (BLOCK_W, BLOCK_C) recomputed conv output (+ bias) of one channel tile
    dy_ptr, norm_w_ptr,  # as in the kernel below
    pix, mask_w,  # this program's pixels
    mean, rstd,   # (BLOCK_W,) fp32 saved statistics
    offs_c, mask_c, C,  # this channel tile
):
    """(xhat, dy, dy * norm_weight) of one channel tile, fp32. Invalid pixels / channels get
    xhat = 0 and dy = 0, so they add nothing to the sums."""
    mask = mask_w[:, None] & mask_c[None, :]
    xhat = tl.where(mask, (z - mean[:, None]) * rstd[:, None], 0.0)
    dy = tl.load(dy_ptr + pix[:, None] * C + offs_c[None, :], mask=mask, other=0.0).to(tl.float32)
    nw = tl.load(norm_w_ptr + offs_c, mask=mask_c, other=0.0)
    return xhat, dy, dy * nw[None, :]


@triton.jit
def _norm_grad_row(
    z0, z1,       # recomputed conv output of one finished row, both channel tiles (no bias yet)
    dy_ptr, g_ptr, conv_bias_ptr, norm_w_ptr, mean_ptr, rstd_ptr,  # as in the kernel below
    pix, mask_w,  # (BLOCK_W,) int64 pixel indices of the row, their validity
    offs_c0, mask_c0, offs_c1, mask_c1,
    C,
    HAS_BIAS: tl.constexpr,
    BLOCK_C1: tl.constexpr,
):
    """g = rstd * (dyw - mean_C(dyw) - xhat * mean_C(dyw * xhat)), dyw = dy * norm_weight, of
    one row, stored; returns dy * xhat, dy and g of each tile (what dnorm_weight, dnorm_bias and
    dconv_bias sum)."""
    if HAS_BIAS:
        z0 += tl.load(conv_bias_ptr + offs_c0, mask=mask_c0, other=0.0)[None, :]
        if BLOCK_C1 > 0:
            z1 += tl.load(conv_bias_ptr + offs_c1, mask=mask_c1, other=0.0)[None, :]
    mean = tl.load(mean_ptr + pix, mask=mask_w, other=0.0)
    rstd = tl.load(rstd_ptr + pix, mask=mask_w, other=0.0)
    # The two means over C sum both channel tiles.
    xhat0, dy0, dyw0 = _bwd_norm_tile_inputs(z0, dy_ptr, norm_w_ptr, pix, mask_w, mean, rstd, offs_c0, mask_c0, C)
    c1 = tl.sum(dyw0 * xhat0, axis=1)
    c2 = tl.sum(dyw0, axis=1)
    if BLOCK_C1 > 0:
        xhat1, dy1, dyw1 = _bwd_norm_tile_inputs(z1, dy_ptr, norm_w_ptr, pix, mask_w, mean, rstd, offs_c1,
                                                 mask_c1, C)
        c1 += tl.sum(dyw1 * xhat1, axis=1)
        c2 += tl.sum(dyw1, axis=1)
    c1 = c1 / C
    c2 = c2 / C
    g0 = _norm_grad_tile(g_ptr, pix, mask_w, offs_c0, mask_c0, xhat0, dyw0, c1, c2, rstd, C)
    if BLOCK_C1 > 0:
        g1 = _norm_grad_tile(g_ptr, pix, mask_w, offs_c1, mask_c1, xhat1, dyw1, c1, c2, rstd, C)
    else:
        xhat1, dy1, g1 = z1, z1, z1  # placeholders, never used
    return dy0 * xhat0, dy0, g0, dy1 * xhat1, dy1, g1


@triton.jit
def _norm_grad_tile(
    g_ptr,        # (N, H, W, C) fp32 out
    pix, mask_w,  # the row's pixels
    offs_c, mask_c,  # one channel tile
    xhat, dyw,    # from _bwd_norm_tile_inputs
    c1, c2,       # (BLOCK_W,) mean_C(dyw * xhat), mean_C(dyw) over all of C
    rstd, C,
):
    """g of one channel tile, stored and returned (0 at invalid pixels / channels)."""
    mask = mask_w[:, None] & mask_c[None, :]
    g = tl.where(mask, (dyw - c2[:, None] - xhat * c1[:, None]) * rstd[:, None], 0.0)
    tl.store(g_ptr + pix[:, None] * C + offs_c[None, :], g, mask=mask)
    return g


@triton.jit
def _dwconv_layernorm_bwd_norm_kernel(
    dy_ptr,         # (N, H, W, C) upstream gradient, x.dtype
    x_ptr,          # (N, H, W, C) forward input (the conv output is recomputed)
    taps_ptr,       # (49, BLOCK_C0 + BLOCK_C1) fp32 conv weight, tap-major, zero past C
    conv_bias_ptr,  # (C,) fp32 conv bias; read only when HAS_BIAS
    norm_w_ptr,     # (C,) fp32 LayerNorm weight
    mean_ptr,       # (N, H, W) fp32 saved mean
    rstd_ptr,       # (N, H, W) fp32 saved rstd
    g_ptr,          # (N, H, W, C) fp32 workspace: gradient w.r.t. the conv output
    dnw_part_ptr,   # (programs, C) fp32 partial sums of dy * xhat
    dnb_part_ptr,   # (programs, C) fp32 partial sums of dy
    dcb_part_ptr,   # (programs, C) fp32 partial sums of g
    H, W, C,        # sizes
    ROWS,           # output rows per program, as in the forward
    HAS_BIAS: tl.constexpr,  # conv has a bias
    BLOCK_W: tl.constexpr,   # pixels of each row per program
    BLOCK_C0: tl.constexpr,  # channel tiles, as in the forward
    BLOCK_C1: tl.constexpr,
):
    # The forward's ring (see above it). Each finished row gives g; dy * xhat, dy and g add up
    # elementwise over the program's rows and are summed over its pixels once, at the end, into
    # one partial row per program (a reduction across threads per row would cost more than the
    # row's own arithmetic).
    pid, sample_row0, h_begin, h_end, offs_w, mask_w = _ring_program(H, W, ROWS, BLOCK_W)
    offs_c0, mask_c0, offs_c1, mask_c1 = _channel_tiles(C, BLOCK_C0, BLOCK_C1)
    a0, b0 = _ring_zeros(BLOCK_W, BLOCK_C0, BLOCK_C1)
    a1, a2, a3, a4, a5, a6 = a0, a0, a0, a0, a0, a0
    b1, b2, b3, b4, b5, b6 = b0, b0, b0, b0, b0, b0
    dnw0, dnw1 = _ring_zeros(BLOCK_W, BLOCK_C0, BLOCK_C1)
    dnb0, dcb0 = dnw0, dnw0
    dnb1, dcb1 = dnw1, dnw1
    for ih in range(h_begin - 3, h_end + 3):
        a0, a1, a2, a3, a4, a5, a6, b0, b1, b2, b3, b4, b5, b6 = _ring_row(
            x_ptr, taps_ptr, sample_row0, ih, H, W, C, offs_w, offs_c0, mask_c0, offs_c1, mask_c1,
            a0, a1, a2, a3, a4, a5, a6, b0, b1, b2, b3, b4, b5, b6, BLOCK_C0, BLOCK_C1)
        if ih - 3 >= h_begin:  # a0 is output row ih - 3 (< h_end: ih < h_end + 3)
            s0, s1, s2, s3, s4, s5 = _norm_grad_row(
                a0, b0, dy_ptr, g_ptr, conv_bias_ptr, norm_w_ptr, mean_ptr, rstd_ptr,
                (sample_row0 + ih - 3) * W + offs_w, mask_w, offs_c0, mask_c0, offs_c1, mask_c1, C,
                HAS_BIAS, BLOCK_C1)
            dnw0 += s0
            dnb0 += s1
            dcb0 += s2
            if BLOCK_C1 > 0:
                dnw1 += s3
                dnb1 += s4
                dcb1 += s5
        new_a, new_b = _ring_zeros(BLOCK_W, BLOCK_C0, BLOCK_C1)
        a0, a1, a2, a3, a4, a5, a6 = a1, a2, a3, a4, a5, a6, new_a
        b0, b1, b2, b3, b4, b5, b6 = b1, b2, b3, b4, b5, b6, new_b
    tl.store(dnw_part_ptr + pid * C + offs_c0, tl.sum(dnw0, axis=0), mask=mask_c0)
    tl.store(dnb_part_ptr + pid * C + offs_c0, tl.sum(dnb0, axis=0), mask=mask_c0)
    tl.store(dcb_part_ptr + pid * C + offs_c0, tl.sum(dcb0, axis=0), mask=mask_c0)
    if BLOCK_C1 > 0:
        tl.store(dnw_part_ptr + pid * C + offs_c1, tl.sum(dnw1, axis=0), mask=mask_c1)
        tl.store(dnb_part_ptr + pid * C + offs_c1, tl.sum(dnb1, axis=0), mask=mask_c1)
        tl.store(dcb_part_ptr + pid * C + offs_c1, tl.sum(dcb1, axis=0), mask=mask_c1)


@triton.jit
def _dwconv_layernorm_bwd_conv_kernel(
    g_ptr,          # (N, H, W, C) fp32 gradient w.r.t. the conv output
    x_ptr,          # (N, H, W, C) forward input
    taps_ptr,       # (49, C) fp32 conv weight, tap-major
    dx_ptr,         # (N, H, W, C) output gradient, x.dtype
    dw_part_ptr,    # (row chunks * w tiles, 49, C) fp32 partials of dconv_weight (tap-major)
    H, W, C,        # sizes
    ROWS: tl.constexpr,      # image rows per program (bounds the partial buffer)
    BLOCK_W: tl.constexpr,   # pixels of one row per program
    BLOCK_C: tl.constexpr,   # channels per program (the conv is per channel)
):
    # One grid axis, as in the forward: program = (sample, row chunk) * wc tiles + (w tile, c tile).
    pid = tl.program_id(0).to(tl.int64)
    num_w_tiles = tl.cdiv(W, BLOCK_W)
    num_wc_tiles = num_w_tiles * tl.cdiv(C, BLOCK_C)
    pid_wc = pid % num_wc_tiles  # w fastest
    pid_row = pid // num_wc_tiles
    pid_w = pid_wc % num_w_tiles
    pid_c = pid_wc // num_w_tiles
    num_row_chunks = tl.cdiv(H, ROWS)
    n = pid_row // num_row_chunks
    h0 = (pid_row % num_row_chunks) * ROWS
    sample_row0 = n * H

    offs_w = pid_w * BLOCK_W + tl.arange(0, BLOCK_W)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C  # column validity is folded into per-row bounds below

    # dx[p] = sum_tap g[p - off(tap)] * w[tap]  (transposed depthwise conv).
    for r in range(ROWS):
        h = h0 + r
        row_valid = h < H
        acc = tl.zeros([BLOCK_W, BLOCK_C], dtype=tl.float32)
        for kh in range(7):
            gh = h - (kh - 3)
            w_hi = tl.where(row_valid & (gh >= 0) & (gh < H), W, 0)
            row_base = (sample_row0 + gh) * W
            for kw in tl.static_range(7):
                gw = offs_w - (kw - 3)
                m = (gw >= 0) & (gw < w_hi)
                gv = tl.load(g_ptr + (row_base + gw)[:, None] * C + offs_c[None, :],
                             mask=m[:, None] & mask_c[None, :], other=0.0)
                wv = tl.load(taps_ptr + (kh * 7 + kw) * C + offs_c, mask=mask_c, other=0.0)
                acc += gv * wv[None, :]
        pix = (sample_row0 + h) * W + offs_w
        tl.store(dx_ptr + pix[:, None] * C + offs_c[None, :], acc.to(dx_ptr.dtype.element_ty),
                 mask=(offs_w < tl.where(row_valid, W, 0))[:, None] & mask_c[None, :])

    # dw[c, tap] = sum_p g[p, c] * x[p + off(tap), c] over this program's pixels.
    # One tap at a time so the accumulator is a single C vector; the g rows it
    # re-reads per tap were just touched and come from cache.
    # Partial row per (row chunk, w tile); its c tiles fill disjoint C slices.
    part = pid_row * num_w_tiles + pid_w
    for kh in range(7):
        for kw in tl.static_range(7):
            dw = tl.zeros([BLOCK_C], dtype=tl.float32)
            for r in range(ROWS):
                h = h0 + r
                row_valid = h < H
                g_base = (sample_row0 + h) * W
                gv = tl.load(g_ptr + (g_base + offs_w)[:, None] * C + offs_c[None, :],
                             mask=(offs_w < tl.where(row_valid, W, 0))[:, None] & mask_c[None, :],
                             other=0.0)
                ih = h + (kh - 3)
                iw = offs_w + (kw - 3)
                m = (iw >= 0) & (iw < tl.where(row_valid & (ih >= 0) & (ih < H), W, 0))
                xv = tl.load(x_ptr + ((sample_row0 + ih) * W + iw)[:, None] * C + offs_c[None, :],
                             mask=m[:, None] & mask_c[None, :], other=0.0).to(tl.float32)
                dw += tl.sum(gv * xv, axis=0)
            tl.store(dw_part_ptr + (part * 49 + kh * 7 + kw) * C + offs_c, dw, mask=mask_c)


def _tile_elems(C):
    # With C % 16 != 0 the channel rows are not 16-byte aligned, so loads are not
    # vectorised and every element needs its own 64-bit address: a 4096 tile
    # spilled (AOT-compiled for sm_80 / sm_90, C = 40). Halve it; keep 8 warps.
    return _TILE_ELEMS if C % 16 == 0 else _TILE_ELEMS // 2


def _ring_tiling(H, W, C):
    """(ROWS, BLOCK_W, BLOCK_C0, BLOCK_C1, num_warps) for the forward and backward-norm kernels,
    whose programs hold seven row accumulators of BLOCK_W pixels x C."""
    block_c0, block_c1 = split_width(C, min_tile=1)  # no tl.dot here: no 16-wide minimum
    width = block_c0 + block_c1
    # Chosen from the sm_90 SASS of the ConvNeXt-T stage shapes (triton 3.9, 2026-12-05): 8-pixel
    # tiles up to C = 384 and one pixel above, with about 6 values of each accumulator per thread
    # (12 at C = 384), keep the conv loop free of layout conversions through shared memory;
    # 4-pixel tiles at C = 192 and 2-pixel tiles at C = 384 put 14-40 barriers into every
    # kernel column.
    block_w = min(8 if width <= 512 else max(1, _RING_TILE_ELEMS // width), triton.next_power_of_2(W))
    num_warps = min(8, triton.next_power_of_2(triton.cdiv(block_w * width, 192)))
    # Rows in chunks of at most 16 (each chunk re-reads 6 halo rows): enough programs to fill
    # the GPU at the ConvNeXt stage shapes.
    rows = triton.cdiv(H, triton.cdiv(H, 16))
    return rows, block_w, block_c0, block_c1, num_warps


def _grid(programs: int, x: Tensor) -> Tuple[int]:
    if programs > _MAX_PROGRAMS:
        raise ValueError(f"dwconv_layernorm: x of shape {tuple(x.shape)} needs {programs} programs, more than a "
                         f"launch grid holds ({_MAX_PROGRAMS}); split the batch")
    return (programs,)


def _taps(conv_weight, width=None):
    # (C, 1, 7, 7) -> (49, C): each tap's weights become one contiguous C vector; with width,
    # (49, width), zero past C.
    C = conv_weight.shape[0]
    taps = conv_weight.reshape(C, TAPS).t()
    return taps.contiguous() if width is None or width == C else F.pad(taps, (0, width - C))


def dwconv_layernorm_fwd(
    x: Tensor,
    conv_weight: Tensor,
    conv_bias: Optional[Tensor],
    norm_weight: Tensor,
    norm_bias: Tensor,
    eps: float,
) -> Tuple[Tensor, Tensor, Tensor]:
    """y = LayerNorm_C(dwconv7x7(x) + conv_bias); returns (y, mean, rstd)."""
    N, H, W, C = x.shape
    y, mean, rstd = dwconv_layernorm_fwd_outputs(x)
    has_bias = conv_bias is not None
    rows, block_w, block_c0, block_c1, num_warps = _ring_tiling(H, W, C)
    taps = _taps(conv_weight, block_c0 + block_c1)
    grid = _grid(triton.cdiv(W, block_w) * N * triton.cdiv(H, rows), x)
    wrap_triton(_dwconv_layernorm_fwd_kernel)[grid](
        x, taps, conv_bias if has_bias else taps, norm_weight, norm_bias,
        y, mean, rstd,
        H, W, C, eps, rows,
        HAS_BIAS=has_bias, BLOCK_W=block_w, BLOCK_C0=block_c0, BLOCK_C1=block_c1, num_warps=num_warps,
    )
    return y, mean, rstd


def _conv_bwd_tiling(N, H, W, C):
    """(ROWS, BLOCK_W, BLOCK_C, num_warps) for the per-channel backward conv kernel."""
    block_c = min(triton.next_power_of_2(C), _CONV_BWD_BLOCK_C)
    block_w = max(1, min(triton.next_power_of_2(W), _tile_elems(C) // block_c))
    tiles = N * H * triton.cdiv(W, block_w) * triton.cdiv(C, block_c)
    # More rows per program -> fewer (programs, 49, C) partials; stop at ~512
    # programs so an H100's 132 SMs still get a few waves.
    rows = max(1, min(H, 16, tiles // 512))
    num_warps = 4 if block_w * block_c <= 2048 and C % 16 == 0 else 8
    return rows, block_w, block_c, num_warps


def dwconv_layernorm_bwd(
    dy: Tensor,
    x: Tensor,
    conv_weight: Tensor,
    conv_bias: Optional[Tensor],
    norm_weight: Tensor,
    mean: Tensor,
    rstd: Tensor,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns (dx, dconv_weight, dconv_bias, dnorm_weight, dnorm_bias)."""
    N, H, W, C = x.shape
    dev = x.device
    taps = _taps(conv_weight)
    has_bias = conv_bias is not None

    # Kernel 1: gradient w.r.t. the conv output + LayerNorm / bias partials.
    rows1, block_w, block_c0, block_c1, num_warps = _ring_tiling(H, W, C)
    programs1 = triton.cdiv(W, block_w) * N * triton.cdiv(H, rows1)
    grid1 = _grid(programs1, x)
    g = empty_output((N, H, W, C), torch.float32, dev)
    dnw_part = empty_output((programs1, C), torch.float32, dev)
    dnb_part = empty_output((programs1, C), torch.float32, dev)
    dcb_part = empty_output((programs1, C), torch.float32, dev)
    wrap_triton(_dwconv_layernorm_bwd_norm_kernel)[grid1](
        dy, x, _taps(conv_weight, block_c0 + block_c1), conv_bias if has_bias else taps, norm_weight, mean, rstd,
        g, dnw_part, dnb_part, dcb_part,
        H, W, C, rows1,
        HAS_BIAS=has_bias, BLOCK_W=block_w, BLOCK_C0=block_c0, BLOCK_C1=block_c1, num_warps=num_warps,
    )

    # Kernel 2: dx (transposed conv of g) + conv-weight partials.
    rows, block_w2, block_c2, num_warps2 = _conv_bwd_tiling(N, H, W, C)
    row_chunks, w_tiles2 = N * triton.cdiv(H, rows), triton.cdiv(W, block_w2)
    grid2 = _grid(w_tiles2 * triton.cdiv(C, block_c2) * row_chunks, x)
    dx = empty_output(x.shape, x.dtype, x.device)
    dw_part = empty_output((row_chunks * w_tiles2, TAPS, C), torch.float32, dev)
    wrap_triton(_dwconv_layernorm_bwd_conv_kernel)[grid2](
        g, x, taps, dx, dw_part,
        H, W, C,
        ROWS=rows, BLOCK_W=block_w2, BLOCK_C=block_c2, num_warps=num_warps2,
    )
    # Fixed-order reductions (deterministic).
    dconv_weight = dw_part.sum(0).t().reshape(C, 1, KERNEL_SIZE, KERNEL_SIZE).contiguous()
    dconv_bias = dcb_part.sum(0)
    dnorm_weight = dnw_part.sum(0)
    dnorm_bias = dnb_part.sum(0)
    return dx, dconv_weight, dconv_bias, dnorm_weight, dnorm_bias
